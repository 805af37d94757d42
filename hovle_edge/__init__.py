"""hovle-edge: HoVLE from PyTorch to edge GPUs (reference model, ONNX export, TensorRT, torch-free runtime)."""

__version__ = "0.1.0"
