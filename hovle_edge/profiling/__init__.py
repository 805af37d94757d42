"""Profiling: the real pipeline's latency by stage (latency), the decode bound that memory bandwidth
sets (roofline), and `hovle-edge profile` as one call on one settings dataclass (command, settings).
Torch-free, like the runtime it times."""

from hovle_edge.profiling.command import run_profile
from hovle_edge.profiling.settings import ProfileSettings

__all__ = ["ProfileSettings", "run_profile"]
