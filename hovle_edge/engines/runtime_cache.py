"""TensorRT for RTX's runtime cache: the kernels it compiles just in time on the user's GPU, kept in
one file per engine folder and reused on the next start, so only the first start pays for
compilation. Standard TensorRT compiles every kernel at build time and has no such cache: there the
contexts are made plainly and nothing is written.

The file sits beside the engines (`runtime.cache`) where that folder is writable, else in the engine
cache folder under the engines' hash, so a read-only install still keeps its kernels. It is written
on close, whole or not at all. TensorRT for RTX checks a loaded cache against the GPU, its own
version and CUDA's, and ignores one that does not fit, so a stale file costs a recompile, never a
wrong result."""

from __future__ import annotations

import hashlib
import os

from hovle_edge.engines.cache import ENGINES, default_cache_dir
from hovle_edge.files import atomic_file

FILE = "runtime.cache"


def cache_path(engine_dir: str, cache_dir: str | None = None) -> str:
    """Where the runtime cache of the engines in `engine_dir` lives."""
    if os.access(engine_dir, os.W_OK):
        return os.path.join(engine_dir, FILE)
    with open(os.path.join(engine_dir, ENGINES), "rb") as f:
        engines_sha = hashlib.sha256(f.read()).hexdigest()
    return os.path.join(cache_dir or default_cache_dir(), f"{engines_sha}.runtime-cache")


class RuntimeCache:
    """One runtime cache shared by every execution context of an engine folder."""

    def __init__(self, path: str):
        self.path = path
        self.cache = None  # made from the first engine's runtime config, then shared
        self.configs = []  # kept alive as long as the contexts made with them
        self.loaded = False  # whether kernels from an earlier start were taken

    def context(self, engine):
        """An execution context of `engine`, compiling into (and reading from) this cache where the
        flavour has one."""
        if not hasattr(engine, "create_runtime_config"):  # standard TensorRT: kernels were built already
            return engine.create_execution_context()
        config = engine.create_runtime_config()
        if self.cache is None:
            self.cache = config.create_runtime_cache()
            if os.path.isfile(self.path):
                with open(self.path, "rb") as f:
                    self.loaded = bool(self.cache.deserialize(f.read()))  # False: another GPU or version
        config.set_runtime_cache(self.cache)
        self.configs.append(config)
        return engine.create_execution_context(runtime_config=config)

    def save(self) -> None:
        """Write what was compiled so far; nothing when there is no cache."""
        if self.cache is None:
            return
        blob = bytes(self.cache.serialize())
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with atomic_file(self.path) as part, open(part, "wb") as f:
            f.write(blob)
