"""A small writer of ONNX graphs with onnx.helper, for the `onnxruntime` target: nodes, weights and
constants by name, and ONNX Runtime's contrib ops (domain com.microsoft) beside the standard ones.
It knows nothing of HoVLE; ort_graphs.py says what the graphs compute."""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hovle_edge.spec import TensorSpec

MICROSOFT = "com.microsoft"
ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64,
               "int32": TensorProto.INT32}
EXTERNAL_BYTES = 1024  # smaller weights and constants stay inside the .onnx file
DATA_ALIGNMENT = 4096  # each external weight starts on a page, so ONNX Runtime can map it in place


class GraphWriter:
    """Collects one graph's nodes, initializers and I/O; every float weight is stored in `dtype`.

    With `data_path`, each weight's bytes are appended to that file the moment it is given (the
    ModelProto keeps only a reference: file, offset, length), so writing a graph holds one weight at a
    time beside the model it comes from; the 2.6B fp32 decoder held as a ModelProto was 7 GiB on top of
    PyTorch's 7 GiB. Without it, weights go straight into the ModelProto (a graph kept in memory)."""

    def __init__(self, name: str, dtype: str, data_path: str | None = None):
        self.name = name
        self.dtype = dtype
        self.proto = onnx.ModelProto()
        self.nodes: list = []
        self.inputs: list = []
        self.outputs: list = []
        self._constants: dict = {}
        self._count = 0
        self.data_path = data_path
        self._data = open(data_path, "wb") if data_path else None  # plain open(): the umask's mode, as other files

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._data is not None:
            self._data.close()

    def unique(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def input(self, spec: TensorSpec) -> str:
        self.inputs.append(helper.make_tensor_value_info(spec.name, ONNX_DTYPES[spec.dtype], list(spec.dims)))
        return spec.name

    def output(self, spec: TensorSpec) -> str:
        """Declare a graph output; the node that makes it must write to `spec.name`."""
        self.outputs.append(helper.make_tensor_value_info(spec.name, ONNX_DTYPES[spec.dtype], list(spec.dims)))
        return spec.name

    def weight(self, name: str, array: np.ndarray) -> str:
        """A float weight in the graph's dtype, under the checkpoint-like `name`."""
        self._initializer(np.ascontiguousarray(array, dtype=self.dtype), name)
        return name

    def _initializer(self, array: np.ndarray, name: str) -> None:
        tensor = self.proto.graph.initializer.add()
        if self._data is None or array.nbytes < EXTERNAL_BYTES:
            tensor.CopyFrom(numpy_helper.from_array(array, name))  # the only kept copy
            return
        offset = -self._data.tell() % DATA_ALIGNMENT + self._data.tell()
        self._data.seek(offset)
        self._data.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)  # little-endian, as ONNX stores
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", os.path.basename(self.data_path)), ("offset", str(offset)),
                           ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value

    def const(self, values, dtype=np.int64) -> str:
        """A small constant (shape, axis, scalar), written once however often it is asked for."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            name = self.unique(f"const_{array.dtype.name}")
            self._initializer(array, name)
            self._constants[key] = name
        return self._constants[key]

    def op(self, op_type: str, *inputs: str, outputs=1, out: str | list | None = None, domain: str = "", **attrs):
        """Add a node; returns its output name (or names, when `outputs` > 1 or `out` is a list).
        An empty string among `inputs` leaves an optional input out."""
        if out is None:
            names = [self.unique(op_type) for _ in range(outputs)]
        else:
            names = [out] if isinstance(out, str) else list(out)
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.unique(f"/{op_type}"),
                                           domain=domain, **attrs))
        return names[0] if len(names) == 1 and not isinstance(out, list) and outputs == 1 else names

    def model(self, opset: int) -> onnx.ModelProto:
        model, graph = self.proto, self.proto.graph
        graph.name = self.name
        graph.node.extend(self.nodes)
        graph.input.extend(self.inputs)
        graph.output.extend(self.outputs)
        model.opset_import.extend([helper.make_opsetid("", opset), helper.make_opsetid(MICROSOFT, 1)])
        model.producer_name = "hovle-edge"
        model.ir_version = min(onnx.IR_VERSION, 10)  # what onnxruntime 1.2x reads
        return model


def dim(w: GraphWriter, value: str, axis: int) -> str:
    """The size of `value` along `axis`, as an int64 tensor of shape [1]."""
    return w.op("Shape", value, start=axis, end=axis + 1)
