"""The options every ONNX Runtime session in hovle-edge is opened with: one thread pool per process.

A decode step runs two sessions in turn (holistic embedding, then decoder), a few hundred small
operators each. With a pool per session, the threads the idle session leaves spinning take the cores
from the busy one (a 512-context w512 step took 153-165 ms spinning against 58-61 ms not, on a loaded
2-core machine), so they could not spin, and then every operator woke its threads through the
kernel. One pool shared by the process's sessions can spin, since one session runs at a time: on the
w512 model, 2 cores, its steps were 2-11% shorter at 128 and 512 tokens of context
(benchmarks/README.md, "Thread pools").

ONNX Runtime makes that pool once per process, before the first session that uses it, and from then
on refuses sessions that ask for a pool of their own ("use_per_session_threads must be false when
using a global thread pool"). So every session hovle-edge opens takes its options from here, and the
first one fixes the pool's size: a later session asking for another thread count shares the pool all
the same, with a RuntimeWarning. A program that opens its own ONNX Runtime sessions beside
hovle-edge's sets `use_per_session_threads = False` on them."""

from __future__ import annotations

import threading
import warnings

_lock = threading.Lock()
_pool = {}  # "threads": what the process's pool was made with (None: one per physical core)


def session_options(ort, threads: int | None = None):
    """SessionOptions on the process's shared pool, made now with `threads` (None or 0: one per
    physical core) if this is the first; all graph optimizations, ONNX Runtime's warnings quiet."""
    threads = threads or None
    with _lock:
        if "threads" not in _pool:
            ort.set_global_thread_pool_sizes(threads or 0, 1)  # 1: no inter-op pool, operators run in order
            _pool["threads"] = threads
        elif _pool["threads"] != threads:
            warnings.warn(f"ONNX Runtime's thread pool of this process has {describe(_pool['threads'])}; "
                          f"this session shares it instead of {describe(threads)}", RuntimeWarning, stacklevel=2)
    options = ort.SessionOptions()
    options.use_per_session_threads = False
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def describe(threads: int | None) -> str:
    return "one thread per physical core" if threads is None else f"{threads} threads"
