"""The PyTorch reference of HoVLE (needs torch)."""

from hovle_edge.model.generate import generate
from hovle_edge.model.hovle import HoVLE, HoVLECache, HoVLEOutput

__all__ = ["HoVLE", "HoVLECache", "HoVLEOutput", "generate"]
