"""Generation on an exported model folder without torch: image -> tiles -> vision graph once; prompt
-> ids; prefill through the embedding and decoder graphs; then one token at a time through both,
each stack keeping its own KV cache. A Conversation keeps the caches between turns, so a follow-up
question costs only its own tokens. Timers are always on (a few perf_counter calls per token)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from hovle_edge.errors import InputError
from hovle_edge.preprocess import preprocess_image
from hovle_edge.runtime.backends import make_backend
from hovle_edge.runtime.kv_cache import ConversationCache
from hovle_edge.runtime.sampling import Sampler, SamplingParams
from hovle_edge.spec import load_manifest
from hovle_edge.tokenizer import IM_END, ChatTemplate, StreamDecoder, Tokenizer


@dataclass
class Timings:
    """Seconds spent in each part of the last turn; `steps` holds every decode step's latency."""

    preprocess: float = 0.0
    vision: float = 0.0
    embedding_prefill: float = 0.0
    llm_prefill: float = 0.0
    first_token: float = 0.0  # from the call to the first token chosen
    steps: list = field(default_factory=list)
    total: float = 0.0
    prompt_tokens: int = 0
    new_tokens: int = 0
    tiles: int = 0
    graph_calls: dict = field(default_factory=lambda: {"vision": 0, "embedding": 0, "decoder": 0})
    tokens_through_graphs: int = 0  # sequence positions run through the embedding and decoder graphs


