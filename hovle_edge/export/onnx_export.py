"""Export one GraphSpec to ONNX with its weights as external data, named dims as in the contract, and
the op check. The exporter's own structure-only checks run on the graph without its weights, so the
2 GB protobuf limit never applies."""

from __future__ import annotations

import logging
import math
import re
import warnings

import onnx
import torch

from hovle_edge.errors import ExportError
from hovle_edge.export.graphs import GraphSpec
from hovle_edge.export.ops import check_ops

ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16, "int64": onnx.TensorProto.INT64}


def export_graph(graph: GraphSpec, path: str, opset: int) -> int:
    """Write `path` and `path`.data; raise ExportError if the graph breaks the contract. Returns the
    number of weight values the graph holds."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                graph.module, graph.example_inputs(), dynamo=True, opset_version=opset,
                input_names=[t.name for t in graph.inputs], output_names=[t.name for t in graph.outputs],
                dynamic_shapes=graph.dynamic_shapes(), optimize=True, verbose=False)
        except Exception as e:  # torch.export raises many kinds; all mean the graph could not be made
            raise ExportError(f"{graph.name}: torch.onnx.export failed: {str(e).splitlines()[0]}") from e
        program.save(path, external_data=True)
    model = onnx.load(path, load_external_data=False)
    name_dims(model, graph)
    check_io(model, graph, path)
    check_ops(model, opset, path)
    onnx.save_model(model, path)
    onnx.checker.check_model(path)  # by path: external weights are checked in place, never loaded
    return sum(math.prod(t.dims) for t in model.graph.initializer)


def name_dims(model, graph: GraphSpec) -> None:
    """Replace the exporter's symbols (s12, 's3 + s7') by the contract's names everywhere."""
    symbols = {}
    for value, spec in zip(model.graph.input, graph.inputs):
        for dim, name in zip(value.type.tensor_type.shape.dim, spec.dims):
            if isinstance(name, str) and dim.dim_param:
                symbols[dim.dim_param] = name
    pattern = re.compile(r"\bs\d+\b")

    def rename(dim_param: str) -> str:
        return pattern.sub(lambda m: symbols.get(m.group(0), m.group(0)), dim_param)

    for value in list(model.graph.value_info) + list(model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = rename(dim.dim_param)
    for values, specs in ((model.graph.input, graph.inputs), (model.graph.output, graph.outputs)):
        for value, spec in zip(values, specs):
            for dim, name in zip(value.type.tensor_type.shape.dim, spec.dims):
                if isinstance(name, str):
                    dim.dim_param = name


def check_io(model, graph: GraphSpec, where: str) -> None:
    for kind, values, specs in (("input", model.graph.input, graph.inputs), ("output", model.graph.output, graph.outputs)):
        got = [(v.name, v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim)) for v in values]
        want = [(s.name, ONNX_DTYPES[s.dtype], len(s.dims)) for s in specs]
        if got != want:
            raise ExportError(f"{where}: graph {kind}s {got} do not match the contract {want}")
    for value, spec in zip(model.graph.output, graph.outputs):
        for dim, name in zip(value.type.tensor_type.shape.dim, spec.dims):
            if isinstance(name, int) and dim.dim_value not in (0, name):
                raise ExportError(f"{where}: output {spec.name} has size {dim.dim_value} where {name} is expected")
