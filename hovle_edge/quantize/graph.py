"""The graph rewrite: every MatMul whose B is a constant 2-D float weight becomes a weight-only
quantized MatMul, in whichever flavour the exporter wrote the graph (torch.onnx's portable graphs or
onnx.helper's ONNX Runtime graphs): it only looks at MatMul nodes and their initializers, never at
the attention or the KV cache around them. Embeddings (Gather) are left alone; the output head (the
weight with `vocab` columns) only when asked.

Targets: `onnxruntime` writes com.microsoft.MatMulNBits; `tensorrt` writes standard
DequantizeLinear(INT4/INT8 codes, blocked scales) -> MatMul (opset 21), which TensorRT fuses into a
weight-only GEMM. An activation-aware scale s (per input channel) multiplies the weight's rows
before rounding and is undone by an explicit Mul(x, 1/s) before the MatMul, one per input tensor."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from hovle_edge.quantize.blocks import QuantizedWeight, codes_tensor, matmul_nbits_arrays, quantize_weight

TARGETS = ("onnxruntime", "tensorrt")
TENSORRT_OPSET = 21  # DequantizeLinear with INT4 and block_size
INT4_IR_VERSION = 10
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16)


@dataclass
class WeightMatMul:
    node: object  # onnx NodeProto
    weight: object  # its B initializer (TensorProto)

    @property
    def activation(self) -> str:
        return self.node.input[0]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.dims)


@dataclass
class GraphReport:
    matmuls: int = 0
    float_bytes: int = 0  # the replaced weights as they were
    quantized_bytes: int = 0  # their codes and scales


def weight_matmuls(model, vocab: int, quantize_head: bool) -> tuple[list[WeightMatMul], list[WeightMatMul]]:
    """(MatMuls to quantize, weight MatMuls kept in float) in graph order."""
    initializers = {t.name: t for t in model.graph.initializer}
    chosen, kept = [], []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        weight = initializers.get(node.input[1])
        if weight is None or len(weight.dims) != 2 or weight.data_type not in FLOAT_TYPES:
            continue
        is_head = weight.dims[1] == vocab
        (chosen if quantize_head or not is_head else kept).append(WeightMatMul(node, weight))
    return chosen, kept


def rewrite(model, matmuls: list[WeightMatMul], bits: int, group_size: int, target: str,
            input_scales: dict[str, np.ndarray] | None = None, clips: dict[str, np.ndarray] | None = None,
            accuracy_level: int = 0) -> GraphReport:
    """Replace `matmuls` in `model` (in place). `input_scales` maps an activation name to its AWQ
    scale s [K] and `clips` a weight name to its blocks' range ratios; without them a weight is
    quantized round-to-nearest."""
    input_scales, clips = input_scales or {}, clips or {}
    graph = model.graph
    report = GraphReport()
    replacements, inverse_scaled = {}, {}
    new_initializers = []
    for matmul in matmuls:
        node, weight = matmul.node, matmul.weight
        values = numpy_helper.to_array(weight)
        activation = matmul.activation
        before = []
        scale = input_scales.get(activation)
        if scale is not None:
            values = values * scale.astype(values.dtype)[:, None]
            if activation not in inverse_scaled:  # one Mul per activation, before its first MatMul
                inverse_scaled[activation] = f"{activation}/awq_scaled"
                name = f"{activation}/awq_inverse_scale"
                new_initializers.append(numpy_helper.from_array((1.0 / scale).astype(values.dtype), name))
                before.append(helper.make_node("Mul", [activation, name], [inverse_scaled[activation]],
                                               name=f"{node.name}/awq_mul"))
            activation = inverse_scaled[activation]
        quantized = quantize_weight(values, bits, group_size, f"MatMul {node.name} (weight {weight.name})",
                                    clips.get(weight.name))
        nodes, tensors = (matmul_nbits(node, activation, weight.name, quantized, accuracy_level) if target == "onnxruntime"
                          else dequantize_matmul(node, activation, weight.name, quantized))
        replacements[id(node)] = before + nodes
        new_initializers += tensors
        report.matmuls += 1
        report.float_bytes += values.nbytes
        report.quantized_bytes += quantized.nbytes
    nodes = []
    for node in graph.node:
        nodes += replacements.get(id(node), [node])
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_initializers)
    drop_unused_initializers(graph)
    set_opsets(model, target)
    return report


def matmul_nbits(node, activation: str, weight_name: str, weight: QuantizedWeight, accuracy_level: int):
    rows, cols = weight.shape
    packed, scales = matmul_nbits_arrays(weight)
    tensors = [numpy_helper.from_array(packed, f"{weight_name}/q{weight.bits}"),
               numpy_helper.from_array(scales, f"{weight_name}/scales")]
    quantized = helper.make_node("MatMulNBits", [activation, tensors[0].name, tensors[1].name], list(node.output),
                                 name=node.name, domain="com.microsoft", K=rows, N=cols, bits=weight.bits,
                                 block_size=weight.group_size, accuracy_level=accuracy_level)
    return [quantized], tensors


def dequantize_matmul(node, activation: str, weight_name: str, weight: QuantizedWeight):
    tensors = [codes_tensor(weight, f"{weight_name}/q{weight.bits}"),
               numpy_helper.from_array(weight.scales, f"{weight_name}/scales")]
    dequantized = f"{weight_name}/dequantized"
    nodes = [helper.make_node("DequantizeLinear", [tensors[0].name, tensors[1].name], [dequantized],
                              name=f"{node.name}/dequantize", axis=0, block_size=weight.group_size),
             helper.make_node("MatMul", [activation, dequantized], list(node.output), name=node.name)]
    return nodes, tensors


def used_names(graph) -> set[str]:
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:  # If/Loop bodies read outer initializers too
            for sub in [attribute.g] + list(attribute.graphs):
                names |= used_names(sub)
    return names | {o.name for o in graph.output}


def drop_unused_initializers(graph) -> None:
    used = used_names(graph)
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def set_opsets(model, target: str) -> None:
    """com.microsoft for MatMulNBits; opset 21 and IR 10 where DequantizeLinear carries INT4 blocks."""
    domains = {o.domain: o for o in model.opset_import}
    if target == "onnxruntime":
        if "com.microsoft" not in domains:
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        return
    default = domains.get("") or domains.get("ai.onnx")
    default.version = max(default.version, TENSORRT_OPSET)
    model.ir_version = max(model.ir_version, INT4_IR_VERSION)


def default_opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
