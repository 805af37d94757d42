"""An emulated GPU for the TensorRT builder and backend where no GPU is: stand-ins for `tensorrt_rtx`
and `cuda.bindings.runtime` with the calls hovle-edge makes. "Device memory" is host memory handed out
by cudaMalloc; an "engine" is the ONNX graph's path plus the optimization profiles it was built with,
and runs on ONNX Runtime (CPU). What the stand-ins check is what a real GPU would punish: every input
shape inside the selected profile, every tensor given an address, no output written over an input it
reads, no copy outside an allocation. They also count allocations and copies, so tests can show that
a decode step allocates nothing and only the logits come back to the host. TensorRT for RTX's runtime
cache is a set of "kernels" (graph, profile) compiled the first time a context runs them unless the
cache it was given already holds them; `tensorrt_rtx.compiled` lists each compilation.

This tests our code's use of the API, not TensorRT: the GPU test in test_engines.py runs the real one."""

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import json
import os
import types

import numpy as np

ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


class Memory:
    """cudaMalloc'd buffers (kept alive here) and a log of what was allocated and copied."""

    def __init__(self):
        self.buffers: dict[int, np.ndarray] = {}
        self.allocations = 0
        self.to_host: list[int] = []  # bytes of each device-to-host copy
        self.to_device: list[int] = []

    def allocate(self, nbytes: int) -> int:
        buffer = np.zeros(max(nbytes, 1), dtype=np.uint8)
        self.buffers[buffer.ctypes.data] = buffer
        self.allocations += 1
        return buffer.ctypes.data

    def region(self, pointer: int, nbytes: int) -> tuple[int, int]:
        """The allocation holding [pointer, pointer + nbytes); fails on any stray device address."""
        for start, buffer in self.buffers.items():
            if start <= pointer and pointer + nbytes <= start + buffer.nbytes:
                return start, start + buffer.nbytes
        raise AssertionError(f"device address {pointer:#x} (+{nbytes} bytes) is not inside an allocation")

    def read(self, pointer: int, shape: tuple, dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if nbytes == 0:
            return np.zeros(shape, dtype)
        self.region(pointer, nbytes)
        raw = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(pointer))
        return raw.view(dtype).reshape(shape).copy()


def cuda_runtime(memory: Memory, name: str = "Emulated GPU", capability: tuple[int, int] = (8, 9)):
    """A stand-in for cuda.bindings.runtime: calls return (error, *values) as cuda-python's do."""
    ok = 0
    rt = types.ModuleType("cuda.bindings.runtime")
    rt.cudaError_t = types.SimpleNamespace(cudaSuccess=ok)
    rt.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice="h2d", cudaMemcpyDeviceToHost="d2h",
                                              cudaMemcpyDeviceToDevice="d2d")

    def memcpy(destination, source, nbytes, kind, stream):
        if kind == "h2d":
            memory.region(destination, nbytes)
            memory.to_device.append(nbytes)
        else:
            memory.region(source, nbytes)
            memory.to_host.append(nbytes)
        ctypes.memmove(destination, source, nbytes)
        return (ok,)

    def memcpy_2d(destination, destination_pitch, source, source_pitch, width, height, kind, stream):
        """Rows of `width` bytes, `height` of them, each at its pitch on either side."""
        assert width <= destination_pitch and width <= source_pitch, "a row wider than its pitch"
        for row in range(height):
            to, come = destination + row * destination_pitch, source + row * source_pitch
            if kind != "h2d":
                memory.region(come, width)
            if kind != "d2h":
                memory.region(to, width)
            ctypes.memmove(to, come, width)
        if kind == "d2h":
            memory.to_host.append(width * height)
        elif kind == "h2d":
            memory.to_device.append(width * height)
        return (ok,)

    rt.cudaMemcpy2DAsync = memcpy_2d
    rt.cudaMalloc = lambda nbytes: (ok, memory.allocate(nbytes))
    rt.cudaFree = lambda pointer: (ok,) if memory.buffers.pop(pointer, None) is not None else ("cudaErrorInvalidValue",)
    rt.cudaMemcpyAsync = memcpy
    rt.cudaStreamCreate = lambda: (ok, 1)
    rt.cudaStreamSynchronize = lambda stream: (ok,)
    rt.cudaStreamDestroy = lambda stream: (ok,)
    rt.cudaGetDeviceProperties = lambda device: (ok, types.SimpleNamespace(name=name.encode(), major=capability[0],
                                                                           minor=capability[1]))
    return rt


class RuntimeCache:
    """TensorRT for RTX's runtime cache: the kernels compiled so far, serialized as JSON."""

    def __init__(self):
        self.kernels: set[str] = set()

    def serialize(self) -> bytes:
        return json.dumps({"emulated runtime cache": sorted(self.kernels)}).encode()

    def deserialize(self, blob) -> bool:
        try:
            self.kernels |= set(json.loads(bytes(blob))["emulated runtime cache"])
        except (ValueError, KeyError):
            return False  # as TensorRT for RTX: a cache that does not fit is refused, not an error
        return True


class RuntimeConfig:
    def __init__(self):
        self.cache = None

    def create_runtime_cache(self) -> RuntimeCache:
        return RuntimeCache()

    def set_runtime_cache(self, cache: RuntimeCache) -> bool:
        self.cache = cache
        return True


class Engine:
    def __init__(self, blob: bytes, memory: Memory, ran: list, compiled: list):
        data = json.loads(blob)
        self.onnx, self.profiles = data["onnx"], data["profiles"]
        self.memory, self.ran, self.compiled = memory, ran, compiled

    def create_runtime_config(self) -> RuntimeConfig:
        return RuntimeConfig()

    def create_execution_context(self, runtime_config: RuntimeConfig | None = None):
        return Context(self, runtime_config.cache if runtime_config else None)


