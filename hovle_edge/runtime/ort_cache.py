"""How an ONNX Runtime session is opened on a model folder's graph, and why with no on-disk cache of
the optimized graph.

ONNX Runtime can save the graph it optimized and load that next time without optimizing again. It
saves every initializer again beside it: a second copy of the weights (9.1 GB for the 2.6B model,
next to the 9.7 GB export; an edge device's eMMC cannot hold both), which is then loaded from a
file that no manifest hashes. Measured on this project's benchmark models (CPU, onnxruntime 1.32),
loading from that cache saved a third of a second to a few seconds of graph optimization per start
(benchmarks/README.md, "Session load"), less than re-reading the weights costs either way. So a
session is optimized in memory at every start, from the hashed graph itself, and nothing else is
written or read: there is no second copy to check or to lose.

A graph that ONNX Runtime cannot read (truncated, weights cut short, not ONNX at all) is a
ModelFolderError naming the file, not ONNX Runtime's own traceback."""

from __future__ import annotations

from hovle_edge.errors import ModelFolderError


def open_session(ort, path: str, options, providers: list[str]):
    """An InferenceSession for the graph at `path` (optimized in memory, per `options`)."""
    invalid = _load_errors(ort)
    try:
        return ort.InferenceSession(path, options, providers=providers)
    except invalid as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFolderError(f"{path}: ONNX Runtime cannot load this graph ({reason}); a damaged or "
                               "truncated graph needs a new export") from e


def _load_errors(ort) -> tuple:
    """ONNX Runtime's exception classes for a graph or weights file it cannot read (Fail: external
    weights shorter than the graph says)."""
    state = ort.capi.onnxruntime_pybind11_state
    names = ("InvalidProtobuf", "InvalidGraph", "NoSuchFile", "Fail")
    return tuple(getattr(state, name) for name in names if hasattr(state, name))
