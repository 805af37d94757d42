"""Backends run the graphs of a model folder: named arrays in, named arrays out, opened and closed as
a context manager. ONNX Runtime here (CPU, CUDA and TensorRT execution providers); onnxruntime is
imported only when a backend is made, so the rest of the runtime imports without it."""

from __future__ import annotations

import numpy as np

from hovle_edge.errors import HoVLEError
from hovle_edge.spec import BATCH, GRAPHS, IN_PLACE, SEQUENCE, Manifest
from hovle_edge.runtime.ort_cache import open_session
from hovle_edge.runtime.ort_threads import session_options

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
}


class BackendError(HoVLEError):
    """A backend that cannot run here: a missing package, provider or device."""


class OnnxRuntimeBackend:
    """One ONNX Runtime session per graph. On CUDA, values named in `device_outputs` stay on the GPU
    as OrtValues and can be fed back as inputs without a copy to the host (IO binding)."""

    def __init__(self, manifest: Manifest, device: str = "cpu", threads: int | None = None):
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
        self.kv_present = manifest.kv_present
        self.max_context = manifest.max_context
        self.kv_itemsize = np.dtype(manifest.kv_dtype).itemsize
        self.specs = {name: manifest.graph_io(name) for name in GRAPHS}
        self.outputs = {name: [s.name for s in self.specs[name][1]] for name in GRAPHS}
        for name in GRAPHS:
            session = self._session(manifest, name, threads)
            if session.get_providers()[0] != wanted:  # onnxruntime falls back silently when CUDA libs are missing
                raise BackendError(f"{name}.onnx: asked for {wanted} but onnxruntime gave "
                                   f"{session.get_providers()}; check the CUDA and cuDNN libraries")
            self.sessions[name] = session

    def _session(self, manifest: Manifest, name: str, threads: int | None):
        """A session for one graph, optimized in memory from the hashed graph at every start (ort_cache.py
        says why no optimized copy is kept on disk)."""
        return open_session(self.ort, manifest.graph_path(name), self._options(threads), PROVIDERS[self.device])

    def _options(self, threads: int | None):
        return session_options(self.ort, threads)  # one pool for the graphs that take turns (ort_threads.py)

    # KV buffers. On CPU a buffer is a numpy array (wrapped as an OrtValue over the same memory when
    # the graph writes it in place); on CUDA an OrtValue in device memory.

    def kv_buffers(self, graph: str, batch: int, capacity: int) -> dict:
        pasts = [s for s in self.specs[graph][0] if s.name.startswith("past_key_values.")]
        buffers = KVBuffers()
        for spec in pasts:
            shape = (batch, spec.dims[1], capacity, spec.dims[3])
            if self.on_device:
                buffers[spec.name] = self.ort.OrtValue.ortvalue_from_shape_and_type(shape, spec.dtype, "cuda", 0)
            else:
                buffers[spec.name] = np.zeros(shape, dtype=spec.dtype)
            buffers.ort_values[spec.name] = self._ortvalue(buffers[spec.name])
        return buffers

    def read_kv(self, buffer, length: int) -> np.ndarray:
        """A host copy of the first `length` slots."""
        array = buffer.numpy() if self.on_device else buffer
        return np.array(array[:, :, :length])

    def write_kv(self, buffer, rows, start: int) -> None:
        """`rows` [B, kvh, n, d] (host array, or an OrtValue on the device) into slots start..start+n-1."""
        if not self.on_device:
            buffer[:, :, start:start + rows.shape[2]] = rows
            return
        from hovle_edge.runtime.device_copy import copy_rows

        source = rows if isinstance(rows, self.ort.OrtValue) else self.ort.OrtValue.ortvalue_from_numpy(
            np.ascontiguousarray(rows), "cuda", 0)
        copy_rows(buffer.data_ptr(), tuple(buffer.shape()), source.data_ptr(), tuple(source.shape()), start,
                  self.kv_itemsize)

    def run(self, graph: str, feeds: dict, kv: dict | None = None, device_outputs=()) -> dict:
        """Run `graph` on `feeds`; with `kv` (this graph's buffers, from kv_buffers) the pasts are
        those buffers and this call's rows end up in them at slots T-S..T-1. Returns every other
        output, host arrays except `device_outputs` on a GPU."""
        session = self.sessions[graph]
        in_place = kv is not None and self.kv_present == IN_PLACE
        if not self.on_device and not in_place:
            names = self.outputs[graph]
            values = dict(zip(names, session.run(names, {**feeds, **(kv or {})})))
            return self._store_rows(graph, feeds, kv, values)
        if in_place:
            binding = kv.binding(session)  # pasts and presents bound once, for the cache's life
        else:
            binding = session.io_binding()
            for name, value in (kv.ort_values if kv else {}).items():
                binding.bind_ortvalue_input(name, value)
        for name, value in feeds.items():
            if isinstance(value, self.ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        names = [n for n in self.outputs[graph] if not (in_place and n.startswith("present."))]
        host = {} if self.on_device else self._host_outputs(graph, names, feeds)
        for name in names:  # a name bound again keeps its place in the binding's outputs
            if name in host:
                binding.bind_ortvalue_output(name, self.ort.OrtValue.ortvalue_from_numpy(host[name]))
            else:
                on_gpu = name in device_outputs or name.startswith("present.")
                binding.bind_output(name, "cuda" if on_gpu else "cpu")
        session.run_with_iobinding(binding)
        if host:
            values = host  # the graph wrote into these arrays: no output to fetch or copy
        else:  # this call's outputs are the binding's last ones (the buffers bound once come first)
            values = {}
            for name, value in zip(names, binding.get_outputs()[-len(names):]):
                keep = name in device_outputs or name.startswith("present.")
                values[name] = value if keep else value.numpy()
        return self._store_rows(graph, feeds, kv, values)

    def _host_outputs(self, graph: str, names: list[str], feeds: dict) -> dict:
        """Fresh host arrays for a CPU call's outputs (never reused: a caller may keep them), shaped from
        the contract's dims; the graph writes into them through the binding."""
        batch, sequence = np.shape(feeds["position_ids"])
        sizes = {BATCH: batch, SEQUENCE: sequence}
        return {s.name: np.empty(tuple(sizes.get(d, d) for d in s.dims), dtype=s.dtype)
                for s in self.specs[graph][1] if s.name in names}

    def _ortvalue(self, buffer):
        return buffer if isinstance(buffer, self.ort.OrtValue) else self.ort.OrtValue.ortvalue_from_numpy(buffer)

    def _store_rows(self, graph: str, feeds: dict, kv: dict | None, values: dict) -> dict:
        """new_rows graphs: write each present into its buffer after the slots already in use."""
        if kv is None or self.kv_present == IN_PLACE:
            return values
        total = feeds["attention_mask"].shape[1]
        for name, buffer in kv.items():
            rows = values.pop(name.replace("past_key_values.", "present."))
            self.write_kv(buffer, rows, total - rows.shape[2])
        return values

    def close(self) -> None:
        self.sessions.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class KVBuffers(dict):
    """One graph's KV buffers by input name, with the OrtValue over each buffer's memory made once beside
    it (`ort_values`): made afresh at every token, the 2 x layers wrappers of a step cost about a
    millisecond of Python (w512, 16 layers). They go with the buffers."""

    def __init__(self):
        super().__init__()
        self.ort_values = {}
        self._binding = None

    def binding(self, session):
        """The session's IOBinding with every buffer bound as both past and present (the graph writes its
        new rows in place), made at the first call: a later call binds only its feeds and outputs, where
        binding the 4 x layers KV values again cost more Python than anything else in a step."""
        if self._binding is None:
            self._binding = session.io_binding()
            for name, value in self.ort_values.items():
                self._binding.bind_ortvalue_input(name, value)
                self._binding.bind_ortvalue_output(name.replace("past_key_values.", "present."), value)
        return self._binding


BACKENDS = ("onnxruntime", "tensorrt")


def make_backend(name: str, manifest: Manifest, device: str = "cpu", threads: int | None = None):
    """onnxruntime (device cpu, cuda or tensorrt: its execution providers) or tensorrt (engines
    built by `hovle-edge build`, on the GPU)."""
    if name == "onnxruntime":
        return OnnxRuntimeBackend(manifest, device=device, threads=threads)
    if name == "tensorrt":
        if device == "cpu":
            raise BackendError("the tensorrt backend runs on the GPU: choose device cuda", setting="device")
        from hovle_edge.runtime.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(manifest)
    raise BackendError(f"backend {name!r}: choose one of {', '.join(BACKENDS)}")
