"""The two TensorRT flavours behind one builder and one backend: standard TensorRT (`tensorrt`,
JetPack and data-centre GPUs) and TensorRT for RTX (`tensorrt_rtx`, RTX desktops, real wheels on
PyPI). Nearly the same Python API; where they differ the code asks the module what it has."""

from __future__ import annotations

import importlib
import importlib.util

from hovle_edge.runtime.backends import BackendError

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}


def installed_flavours() -> list[str]:
    return [name for name, module in MODULES.items() if importlib.util.find_spec(module) is not None]


def pick_flavour(asked: str | None) -> str:
    """The asked flavour, or the only one installed."""
    present = installed_flavours()
    if asked:
        if asked not in MODULES:
            raise BackendError(f"flavour {asked!r}: choose one of {', '.join(MODULES)}")
        if asked not in present:
            raise BackendError(f"{asked} is not installed (pip install 'hovle-edge[{'trt' if asked == 'tensorrt' else 'trt-rtx'}]')")
        return asked
    if len(present) == 1:
        return present[0]
    if not present:
        raise BackendError("neither tensorrt nor tensorrt_rtx is installed: pip install 'hovle-edge[trt]' on JetPack "
                           "or data-centre GPUs, 'hovle-edge[trt-rtx]' on RTX desktops")
    raise BackendError("both tensorrt and tensorrt_rtx are installed: choose one with --flavour")


def import_flavour(flavour: str):
    return importlib.import_module(MODULES[flavour])


def compute_capability() -> tuple[str, str]:
    """(GPU name, "major.minor") of device 0 through cuda-python."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as e:
        raise BackendError("cuda-python is not installed: pip install cuda-python") from e
    error, props = cudart.cudaGetDeviceProperties(0)
    if error != cudart.cudaError_t.cudaSuccess:
        raise BackendError(f"no CUDA device could be queried ({error})")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.strip("\x00"), f"{props.major}.{props.minor}"


def strongly_typed(trt) -> bool:
    """TensorRT 11 and TensorRT for RTX build strongly typed networks only: precision comes from the
    graph (an fp16 export), not from builder flags."""
    return not hasattr(trt.BuilderFlag, "FP16")
