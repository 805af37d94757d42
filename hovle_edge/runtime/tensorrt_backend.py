"""The TensorRT backend: engines built by `hovle-edge build`, run with named tensors
(`set_input_shape`, `set_tensor_address`, `execute_async_v3`) on one CUDA stream through cuda-python.
Every input and output buffer is allocated once at its largest shape when the engines load; a
conversation's KV caches are device buffers of its capacity, allocated when it starts. An engine
returns only a step's new KV rows, which one strided device copy writes into the cache, so a decode
step allocates nothing and copies no cache to the host (only the logits come back). tensorrt /
tensorrt_rtx and cuda-python are imported only when this backend is made."""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import numpy as np

from hovle_edge.engines.cache import check_compatible, read_engines
from hovle_edge.engines.flavours import compute_capability, import_flavour
from hovle_edge.engines.profiles import Limits, Profile, choose_profile
from hovle_edge.engines.runtime_cache import RuntimeCache, cache_path
from hovle_edge.files import resolve_inside
from hovle_edge.runtime.backends import BackendError
from hovle_edge.runtime.device_copy import copy_rows, read_rows
from hovle_edge.spec import GRAPHS, Manifest
from hovle_edge.verified_hashes import VerifiedHashes

ITEM_BYTES = {"float32": 4, "float16": 2, "int64": 8}


@dataclass
class DeviceTensor:
    """A tensor living in a device buffer: what the backend hands back for outputs kept on the GPU."""

    pointer: int
    shape: tuple
    dtype: str