class Context:
    def __init__(self, engine: Engine, runtime_cache: RuntimeCache | None = None):
        import onnxruntime as ort

        from hovle_edge.runtime.ort_threads import session_options

        self.engine, self.runtime_cache = engine, runtime_cache
        self.session = ort.InferenceSession(engine.onnx, session_options(ort), providers=["CPUExecutionProvider"])
        self.input_types = {i.name: ORT_TYPES[i.type] for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.profile, self.shapes, self.addresses, self.results = None, {}, {}, None

    def set_optimization_profile_async(self, index: int, stream) -> bool:
        assert 0 <= index < len(self.engine.profiles), f"profile {index} of {len(self.engine.profiles)}"
        self.profile, self.results = index, None
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        assert name in self.input_types, f"{name} is not an input of {self.engine.onnx}"
        self.shapes[name], self.results = tuple(shape), None
        return True

    def set_tensor_address(self, name: str, pointer: int) -> bool:
        self.addresses[name] = pointer
        return True

    def _run(self) -> dict:
        if self.results is None:
            assert self.profile is not None, "no optimization profile selected"
            ranges = self.engine.profiles[self.profile]
            feeds = {}
            for name, dtype in self.input_types.items():
                shape = self.shapes[name]
                low, _, high = ranges[name]
                assert all(a <= s <= b for a, s, b in zip(low, shape, high)), f"{name} {shape} outside {low}..{high}"
                feeds[name] = self.engine.memory.read(self.addresses[name], shape, dtype)
            self.results = dict(zip(self.output_names, self.session.run(None, feeds)))
            self._compile(f"{os.path.basename(self.engine.onnx)}:{self.profile}")
        return self.results

    def _compile(self, kernel: str) -> None:
        """JIT compilation on first use, skipped when the runtime cache already holds the kernel."""
        if self.runtime_cache is not None and kernel in self.runtime_cache.kernels:
            return
        self.engine.compiled.append(kernel)
        if self.runtime_cache is not None:
            self.runtime_cache.kernels.add(kernel)

    def get_tensor_shape(self, name: str):
        return self._run()[name].shape

    def execute_async_v3(self, stream) -> bool:
        results, memory = self._run(), self.engine.memory
        read = [memory.region(self.addresses[n], 1) for n in self.input_types
                if np.prod(self.shapes[n]) > 0]
        for name, value in results.items():
            pointer = self.addresses[name]
            written = memory.region(pointer, value.nbytes)
            assert written not in read, f"{name} is written into a buffer this call reads"
            ctypes.memmove(pointer, np.ascontiguousarray(value).ctypes.data, value.nbytes)
        self.engine.ran.append((os.path.basename(self.engine.onnx), self.profile))
        self.results = None
        return True


def tensorrt_rtx(memory: Memory, ran: list):
    """A stand-in for tensorrt_rtx: strongly typed (no FP16 builder flag), with a timing cache."""
    trt = types.ModuleType("tensorrt_rtx")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt_rtx", None)
    trt.__version__ = "1.2.0-emulated"
    trt.compiled = []  # every kernel compiled just in time, in order
    trt.ComputeCapability = enum.Enum("ComputeCapability", ["NONE", "CURRENT", "SM75", "SM80", "SM86", "SM89",
                                                            "SM120"])

    class Logger:
        WARNING = 2

        def __init__(self, level=None):
            pass

    class ILogger:
        Severity = enum.IntEnum("Severity", ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"])

        def __init__(self):
            pass

    class Network:
        path = None

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            self.network.path = path
            return os.path.isfile(path)

    class OptimizationProfile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            assert all(a <= b <= c for a, b, c in zip(low, opt, high)), (name, low, opt, high)
            self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

    class TimingCache:
        def __init__(self, data: bytes):
            self.data = data

        def serialize(self):
            return b"emulated timing cache"

    class Config:
        def __init__(self):
            self.profiles, self.timing = [], None
            self.num_compute_capabilities, self.capabilities = 0, {}  # as the real one: none until set

        def set_compute_capability(self, capability, index):
            assert 0 <= index < self.num_compute_capabilities, (index, self.num_compute_capabilities)
            self.capabilities[index] = capability.name
            return True

        def set_memory_pool_limit(self, pool, size):
            pass

        def add_optimization_profile(self, profile):
            self.profiles.append(profile.shapes)

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.timing = cache

        def get_timing_cache(self):
            return self.timing

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return OptimizationProfile()

        def build_serialized_network(self, network, config):
            return json.dumps({"onnx": network.path, "profiles": config.profiles,
                               "compute_capabilities": [config.capabilities[i] for i in sorted(config.capabilities)]}).encode()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return Engine(blob, memory, ran, trt.compiled)

    trt.Logger, trt.ILogger, trt.OnnxParser, trt.Builder, trt.Runtime = Logger, ILogger, Parser, Builder, Runtime
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.BuilderFlag = types.SimpleNamespace()  # strongly typed: precision comes from the graph
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    return trt


def install(monkeypatch) -> tuple[Memory, list]:
    """Put the stand-ins where `import tensorrt_rtx` and `from cuda.bindings import runtime` find them;
    returns the memory log and the list of (graph file, profile index) each execution appends to."""
    memory, ran = Memory(), []
    runtime = cuda_runtime(memory)
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = runtime
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings
    for name, module in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", runtime),
                         ("tensorrt_rtx", tensorrt_rtx(memory, ran))):
        monkeypatch.setitem(__import__("sys").modules, name, module)
    return memory, ran
