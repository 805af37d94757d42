"""The serve package's one door into the runtime: the step API of a Pipeline (new cache, prefill,
decode step, vision, snapshot and resume) and what the server needs to know about the model. Only
the model thread calls the graph methods; nothing here imports torch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hovle_edge.runtime.kv_cache import ConversationCache
from hovle_edge.runtime.pipeline import Pipeline, Timings
from hovle_edge.spec import past_names


@dataclass
class Snapshot:
    """Both stacks' pasts for the first `length` slots."""

    embedding: dict
    llm: dict
    length: int

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for stack in (self.embedding, self.llm) for v in stack.values())


class Engine:
    def __init__(self, pipe: Pipeline):
        self.pipe = pipe
        self.manifest = pipe.manifest
        self.tokenizer = pipe.tokenizer
        self.template = pipe.template
        self.max_context = pipe.manifest.max_context
        self.stop_ids = set(pipe.manifest.stop_ids)
        self.tokens_per_tile = pipe.manifest.model["tokens_per_tile"]

    @classmethod
    def from_dir(cls, model_dir: str, backend: str = "onnxruntime", device: str = "cpu",
                 threads: int | None = None) -> "Engine":
        return cls(Pipeline.from_dir(model_dir, backend=backend, device=device, threads=threads))

    def close(self) -> None:
        self.pipe.close()

    def pixel_values(self, path: str) -> np.ndarray:
        return self.pipe.pixel_values(path, None)

    def image_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.pipe.image_embeds(pixel_values)

    def new_cache(self, capacity: int) -> ConversationCache:
        m = self.manifest
        return ConversationCache(m.stack("embedding"), m.stack("llm"), m.kv_dtype, capacity)

    def prefill(self, cache: ConversationCache, ids: list[int], image_embeds: np.ndarray | None) -> np.ndarray:
        return self.pipe.forward(cache, ids, image_embeds, Timings(), prefill=True)

    def decode_step(self, cache: ConversationCache, token: int) -> np.ndarray:
        return self.pipe.forward(cache, [token], None, Timings())

    def snapshot(self, cache: ConversationCache) -> Snapshot:
        # The runtime hands back new arrays each step and never writes into old ones: holding them is a snapshot.
        return Snapshot(dict(cache.embedding.values), dict(cache.llm.values), cache.length)

    def resume(self, snapshot: Snapshot, length: int, capacity: int) -> ConversationCache:
        """A new cache holding the snapshot's first `length` slots (length <= snapshot.length)."""
        cache = self.new_cache(capacity)
        for stack, saved in ((cache.embedding, snapshot.embedding), (cache.llm, snapshot.llm)):
            for name in past_names(stack.stack.layers):
                stack.values[name] = np.ascontiguousarray(saved[name][:, :, :length])
        cache.length = length
        return cache
