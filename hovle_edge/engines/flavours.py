"""The two TensorRT flavours behind one builder and one backend: standard TensorRT (`tensorrt`,
JetPack and data-centre GPUs) and TensorRT for RTX (`tensorrt_rtx`, RTX desktops, real wheels on
PyPI). Nearly the same Python API; where they differ the code asks the module what it has.

Standard TensorRT builds an engine on the GPU that will run it. TensorRT for RTX also builds ahead of
time, with no GPU present, for a list of named architectures (compute capabilities); `build_targets`
decides which architectures a build is for and says why when it cannot."""

from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass

from hovle_edge.errors import EngineBuildError
from hovle_edge.runtime.backends import BackendError

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
AHEAD_OF_TIME = {"tensorrt-rtx"}  # flavours whose builder compiles for named architectures without a GPU


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
    raise BackendError("both tensorrt and tensorrt_rtx are installed: choose one as the flavour", setting="flavour")


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


def gpu_here() -> tuple[str, str] | None:
    """(GPU name, "major.minor") of device 0, or None where there is no GPU or no cuda-python to ask."""
    try:
        return compute_capability()
    except BackendError:
        return None


def supported_capabilities(trt) -> list[str]:
    """The architectures this TensorRT for RTX builder compiles for, read from its ComputeCapability
    enum (SM89 -> "8.9", SM120 -> "12.0"), lowest first."""
    found = [m.group(1) for name in dir(trt.ComputeCapability) if (m := re.fullmatch(r"SM(\d+)", name))]
    return [f"{int(d) // 10}.{int(d) % 10}" for d in sorted(found, key=int)]


def capability_enum(trt, capability: str):
    """trt.ComputeCapability.SM89 for "8.9"."""
    major, minor = capability.split(".")
    return getattr(trt.ComputeCapability, f"SM{major}{minor}")


@dataclass(frozen=True)
class Targets:
    """What a build compiles for: the architectures, and the GPU it ran on (None ahead of time)."""

    compute_capabilities: list[str]
    gpu: str | None


def build_targets(trt, flavour: str, asked: list[str]) -> Targets:
    """The architectures to build for. Ahead-of-time flavours take the asked ones, or the GPU's own
    when none are asked; standard TensorRT builds for the GPU it runs on and nothing else."""
    here = gpu_here()
    gpu = here[0] if here else None
    if flavour in AHEAD_OF_TIME:
        supported = supported_capabilities(trt)
        wrong = [c for c in asked if c not in supported]
        if wrong:
            raise EngineBuildError(f"{flavour} {trt.__version__} cannot build for compute capability "
                                   f"{', '.join(wrong)}; it builds for {', '.join(supported)}",
                                   setting="compute_capabilities")
        if asked:  # in the enum's order, once each: the same engines whatever order they were named in
            return Targets([c for c in supported if c in asked], gpu)
        if here is None:
            raise EngineBuildError(f"no GPU here to take a compute capability from: name the architectures "
                                   f"to build for ahead of time ({flavour} builds for {', '.join(supported)})",
                                   setting="compute_capabilities")
        if here[1] not in supported:
            raise EngineBuildError(f"this GPU ({gpu}, compute capability {here[1]}) is not one {flavour} "
                                   f"builds for ({', '.join(supported)})")
        return Targets([here[1]], gpu)
    if here is None:
        raise EngineBuildError(f"{flavour} builds engines on the GPU that will run them, and there is no GPU "
                               f"here; build on the device, or with tensorrt-rtx ahead of time")
    if any(c != here[1] for c in asked):
        raise EngineBuildError(f"{flavour} builds only for the GPU it runs on ({gpu}, compute capability "
                               f"{here[1]}), not for {', '.join(asked)}; build on that device, or with "
                               f"tensorrt-rtx ahead of time", setting="compute_capabilities")
    return Targets([here[1]], gpu)
