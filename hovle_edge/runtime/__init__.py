"""The torch-free runtime: numpy, pillow, tokenizers and a backend (ONNX Runtime or TensorRT)."""

from hovle_edge.runtime.pipeline import Conversation, Pipeline, Timings
from hovle_edge.runtime.sampling import SamplingParams

__all__ = ["Conversation", "Pipeline", "SamplingParams", "Timings"]
