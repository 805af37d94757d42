"""ONNX -> TensorRT engines (standard TensorRT or TensorRT for RTX), built from the manifest."""
