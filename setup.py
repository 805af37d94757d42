from setuptools import find_packages, setup

# The base install is what an edge device needs to read a model folder; torch only comes with
# [export] and [train]. Install torch first as `pip install torch==2.13.0` to get the CPU wheel.
setup(
    name="hovle-edge",
    version="0.1.0",
    description="HoVLE from PyTorch to edge GPUs: reference model, trainers, ONNX export, "
                "TensorRT engines and a torch-free runtime",
    packages=find_packages(include=["hovle_edge", "hovle_edge.*"]),
    python_requires=">=3.10",
    install_requires=["numpy", "pillow", "click", "tokenizers", "tqdm"],
    extras_require={
        "cpu": ["onnxruntime"],
        "gpu": ["onnxruntime-gpu"],
        "trt": ["tensorrt", "cuda-python"],
        "trt-rtx": ["tensorrt-rtx", "cuda-python"],
        "export": ["torch", "onnx", "onnxscript", "safetensors"],
        "train": ["torch", "safetensors"],
        "plot": ["matplotlib"],
        # hovle-edge quantize: reads and rewrites graphs (onnx), calibrates on ONNX Runtime; no torch
        "quantize": ["onnx", "onnxruntime"],
        # benchmarks/peer_cpu.py: onnxruntime-genai and its model builder as the peer (never the runtime's)
        "bench": ["onnxruntime-genai", "transformers", "torch"],
        "serve": ["starlette", "uvicorn"],
        # tensorrt-rtx builds engines ahead of time on CPU-only machines, so its real builder is tested everywhere
        "test": ["pytest", "transformers", "sentencepiece", "mistral-common", "matplotlib", "openai", "starlette",
                 "uvicorn", "tensorrt-rtx"],
    },
    entry_points={"console_scripts": ["hovle-edge=hovle_edge.cli:main"]},
)
