"""The op checker run on every exported graph: each op must be one that TensorRT 10.3's ONNX parser
(JetPack 6) supports, and none may make shapes depend on data. Newer ops are allowed only with
the opset that brings them, for targets that parse them (TensorRT 10.15 and later)."""

from __future__ import annotations

from hovle_edge.errors import ExportError

# From the ONNX-TensorRT 10.x operator support list, the ops a transformer export can produce.
TENSORRT_10_3 = frozenset("""
Abs Add And ArgMax ArgMin AveragePool BatchNormalization Cast CastLike Ceil Clip Concat Constant
ConstantOfShape Conv ConvTranspose Cos CumSum DepthToSpace Div Einsum Elu Equal Erf Exp Expand Flatten
Floor Gather GatherElements GatherND Gemm Greater GreaterOrEqual HardSigmoid Identity
InstanceNormalization LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax MatMul Max Mean Min
Mod Mul Neg Not Or Pad Pow PRelu Range Reciprocal ReduceL2 ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ScatterElements ScatterND Selu Shape
Sigmoid Sign Sin Size Slice Softmax Softplus Split Sqrt Squeeze Sub Sum Tanh Tile TopK Transpose Trilu
Unsqueeze Where Xor
""".split())
OPSET_23_FUSED = frozenset({"Attention", "RotaryEmbedding", "RMSNormalization"})
DATA_DEPENDENT = frozenset({"NonZero", "If", "Loop", "Scan", "Unique", "Compress", "NonMaxSuppression",
                            "SequenceAt", "SequenceConstruct", "SequenceInsert", "SplitToSequence"})


def allowed_ops(opset: int) -> frozenset:
    return TENSORRT_10_3 | OPSET_23_FUSED if opset >= 23 else TENSORRT_10_3


def check_ops(model, opset: int, where: str) -> None:
    """Raise ExportError naming every node whose op is data-dependent or outside the allowed list."""
    allowed = allowed_ops(opset)
    bad = []
    for node in _all_nodes(model.graph):
        if node.domain not in ("", "ai.onnx"):
            bad.append(f"{node.name or '?'} ({node.domain}::{node.op_type}: custom domain)")
        elif node.op_type in DATA_DEPENDENT:
            bad.append(f"{node.name or '?'} ({node.op_type}: data-dependent shapes or control flow)")
        elif node.op_type not in allowed:
            bad.append(f"{node.name or '?'} ({node.op_type}: not supported by TensorRT 10.3 at opset {opset})")
    if bad:
        raise ExportError(f"{where}: {len(bad)} node(s) outside the allowed ops: " + "; ".join(bad[:10]))


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:  # subgraphs of control-flow nodes, so none hides inside an If
            if attr.g is not None and attr.g.node:
                yield from _all_nodes(attr.g)
