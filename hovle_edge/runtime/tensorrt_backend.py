"""The TensorRT backend: engines built by `hovle-edge build`, run with named tensors
(`set_input_shape`, `set_tensor_address`, `execute_async_v3`) on one CUDA stream through cuda-python.
Every buffer is allocated once at its largest shape; each KV cache has two full-capacity buffers per
tensor that swap roles between past and present, so a decode step allocates nothing and copies no
cache to the host (only the logits come back). tensorrt / tensorrt_rtx and cuda-python are imported
only when this backend is made."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from hovle_edge.engines.cache import check_compatible, read_engines
from hovle_edge.engines.flavours import compute_capability, import_flavour
from hovle_edge.engines.profiles import Limits, Profile, choose_profile
from hovle_edge.files import sha256_file
from hovle_edge.runtime.backends import BackendError
from hovle_edge.spec import GRAPHS, Manifest

ITEM_BYTES = {"float32": 4, "float16": 2, "int64": 8}


@dataclass
class DeviceTensor:
    """A tensor living in a device buffer: what the backend hands back for outputs kept on the GPU."""

    pointer: int
    shape: tuple
    dtype: str


def check(result):
    """cuda-python calls return (error, *values); raise on an error, return the values."""
    from cuda.bindings import runtime as cudart

    error, *values = result if isinstance(result, tuple) else (result,)
    if error != cudart.cudaError_t.cudaSuccess:
        raise BackendError(f"CUDA error {error}")
    return values[0] if len(values) == 1 else values


class TensorRTBackend:
    def __init__(self, manifest: Manifest, engine_dir: str | None = None, device: str = "cuda"):
        from cuda.bindings import runtime as cudart

        self.cudart = cudart
        self.directory = engine_dir or manifest.directory
        self.record = read_engines(self.directory)
        trt = import_flavour(self.record["flavour"])
        gpu, capability = compute_capability()
        check_compatible(self.record, self.record["flavour"], trt.__version__, capability, self.directory)
        self.limits = Limits(**self.record["limits"])
        self.stream = check(cudart.cudaStreamCreate())
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, self.contexts, self.profiles, self.specs = {}, {}, {}, {}
        self.buffers: dict[tuple[str, str], int] = {}  # (graph, tensor) -> device pointer, inputs and host-bound outputs
        # (graph, present name) -> the two buffers it alternates between. Keyed by graph too: the
        # embedding and the decoder both name their caches present.{i}.key|value.
        self.kv_pairs: dict[tuple[str, str], tuple[int, int]] = {}
        for graph in GRAPHS:
            entry = self.record["engines"][graph]
            path = os.path.join(self.directory, entry["file"])
            if sha256_file(path) != entry["sha256"]:
                raise BackendError(f"{path}: sha256 does not match engines.json; rebuild the engines")
            with open(path, "rb") as f:
                engine = runtime.deserialize_cuda_engine(f.read())
            if engine is None:
                raise BackendError(f"{path}: TensorRT could not load it; rebuild the engines here")
            self.engines[graph] = engine
            self.contexts[graph] = engine.create_execution_context()
            self.profiles[graph] = [Profile(p["name"], {k: tuple(v) for k, v in p["dims"].items()})
                                    for p in entry["profiles"]]
            self.specs[graph] = manifest.graph_io(graph)
            self._allocate(graph)
        self.on_device = True

    def _largest(self, spec, graph: str) -> int:
        dims = {}
        for profile in self.profiles[graph]:
            for name, (_, _, high) in profile.dims.items():
                dims[name] = max(dims.get(name, 0), high)
        dims["total_sequence"] = max(dims.get("total_sequence", 0), self.limits.max_context)
        return int(np.prod([d if isinstance(d, int) else max(dims.get(d, 1), 1) for d in spec.dims]))

    def _allocate(self, graph: str) -> None:
        inputs, outputs = self.specs[graph]
        for spec in inputs + outputs:
            nbytes = self._largest(spec, graph) * ITEM_BYTES[spec.dtype]
            if spec.name.startswith("present."):
                self.kv_pairs[(graph, spec.name)] = (check(self.cudart.cudaMalloc(nbytes)),
                                                     check(self.cudart.cudaMalloc(nbytes)))
            elif not spec.name.startswith("past_key_values."):  # pasts are the presents' buffers
                self.buffers[(graph, spec.name)] = check(self.cudart.cudaMalloc(max(nbytes, 1)))

    def run(self, graph: str, feeds: dict, device_outputs=()) -> dict:
        cudart = self.cudart
        context = self.contexts[graph]
        inputs, outputs = self.specs[graph]
        sizes = {}
        for spec in inputs:
            value = feeds[spec.name]
            shape = value.shape
            for dim, size in zip(spec.dims, shape):
                if isinstance(dim, str):
                    sizes[dim] = size
        context.set_optimization_profile_async(choose_profile(self.profiles[graph], sizes), self.stream)
        used = set()
        for spec in inputs:
            value = feeds[spec.name]
            if isinstance(value, DeviceTensor):
                pointer = value.pointer
                used.add(pointer)
            elif spec.name.startswith("past_key_values."):  # an empty past at prefill: any valid address
                pointer = self.kv_pairs[(graph, spec.name.replace("past_key_values.", "present."))][0]
            else:
                pointer = self.buffers[(graph, spec.name)]
                host = np.ascontiguousarray(value, dtype=spec.dtype)
                if host.nbytes:
                    check(cudart.cudaMemcpyAsync(pointer, host.ctypes.data, host.nbytes,
                                                 cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
            context.set_input_shape(spec.name, tuple(value.shape))
            context.set_tensor_address(spec.name, pointer)
        results = {}
        for spec in outputs:
            shape = tuple(context.get_tensor_shape(spec.name))
            if (graph, spec.name) in self.kv_pairs:
                first, second = self.kv_pairs[(graph, spec.name)]
                pointer = second if first in used else first  # never overwrite the past it reads
            else:
                pointer = self.buffers[(graph, spec.name)]
            results[spec.name] = DeviceTensor(pointer, shape, spec.dtype)
            context.set_tensor_address(spec.name, pointer)
        if not context.execute_async_v3(self.stream):
            raise BackendError(f"{graph}: TensorRT execution failed")
        for name, tensor in list(results.items()):
            if name in device_outputs:
                continue
            host = np.empty(tensor.shape, dtype=tensor.dtype)
            check(cudart.cudaMemcpyAsync(host.ctypes.data, tensor.pointer, host.nbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
            results[name] = host
        check(cudart.cudaStreamSynchronize(self.stream))
        return results

    def close(self) -> None:
        if not getattr(self, "engines", None):
            return
        for pointer in list(self.buffers.values()) + [p for pair in self.kv_pairs.values() for p in pair]:
            self.cudart.cudaFree(pointer)
        self.buffers.clear()
        self.kv_pairs.clear()
        self.contexts.clear()
        self.engines.clear()
        self.cudart.cudaStreamDestroy(self.stream)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
