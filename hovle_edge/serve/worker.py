"""The model thread: it alone runs the graphs. Requests wait in a queue; up to `slots` conversations
are active at once, each with its own KV cache, and the thread advances them in turn one graph call
at a time (a prefill, or one token), so a long answer does not hold a short one back. Each step
checks the request's cancel flag, so a client that goes away frees its slot at the next token.

A request resumes from the longest prefix it shares with an earlier conversation (the prefix cache)
and runs only the rest of its prompt; images come from the vision cache when their bytes were seen."""

from __future__ import annotations

import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from hovle_edge.errors import HoVLEError
from hovle_edge.runtime.pipeline import Timings
from hovle_edge.runtime.sampling import SamplingParams
from hovle_edge.serve.caches import ImageCache, PrefixCache, PrefixEntry
from hovle_edge.serve.images import ImageInput
from hovle_edge.serve.prompt import PromptIds
from hovle_edge.serve.settings import RequestError, ServeSettings
from hovle_edge.serve.stops import StopStrings
from hovle_edge.tokenizer import StreamDecoder


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    reason: str  # stop | length
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens taken from the prefix cache instead of computed
    timings: dict  # milliseconds on the server: queued, prompt (cache, vision, prefill), first_token, total


@dataclass
class Failed:
    status: int
    message: str


CLIENT_GONE = 499  # the answer to a request whose client left (nginx's code); nobody reads it


@dataclass
class Job:
    prompt: PromptIds
    images: list[ImageInput]
    sampling: SamplingParams
    max_tokens: int  # already fitted to the context
    stop: list[str]
    post: Callable[[object], None]  # hands an event to the request's HTTP side; thread-safe
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)


class Worker:
    def __init__(self, engine, settings: ServeSettings):
        self.engine = engine
        self.slots = settings.slots
        self.max_waiting = settings.max_queue
        self.prefix_cache = PrefixCache(int(settings.cache_mb * 2**20))
        self.image_cache = ImageCache(int(settings.image_cache_mb * 2**20))
        self.jobs: queue.Queue = queue.Queue()
        self.active = 0  # requests being answered now
        self.cancelled = 0  # requests given up because their client left
        self.thread = threading.Thread(target=self._run, name="hovle-serve-model", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join()
        self.engine.close()

    def submit(self, job: Job) -> None:
        if self.jobs.qsize() >= self.max_waiting:
            raise RequestError(503, f"the server is busy: {self.jobs.qsize()} requests are waiting; retry later",
                               code="server_busy")
        self.jobs.put(job)

    def _run(self) -> None:
        running: list = []  # (job, its step generator)
        while True:
            while len(running) < self.slots:
                try:
                    job = self.jobs.get(block=not running)
                except queue.Empty:
                    break
                if job is None:
                    return
                running.append((job, self._steps(job)))
            self.active = len(running)
            for item in list(running):
                if self._advance(*item):
                    running.remove(item)
            self.active = len(running)

    def _advance(self, job: Job, steps) -> bool:
        """One graph call of one request; True when the request is over."""
        try:
            next(steps)
            return False
        except StopIteration:
            return True
        except HoVLEError as e:
            job.post(Failed(getattr(e, "status", 400), str(e)))
        except Exception as e:  # a bug, not the request's fault: answer 500 and keep serving the others
            traceback.print_exc(file=sys.stderr)
            job.post(Failed(500, f"internal error: {type(e).__name__}: {e}"))
        return True

    def _steps(self, job: Job):
        engine, ids = self.engine, job.prompt.ids
        if job.cancelled.is_set():
            return self._gone(job)
        started = time.perf_counter()
        cache, cached = self._resume(job)
        rows = self._image_rows(job, cached)
        timings = {"queued_ms": started - job.submitted}
        fed = list(ids)  # what the cache holds: the runtime's loop appends each token it runs
        # The runtime's own decode loop (prefill first), one token per next(): this generator yields between
        # them so that the other slots take their turns.
        graph_timings = Timings()
        tokens = engine.sample(cache, ids[cached:], rows, replace(job.sampling, max_new_tokens=job.max_tokens),
                               graph_timings, started, fed)
        decoder, stops = StreamDecoder(engine.tokenizer), StopStrings(job.stop)
        completion, reason = 0, "length"
        for step, token in enumerate(tokens):
            if step == 0:
                timings["prompt_ms"] = graph_timings.first_token  # cache, vision and prefill (and one sampling)
                timings["first_token_ms"] = time.perf_counter() - job.submitted
            if token in engine.stop_ids:
                reason = "stop"
                break
            completion += 1
            text = stops.push(decoder.push(token))
            if text:
                job.post(Delta(text))
            if stops.hit:
                reason = "stop"
                break
            if step + 1 == job.max_tokens:  # the runtime's loop ends here too: no turn to give up
                break
            yield
            if job.cancelled.is_set():
                return self._gone(job)
        tail = stops.push(decoder.flush()) + stops.flush()
        if tail:
            job.post(Delta(tail))
        timings["total_ms"] = time.perf_counter() - job.submitted
        job.post(Finished(reason, len(ids), completion, cached, {k: round(1000 * v, 2) for k, v in timings.items()}))
        self._remember(job, fed, cache)

    def _gone(self, job: Job) -> None:
        self.cancelled += 1
        job.post(Failed(CLIENT_GONE, "the client went away"))

    def _resume(self, job: Job):
        """A cache for the request and how many of its prompt ids it already holds."""
        ids = job.prompt.ids
        capacity = min(self.engine.max_context, len(ids) + job.max_tokens)
        match = self.prefix_cache.longest(ids, [image.digest for image in job.images], limit=len(ids) - 1)
        if match is None:
            return self.engine.new_cache(capacity), 0
        return self.engine.resume(match.entry.snapshot, match.length, capacity), match.length

    def _image_rows(self, job: Job, cached: int) -> np.ndarray | None:
        """The image rows for the placeholders after the first `cached` ids (an image the prefix cache
        covers is not needed; one it covers in part gives only its remaining rows)."""
        rows = []
        for start, image in zip(job.prompt.image_starts, job.images):
            count = image.tiles * self.engine.tokens_per_tile
            done = min(max(cached - (start + 1), 0), count)  # the block is <img>, the rows, </img>
            if done < count:
                rows.append(self._embeds(image)[done:])
        return np.concatenate(rows) if rows else None

    def _embeds(self, image: ImageInput) -> np.ndarray:
        embeds = image.embeds if image.embeds is not None else self.image_cache.get(image.digest)
        if embeds is None:
            embeds = self.engine.image_embeds(image.pixel_values)
            self.image_cache.add(image.digest, embeds)
        return embeds

    def _remember(self, job: Job, fed: list[int], cache) -> None:
        if self.prefix_cache.budget == 0:
            return
        snapshot = self.engine.snapshot(cache)
        entry = PrefixEntry(tuple(fed), tuple(image.digest for image in job.images),
                            tuple(job.prompt.image_starts), snapshot)
        self.prefix_cache.add(entry, snapshot.nbytes)
