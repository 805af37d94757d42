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
            session = self._session(manifest, name, threads, cache_optimized)
            if session.get_providers()[0] != wanted:  # onnxruntime falls back silently when CUDA libs are missing
                raise BackendError(f"{name}.onnx: asked for {wanted} but onnxruntime gave "
                                   f"{session.get_providers()}; check the CUDA and cuDNN libraries")
            self.sessions[name] = session

    def _session(self, manifest: Manifest, name: str, threads: int | None, cache_optimized: bool):
        """A session for one graph. Its optimized form is cached beside the model, keyed by graph hash,
        device and onnxruntime version, and loaded without optimizing again next time; when the folder
        is read-only the model still runs, optimized in memory."""
        options = self._options(threads)
        path = manifest.graph_path(name)
        cached = self._cache_path(manifest, name) if cache_optimized else None
        if cached and os.path.isfile(cached):
            options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            try:
                return self.ort.InferenceSession(cached, options, providers=PROVIDERS[self.device])
            except Exception:  # a cache left broken by an interrupted run: drop it and optimize again
                for stale in (cached, cached + ".data"):
                    if os.path.exists(stale):
                        os.remove(stale)
                options = self._options(threads)
        if cached:
            options.optimized_model_filepath = cached
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             os.path.basename(cached) + ".data")
            options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        return self.ort.InferenceSession(path, options, providers=PROVIDERS[self.device])

    def _cache_path(self, manifest: Manifest, name: str) -> str | None:
        if self.device == "tensorrt":  # the TensorRT provider keeps its own engine cache
            return None
        folder = os.path.join(manifest.directory, OPTIMIZED_CACHE)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError:
            return None
        if not os.access(folder, os.W_OK):
            return None
        digest = manifest.data["files"][f"{name}.onnx"][:12]
        return os.path.join(folder, f"{name}.{self.device}.ort{self.ort.__version__}.{digest}.onnx")

    def _options(self, threads: int | None):
        options = self.ort.SessionOptions()
        options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        return options

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


BACKENDS = ("onnxruntime", "tensorrt")


def make_backend(name: str, manifest: Manifest, device: str = "cpu", threads: int | None = None):
    """onnxruntime (device cpu, cuda or tensorrt: its execution providers) or tensorrt (engines
    built by `hovle-edge build`, on the GPU)."""
    if name == "onnxruntime":
        return OnnxRuntimeBackend(manifest, device=device, threads=threads)
    if name == "tensorrt":
        if device == "cpu":
            raise BackendError("the tensorrt backend runs on the GPU: use --device cuda")
        from hovle_edge.runtime.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(manifest)
    raise BackendError(f"backend {name!r}: choose one of {', '.join(BACKENDS)}")
