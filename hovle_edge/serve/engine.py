"""The serve package's one door into the runtime: a Pipeline's step API (new cache, prefill, decode
step, vision, snapshot and restore) and what the server needs to know about the model. Only the
model thread calls the graph methods; nothing here imports torch."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from hovle_edge.runtime.kv_cache import CacheSnapshot, ConversationCache
from hovle_edge.runtime.pipeline import Pipeline, Timings
from hovle_edge.runtime.sampling import SamplingParams


class Engine:
    def __init__(self, pipe: Pipeline):
        self.pipe = pipe
        self.tokenizer = pipe.tokenizer
        self.template = pipe.template
        self.max_context = pipe.backend.max_context  # the export's, or less for engines built smaller
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
        return self.pipe.new_cache(capacity)

    def prefill(self, cache: ConversationCache, ids: list[int], image_embeds: np.ndarray | None) -> np.ndarray:
        return self.pipe.prefill(cache, ids, image_embeds)

    def decode_step(self, cache: ConversationCache, token: int) -> np.ndarray:
        return self.pipe.decode_step(cache, token)

    def sample(self, cache: ConversationCache, ids: list[int], image_embeds: np.ndarray | None,
               params: SamplingParams, timings: Timings, started: float, history: list[int]) -> Iterator[int]:
        """The runtime's decode loop (Pipeline.sample): prefill `ids`, then one chosen token per next(),
        each run into `cache` and `history` before the next is chosen; a stop id ends it."""
        return self.pipe.sample(cache, ids, image_embeds, params, timings, started, history, self.stop_ids)

    def snapshot(self, cache: ConversationCache) -> CacheSnapshot:
        return cache.snapshot()

    def resume(self, snapshot: CacheSnapshot, length: int, capacity: int) -> ConversationCache:
        """A new cache holding the snapshot's first `length` slots (a shared prefix of what it held)."""
        cache = self.new_cache(capacity)
        cache.restore(snapshot.prefix(length))
        return cache