class Pipeline:
    """A model folder's graphs, tokenizer and chat template; the step API (prefill, decode_step,
    generate_ids) over a ConversationCache, and generate/stream/conversation for users."""

    def __init__(self, manifest, backend, tokenizer: Tokenizer):
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = tokenizer
        model = manifest.model
        self.template = ChatTemplate(tokens_per_tile=model["tokens_per_tile"], system=manifest.data["chat"]["system"])
        self.hidden = model["hidden"]
        self.image_token = manifest.data["tokens"]["img_context"]
        # At decode the embedding graph takes one dummy image row: no position is an image token.
        self.no_image = np.zeros((1, self.hidden), dtype=manifest.kv_dtype)

    @classmethod
    def from_dir(cls, model_dir: str, backend: str = "onnxruntime", device: str = "cpu",
                 threads: int | None = None) -> "Pipeline":
        """A folder made by `hovle-edge export` (onnxruntime) or `hovle-edge build` (tensorrt)."""
        manifest = load_manifest(model_dir, verify=False)
        manifest.verify_files(graphs=backend != "tensorrt")  # an engine folder holds engines, not ONNX graphs
        return cls(manifest, make_backend(backend, manifest, device=device, threads=threads), Tokenizer.from_dir(model_dir))

    def close(self):
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def conversation(self, max_context: int | None = None) -> "Conversation":
        return Conversation(self, self.new_cache(max_context))

    def generate(self, prompt: str, image=None, max_tiles: int | None = None, **sampling) -> str:
        """One question (with an optional image path or PIL image) -> the answer text."""
        return "".join(self.stream(prompt, image, max_tiles=max_tiles, **sampling))

    def stream(self, prompt: str, image=None, max_tiles: int | None = None, **sampling) -> Iterator[str]:
        """Like generate, yielding text pieces as tokens are decoded."""
        return self.conversation().ask(prompt, image, max_tiles=max_tiles, **sampling)

    # The step API: everything above and Conversation are built on these.

    def new_cache(self, capacity: int | None = None) -> ConversationCache:
        """Empty KV caches of both stacks for `capacity` tokens (default: the model's context)."""
        limit = self.backend.max_context  # the export's, or less for engines built with a smaller one
        capacity = capacity or limit
        if not 1 <= capacity <= limit:
            raise InputError(f"a context of {capacity} tokens was asked for, but the model was exported for "
                             f"at most {limit}")
        return ConversationCache(self.backend, capacity)

    def pixel_values(self, image, max_tiles: int | None) -> np.ndarray:
        model = self.manifest.model
        limit = model["max_tiles"]
        if max_tiles is not None and max_tiles > limit:
            raise InputError(f"{max_tiles} tiles asked for, but the model was exported for at most {limit}")
        return preprocess_image(image, min_num=model["min_tiles"], max_num=max_tiles or limit,
                                image_size=model["image_size"], use_thumbnail=model["use_thumbnail"])

    def image_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        """[tiles, 3, S, S] -> the image rows [tiles * tokens_per_tile, hidden], in prompt order."""
        out = self.backend.run("vision", {"pixel_values": pixel_values})["image_embeds"]
        return out.reshape(-1, out.shape[-1])

    def prefill(self, cache: ConversationCache, ids: list[int], image_embeds: np.ndarray | None = None,
                timings: Timings | None = None) -> np.ndarray:
        """Run `ids` after what `cache` holds through both stacks; the last position's logits [V]."""
        placeholders = sum(1 for i in ids if i == self.image_token)
        rows = 0 if image_embeds is None else len(image_embeds)
        if placeholders != rows:
            raise InputError(f"the prompt holds {placeholders} image placeholders but {rows} image rows were "
                             "given; each image token position takes one row")
        if not ids:
            raise InputError("nothing to prefill: the prompt has no tokens")
        cache.check_room(len(ids))
        return self._forward(cache, ids, image_embeds, timings, prefill=True)

    def decode_step(self, cache: ConversationCache, token: int, timings: Timings | None = None) -> np.ndarray:
        """One token after what `cache` holds; its logits [V]."""
        cache.check_room(1, "the next token")
        return self._forward(cache, [token], None, timings)

    def generate_ids(self, cache: ConversationCache, ids: list[int], image_embeds: np.ndarray | None = None,
                     on_token=None, stop_ids=None, **sampling) -> tuple[list[int], Timings]:
        """Prefill `ids` (already templated), then sample until a stop id or max_new_tokens; `on_token`
        is called with each new id. Returns (new ids, the call's timings). `stop_ids=()` generates
        exactly max_new_tokens (when the context allows)."""
        timings = Timings(prompt_tokens=len(ids))
        started = time.perf_counter()
        tokens = []
        for token in self.sample(cache, ids, image_embeds, SamplingParams(**sampling), timings, started,
                                 history=list(ids), stop_ids=stop_ids):
            tokens.append(token)
            if on_token is not None:
                on_token(token)
        timings.total = time.perf_counter() - started
        return tokens, timings

    def sample(self, cache: ConversationCache, ids: list[int], image_embeds, params: SamplingParams,
               timings: Timings, started: float, history: list[int], stop_ids=None) -> Iterator[int]:
        """The decode loop: yields each chosen token (a stop token last, when one comes); every token
        but the last one is run through the graphs after it is yielded, into `cache` and `history`."""
        stop_ids = set(self.manifest.stop_ids if stop_ids is None else stop_ids)
        sampler = Sampler(params)
        logits = self.prefill(cache, ids, image_embeds, timings)
        budget = min(params.max_new_tokens, cache.room() + 1)
        for step in range(budget):
            step_started = time.perf_counter()
            token = sampler(logits, history)
            if step == 0:
                timings.first_token = time.perf_counter() - started
            timings.new_tokens += 1
            yield token  # before the graphs run it, so that a stream shows it at once
            if token in stop_ids or step + 1 == budget:
                return
            logits = self.decode_step(cache, token, timings)
            history.append(token)
            timings.steps.append(time.perf_counter() - step_started)

    def _forward(self, cache: ConversationCache, ids: list[int], image_embeds: np.ndarray | None,
                 timings: Timings | None, prefill: bool = False) -> np.ndarray:
        input_ids = np.asarray([ids], dtype=np.int64)
        positions, mask = cache.step_inputs(len(ids))
        started = time.perf_counter()
        emb = self.backend.run("embedding", {"input_ids": input_ids, "position_ids": positions, "attention_mask": mask,
                                             "image_embeds": self.no_image if image_embeds is None else image_embeds},
                               kv=cache.buffers["embedding"], device_outputs=("inputs_embeds",))  # stays on a GPU
        middle = time.perf_counter()
        llm = self.backend.run("decoder", {"inputs_embeds": emb["inputs_embeds"], "position_ids": positions,
                                           "attention_mask": mask}, kv=cache.buffers["decoder"])
        cache.advance(len(ids))
        if timings is not None:
            if prefill:
                timings.embedding_prefill = middle - started
                timings.llm_prefill = time.perf_counter() - middle
            timings.graph_calls["embedding"] += 1
            timings.graph_calls["decoder"] += 1
            timings.tokens_through_graphs += len(ids)
        return llm["logits"][0, -1]


