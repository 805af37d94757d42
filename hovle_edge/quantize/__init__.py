"""Weight-only INT4/INT8 quantization of an exported model folder (numpy, onnx, onnxruntime; no torch)."""

from hovle_edge.quantize.folder import QuantizeSettings, quantize_model

__all__ = ["QuantizeSettings", "quantize_model"]
