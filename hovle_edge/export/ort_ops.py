"""A small writer of ONNX graphs with onnx.helper, for the `onnxruntime` target: nodes, weights and
constants by name, and ONNX Runtime's contrib ops (domain com.microsoft) beside the standard ones.
It knows nothing of HoVLE; ort_graphs.py says what the graphs compute."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hovle_edge.spec import TensorSpec

MICROSOFT = "com.microsoft"
ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64,
               "int32": TensorProto.INT32}


class GraphWriter:
    """Collects one graph's nodes, initializers and I/O; every float weight is stored in `dtype`.
    Initializers go straight into the ModelProto that model() returns: building a GraphProto and a
    ModelProto from lists would copy every weight twice (13.7 GiB for HoVLE 2.6B's fp16 export)."""

    def __init__(self, name: str, dtype: str):
        self.name = name
        self.dtype = dtype
        self.proto = onnx.ModelProto()
        self.nodes: list = []
        self.inputs: list = []
        self.outputs: list = []
        self._constants: dict = {}
        self._count = 0

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
        self.proto.graph.initializer.add().CopyFrom(numpy_helper.from_array(array, name))  # the only kept copy

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