class Conversation:
    """A multi-turn chat whose KV caches persist between turns; `timings` describes the last turn."""

    def __init__(self, pipeline: Pipeline, cache: ConversationCache):
        self.pipeline = pipeline
        self.cache = cache
        self.timings = Timings()
        self.ids: list[int] = []  # every token the caches hold, in order
        self.pending: list[int] = []  # the last answer's stop token, not yet run through the graphs

    def ask(self, question: str, image=None, max_tiles: int | None = None, **sampling) -> Iterator[str]:
        """Stream the answer to `question`; the image block goes into this turn when an image is given."""
        if not question or not question.strip():
            raise InputError("the prompt is empty")
        pipe = self.pipeline
        params = SamplingParams(**sampling)
        timings = self.timings = Timings()
        started = time.perf_counter()
        pixel_values = None if image is None else self._preprocess(image, max_tiles, timings)
        tiles = 0 if pixel_values is None else len(pixel_values)
        first_turn = not self.ids and not self.pending
        text = (pipe.template.system_block() if first_turn else "") + pipe.template.user_turn(question, tiles)
        ids = self.pending + pipe.tokenizer.encode(text, bos=first_turn)
        self.cache.check_room(len(ids) + 1)  # before any graph runs: room for the prompt and one answer token
        timings.prompt_tokens = len(ids)
        image_embeds = None if pixel_values is None else self._vision(pixel_values, timings)
        yield from self._answer(ids, image_embeds, params, timings, started)

    def ask_ids(self, ids: list[int], pixel_values: np.ndarray | None = None, image=None, stop_ids=None,
                **sampling) -> list[int]:
        """Run prompt ids (already templated, with the image block for `pixel_values` [tiles, 3, S, S],
        or for `image`, preprocessed here) and return the new token ids; for verification, profiling
        and benchmarks (`stop_ids=()` generates exactly max_new_tokens)."""
        params = SamplingParams(**sampling)
        self.cache.check_room(len(ids) + 1)
        timings = self.timings = Timings(prompt_tokens=len(ids))
        started = time.perf_counter()
        if image is not None:
            pixel_values = self._preprocess(image, None, timings)
        image_embeds = None if pixel_values is None else self._vision(pixel_values, timings)
        out = []
        for _ in self._answer(list(ids), image_embeds, params, timings, started, out, stop_ids):
            pass
        return out

    def _preprocess(self, image, max_tiles: int | None, timings: Timings) -> np.ndarray:
        started = time.perf_counter()
        pixel_values = self.pipeline.pixel_values(image, max_tiles)
        timings.preprocess = time.perf_counter() - started
        return pixel_values

    def _vision(self, pixel_values: np.ndarray, timings: Timings) -> np.ndarray:
        started = time.perf_counter()
        image_embeds = self.pipeline.image_embeds(pixel_values)
        timings.vision = time.perf_counter() - started
        timings.graph_calls["vision"] += 1
        timings.tiles = len(pixel_values)
        return image_embeds

    def _answer(self, ids, image_embeds, params: SamplingParams, timings: Timings, started: float, out=None,
                stop_ids=None):
        pipe = self.pipeline
        stops = set(pipe.manifest.stop_ids if stop_ids is None else stop_ids)
        decoder = StreamDecoder(pipe.tokenizer)
        history = self.ids + ids
        token = None
        try:
            for token in pipe.sample(self.cache, ids, image_embeds, params, timings, started, history, stop_ids):
                if out is not None:
                    out.append(token)
                if token not in stops:
                    piece = decoder.push(token)
                    if piece:
                        yield piece
        finally:  # also when the caller stops reading mid-answer
            if self.cache.length > len(self.ids):  # the prompt ran: the caches hold `history`
                self.ids = history[:self.cache.length]
                # The last token chosen has not run through the graphs: the next turn feeds it first,
                # and an answer cut short (max_new_tokens, or a reader that stopped) is closed there.
                close = [pipe.tokenizer.token_id(IM_END)]
                self.pending = close if token is None else [token] if token in stops else [token] + close
        tail = decoder.flush()
        if tail:
            yield tail
        timings.total = time.perf_counter() - started
