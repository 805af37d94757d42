"""Backends run the graphs of a model folder: named arrays in, named arrays out, opened and closed as
a context manager. ONNX Runtime here (CPU, CUDA and TensorRT execution providers); onnxruntime is
imported only when a backend is made, so the rest of the runtime imports without it."""

from __future__ import annotations

import os

import numpy as np

from hovle_edge.errors import HoVLEError
from hovle_edge.spec import GRAPHS, Manifest

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
}
OPTIMIZED_CACHE = ".ort-optimized"  # optimized graphs are cached here, next to the model


class BackendError(HoVLEError):
    """A backend that cannot run here: a missing package, provider or device."""


class OnnxRuntimeBackend:
    """One ONNX Runtime session per graph. On CUDA, values named in `device_outputs` stay on the GPU
    as OrtValues and can be fed back as inputs without a copy to the host (IO binding)."""

    def __init__(self, manifest: Manifest, device: str = "cpu", threads: int | None = None,
                 cache_optimized: bool = True):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendError("onnxruntime is not installed: pip install 'hovle-edge[cpu]' (or [gpu])") from e
        if device not in PROVIDERS:
            raise BackendError(f"device {device!r}: choose one of {', '.join(PROVIDERS)}")
        wanted = PROVIDERS[device][0]
        if wanted not in ort.get_available_providers():
            raise BackendError(f"{wanted} is not available in this onnxruntime ({ort.__version__}; available: "
                               f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu for CUDA")
        self.ort = ort
        self.device = device
        self.on_device = device != "cpu"
        self.sessions = {}
        for name in GRAPHS:
            options = self._options(threads)
            if cache_optimized:
                self._cache_optimized(options, manifest, name)
            session = ort.InferenceSession(manifest.graph_path(name), options, providers=PROVIDERS[device])
            if session.get_providers()[0] != wanted:  # onnxruntime falls back silently when CUDA libs are missing
                raise BackendError(f"{name}.onnx: asked for {wanted} but onnxruntime gave "
                                   f"{session.get_providers()}; check the CUDA and cuDNN libraries")
            self.sessions[name] = session

    def _options(self, threads: int | None):
        options = self.ort.SessionOptions()
        options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        return options

    def _cache_optimized(self, options, manifest: Manifest, name: str) -> None:
        """Keep ONNX Runtime's optimized graph beside the model for inspection and reuse; skipped when
        the folder is read-only (a model on read-only media still runs)."""
        folder = os.path.join(manifest.directory, OPTIMIZED_CACHE)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError:
            return
        if not os.access(folder, os.W_OK):
            return
        stem = f"{name}.{self.device}.{self.ort.__version__}"
        options.optimized_model_filepath = os.path.join(folder, f"{stem}.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{stem}.onnx.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")

    def run(self, graph: str, feeds: dict, device_outputs=()) -> dict:
        session = self.sessions[graph]
        if not self.on_device:
            names = [o.name for o in session.get_outputs()]
            return dict(zip(names, session.run(names, feeds)))
        binding = session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, self.ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        outputs = [o.name for o in session.get_outputs()]
        for name in outputs:
            binding.bind_output(name, "cuda" if name in device_outputs else "cpu")
        session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {name: value if name in device_outputs else value.numpy() for name, value in zip(outputs, values)}

    def close(self) -> None:
        self.sessions.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_backend(name: str, manifest: Manifest, device: str = "cpu", threads: int | None = None):
    if name == "onnxruntime":
        return OnnxRuntimeBackend(manifest, device=device, threads=threads)
    raise BackendError(f"backend {name!r}: choose onnxruntime")