class KVHandle(dict):
    """A conversation's cache buffers by past name; its device memory is freed when it goes away."""


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
        self.runtime_cache = RuntimeCache(cache_path(self.directory))  # TensorRT for RTX's JIT kernels
        self.engines, self.contexts, self.profiles, self.specs = {}, {}, {}, {}
        # (graph, tensor) -> device pointer of every input and output but the pasts. Keyed by graph
        # too: the embedding and the decoder both name their caches present.{i}.key|value.
        self.buffers: dict[tuple[str, str], int] = {}
        self.kv_allocations: set[int] = set()  # caches handed out and not yet freed
        self.max_context = self.limits.max_context
        hashes = VerifiedHashes(self.directory)  # an unchanged engine is not read twice to be hashed
        for graph in GRAPHS:
            entry = self.record["engines"][graph]
            path = resolve_inside(self.directory, entry["file"], "engines.json")
            if hashes.sha256(path) != entry["sha256"]:
                raise BackendError(f"{path}: sha256 does not match engines.json; rebuild the engines")
            with open(path, "rb") as f:
                engine = runtime.deserialize_cuda_engine(f.read())
            if engine is None:
                raise BackendError(f"{path}: TensorRT could not load it; rebuild the engines here")
            self.engines[graph] = engine
            self.contexts[graph] = self.runtime_cache.context(engine)
            self.profiles[graph] = [Profile(p["name"], {k: tuple(v) for k, v in p["dims"].items()})
                                    for p in entry["profiles"]]
            self.specs[graph] = manifest.graph_io(graph)
            self._allocate(graph)
        hashes.save()
        self.on_device = True

    def _largest(self, spec, graph: str) -> int:
        dims = {}
        for profile in self.profiles[graph]:
            for name, (_, _, high) in profile.dims.items():
                dims[name] = max(dims.get(name, 0), high)
        return int(np.prod([d if isinstance(d, int) else max(dims.get(d, 1), 1) for d in spec.dims]))

    def _allocate(self, graph: str) -> None:
        inputs, outputs = self.specs[graph]
        for spec in inputs + outputs:
            if not spec.name.startswith("past_key_values."):  # pasts are the conversations' caches
                nbytes = self._largest(spec, graph) * ITEM_BYTES[spec.dtype]
                self.buffers[(graph, spec.name)] = check(self.cudart.cudaMalloc(max(nbytes, 1)))

    # KV caches: one device buffer per past tensor, [batch, kv_heads, capacity, head_dim].

    def kv_buffers(self, graph: str, batch: int, capacity: int) -> dict:
        if capacity > self.max_context:
            raise BackendError(f"a cache of {capacity} tokens is more than the engines were built for "
                               f"({self.max_context})")
        buffers = {}
        for spec in self.specs[graph][0]:
            if spec.name.startswith("past_key_values."):
                shape = (batch, spec.dims[1], capacity, spec.dims[3])
                pointer = check(self.cudart.cudaMalloc(int(np.prod(shape)) * ITEM_BYTES[spec.dtype]))
                self.kv_allocations.add(pointer)
                buffers[spec.name] = DeviceTensor(pointer, shape, spec.dtype)
        handle = KVHandle(buffers)  # what the conversation's cache keeps; freed when it goes
        weakref.finalize(handle, self._free_kv, [b.pointer for b in buffers.values()])
        return handle

    def _free_kv(self, pointers: list[int]) -> None:
        for pointer in pointers:
            if pointer in self.kv_allocations:
                self.kv_allocations.discard(pointer)
                self.cudart.cudaFree(pointer)

    def read_kv(self, buffer: DeviceTensor, length: int) -> np.ndarray:
        batch, heads, _, head_dim = buffer.shape
        host = np.empty((batch, heads, length, head_dim), dtype=buffer.dtype)
        if length:
            read_rows(buffer.pointer, buffer.shape, host.ctypes.data, length, host.itemsize, self.stream)
        return host

    def write_kv(self, buffer: DeviceTensor, rows, start: int) -> None:
        """Host rows [B, kvh, n, d] into slots start..start+n-1 (restoring a snapshot)."""
        rows = np.ascontiguousarray(rows, dtype=buffer.dtype)
        if rows.shape[2]:
            copy_rows(buffer.pointer, buffer.shape, rows.ctypes.data, rows.shape, start, rows.itemsize,
                      self.stream, kind="host")
            check(self.cudart.cudaStreamSynchronize(self.stream))

    def run(self, graph: str, feeds: dict, kv: dict | None = None, device_outputs=()) -> dict:
        """Run `graph`; with `kv` (this graph's cache buffers) the step's new rows are written into the
        cache at slots T-S..T-1 and not returned."""
        cudart = self.cudart
        context = self.contexts[graph]
        inputs, outputs = self.specs[graph]
        values = {**feeds, **(kv or {})}
        sizes = {}
        for spec in inputs:
            for dim, size in zip(spec.dims, values[spec.name].shape):
                if isinstance(dim, str):
                    sizes[dim] = size
        context.set_optimization_profile_async(choose_profile(self.profiles[graph], sizes), self.stream)
        for spec in inputs:
            value = values[spec.name]
            if isinstance(value, DeviceTensor):
                pointer = value.pointer
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
            pointer = self.buffers[(graph, spec.name)]
            results[spec.name] = DeviceTensor(pointer, shape, spec.dtype)
            context.set_tensor_address(spec.name, pointer)
        if not context.execute_async_v3(self.stream):
            raise BackendError(f"{graph}: TensorRT execution failed")
        total = sizes.get("total_sequence", 0)
        for name, buffer in (kv or {}).items():
            rows = results.pop(name.replace("past_key_values.", "present."))
            copy_rows(buffer.pointer, buffer.shape, rows.pointer, rows.shape, total - rows.shape[2],
                      ITEM_BYTES[rows.dtype], self.stream)
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
        self.runtime_cache.save()  # the kernels compiled in this run, for the next start
        for pointer in list(self.buffers.values()) + list(self.kv_allocations):
            self.cudart.cudaFree(pointer)
        self.buffers.clear()
        self.kv_allocations.clear()
        self.contexts.clear()
        self.engines.clear()
        self.cudart.cudaStreamDestroy(self.stream)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
