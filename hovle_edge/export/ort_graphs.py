"""The embedding and decoder graphs of the `onnxruntime` target, written with onnx.helper straight from
the reference model's weights, with ONNX Runtime's fused contrib ops: one packed QKV MatMul per layer
into GroupQueryAttention, which rotates q and k itself and writes its KV cache in place (past and
present bound to one buffer of kv_capacity slots); RMSNormalization / SkipSimplifiedLayerNormalization.
GQA's own rotary replaced a Split and two RotaryEmbedding nodes per layer, which took 0.4-0.5 ms of a
w512 stack's decode step in ONNX Runtime's profile (at 128 and 2048 tokens), while GQA's time stayed.

Why our own writer and not onnxruntime-genai's model builder or ORT's transformer optimizer: the
builder writes one decoder from a Hugging Face folder, while HoVLE is two cached stacks, the first of
which (the holistic embedding, with its image-row merge and its own KV cache) no builder expresses;
the optimizer fuses patterns of a traced graph into the same ops but leaves the concatenating caches
of the torch.onnx graphs as they are. What both would give is these few ops, so we write them.

The graph I/O is the contract's (spec.embedding_io / decoder_io with present = in_place): what GQA
needs beyond it (seqlens_k, total_sequence_length, the padding bias) is derived from attention_mask
inside the graph. GQA rotates each token at its slot, T-S+s, and not at position_ids: the same for a
row without padding, and for a left-padded row every position moves by the row's padding, which
rotary attention cannot see (its scores depend only on differences of positions). Outputs equal the
reference's; a padded row's keys sit in the cache turned by its padding. position_ids stays an input
of the contract (the tensorrt target reads it) and is unused here."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from hovle_edge import spec
from hovle_edge.export.ort_ops import MICROSOFT, GraphWriter, dim
from hovle_edge.model import HoVLE
from hovle_edge.model.layers import Attention, DecoderLayer, FeedForward, rotary_cos_sin

ORT_OPSET = 23  # RMSNormalization (the first norm of a stack; the others fuse with the residual add)


def numpy_of(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def matmul_weight(linear: torch.nn.Linear) -> np.ndarray:
    """nn.Linear's [out, in] as MatMul's [in, out]."""
    return numpy_of(linear.weight).T


@dataclass
class AttentionInputs:
    """What every GroupQueryAttention of a stack shares, derived once from attention_mask."""

    seqlens_k: str  # int32 [B]: T - 1 for every row (all rows write slots T-S..T-1)
    total_length: str  # int32 scalar: T
    padding_bias: str  # [B, 1, S, T] in the graph dtype: 0 for real keys, the dtype's lowest for padding
    cos_cache: str
    sin_cache: str


def attention_inputs(w: GraphWriter, attention_mask: str, new_tokens: str,
                     rotary: tuple[np.ndarray, np.ndarray]) -> AttentionInputs:
    total = dim(w, attention_mask, 1)
    total_i32 = w.op("Cast", total, to=onnx.TensorProto.INT32)
    seqlens_k = w.op("Expand", w.op("Sub", total_i32, w.const([1], np.int32)), dim(w, attention_mask, 0))
    total_length = w.op("Squeeze", total_i32, w.const([0]))
    # (mask - 1) * big: 0 where mask is 1, -big where it is 0; GQA adds it to the scores of every query
    real = w.op("Cast", attention_mask, to=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(w.dtype)))
    lowest = w.const(np.finfo(w.dtype).min, w.dtype)
    bias = w.op("Mul", w.op("Sub", real, w.const(1, w.dtype)), w.op("Neg", lowest))
    bias = w.op("Unsqueeze", bias, w.const([1, 2]))  # [B, 1, 1, T]
    shape = w.op("Concat", dim(w, attention_mask, 0), w.const([1]), new_tokens, total, axis=0)
    bias = w.op("Expand", bias, shape)  # [B, 1, S, T]: GQA reads the bias per query row
    cos, sin = rotary
    return AttentionInputs(seqlens_k, total_length, bias, w.weight("rotary.cos_cache", cos),
                           w.weight("rotary.sin_cache", sin))


def rotary_caches(cfg, max_context: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_context, head_dim/2] from the reference's own fp32 rotary code."""
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    cos, sin = rotary_cos_sin(torch.arange(max_context)[None], head_dim, cfg.rope_theta, torch.float32)
    return numpy_of(cos[0, 0, :, : head_dim // 2]), numpy_of(sin[0, 0, :, : head_dim // 2])


def packed_qkv(attention: Attention) -> np.ndarray:
    """HoVLE's wqkv rows are grouped per KV head, (kv_head, [q]*groups + [k, v], head_dim); GQA's packed
    layout is all q heads, then all k heads, then all v heads: regroup the rows, [in, out] for MatMul."""
    kvh, g, d = attention.kv_heads, attention.groups, attention.head_dim
    rows = numpy_of(attention.wqkv.weight).reshape(kvh, g + 2, d, -1)
    q = rows[:, :g].reshape(kvh * g * d, -1)
    k = rows[:, g].reshape(kvh * d, -1)
    v = rows[:, g + 1].reshape(kvh * d, -1)
    return np.concatenate((q, k, v)).T


def attention(w: GraphWriter, name: str, module: Attention, x: str, shared: AttentionInputs,
              past: tuple[str, str], present: tuple[str, str]) -> str:
    """GQA on the packed QKV rows, rotating q and k itself: no Split and no RotaryEmbedding nodes."""
    h, kvh = module.heads, module.kv_heads
    qkv = w.op("MatMul", x, w.weight(f"{name}.wqkv", packed_qkv(module)))
    out = w.op("GroupQueryAttention", qkv, "", "", *past, shared.seqlens_k, shared.total_length, shared.cos_cache,
               shared.sin_cache, "", shared.padding_bias, out=[w.unique(f"{name}.attention"), *present],
               domain=MICROSOFT, num_heads=h, kv_num_heads=kvh, do_rotary=1)[0]
    return w.op("MatMul", out, w.weight(f"{name}.wo", matmul_weight(module.wo)))


def feed_forward(w: GraphWriter, name: str, module: FeedForward, x: str) -> str:
    gate = w.op("MatMul", x, w.weight(f"{name}.w1", matmul_weight(module.w1)))
    up = w.op("MatMul", x, w.weight(f"{name}.w3", matmul_weight(module.w3)))
    swiglu = w.op("Mul", w.op("Mul", gate, w.op("Sigmoid", gate)), up)
    return w.op("MatMul", swiglu, w.weight(f"{name}.w2", matmul_weight(module.w2)))


def skip_norm(w: GraphWriter, x: str, residual: str, weight: str, eps: float) -> tuple[str, str]:
    """(RMSNorm(x + residual), x + residual) in one op."""
    normed, total = w.unique("normed"), w.unique("residual")
    w.op("SkipSimplifiedLayerNormalization", x, residual, weight, out=[normed, "", "", total],
         domain=MICROSOFT, epsilon=eps)
    return normed, total


def layer_stack(w: GraphWriter, stack: str, layers: list[DecoderLayer], eps: float, x: str,
                shared: AttentionInputs) -> tuple[str, str]:
    """N InternLM2 layers; returns the last layer's (feed-forward output, residual), not yet added, so
    the caller fuses the add with its own norm (decoder) or adds them (embedding: no final norm)."""
    names = spec.past_names(len(layers)), spec.present_names(len(layers))
    residual = x
    normed = w.op("RMSNormalization", x, w.weight(f"{stack}.0.attention_norm",
                                                         numpy_of(layers[0].attention_norm.weight)),
                  axis=-1, epsilon=eps, stash_type=1)
    ffn = None
    for i, layer in enumerate(layers):
        past, present = names[0][2 * i:2 * i + 2], names[1][2 * i:2 * i + 2]
        if ffn is not None:
            gamma = w.weight(f"{stack}.{i}.attention_norm", numpy_of(layer.attention_norm.weight))
            normed, residual = skip_norm(w, ffn, residual, gamma, eps)
        h = attention(w, f"{stack}.{i}.attention", layer.attention, normed, shared, past, present)
        gamma = w.weight(f"{stack}.{i}.ffn_norm", numpy_of(layer.ffn_norm.weight))
        normed, residual = skip_norm(w, h, residual, gamma, eps)
        ffn = feed_forward(w, f"{stack}.{i}.feed_forward", layer.feed_forward, normed)
    return ffn, residual


def declare_io(w: GraphWriter, io: tuple[list, list]) -> None:
    for t in io[0]:
        w.input(t)
    for t in io[1]:
        w.output(t)


def merge_image_rows(w: GraphWriter, table: str, input_ids: str, image_embeds: str, context_id: int) -> str:
    """Word embeddings with row k of image_embeds at the k-th <IMG_CONTEXT> position (row-major over the
    batch): CumSum + Gather + Where, so no shape depends on the data."""
    words = w.op("Gather", table, input_ids)  # [B, S, C]
    is_image = w.op("Equal", input_ids, w.const(context_id))
    row = w.op("Sub", w.op("CumSum", w.op("Reshape", w.op("Cast", is_image, to=onnx.TensorProto.INT64),
                                            w.const([-1])), w.const(0)), w.const(1))
    last_row = w.op("Sub", dim(w, image_embeds, 0), w.const(1))
    row = w.op("Max", w.op("Min", row, last_row), w.const(0))
    rows = w.op("Reshape", w.op("Gather", image_embeds, row), w.op("Shape", words))
    return w.op("Where", w.op("Unsqueeze", is_image, w.const([-1])), rows, words)


def embedding_graph(model: HoVLE, dtype: str, max_context: int, data_path: str | None = None) -> onnx.ModelProto:
    """The embedding graph; with `data_path`, its weights are written there as they come (GraphWriter)."""
    with GraphWriter("embedding", dtype, data_path) as w:
        return _embedding_graph(w, model.embedding_model, max_context)


def _embedding_graph(w: GraphWriter, emb, max_context: int) -> onnx.ModelProto:
    cfg, dtype = emb.cfg, w.dtype
    declare_io(w, spec.embedding_io(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size,
                                    dtype, spec.IN_PLACE))
    table = w.weight("word_embeddings", numpy_of(emb.llm_text_embeddings.weight))
    x = merge_image_rows(w, table, "input_ids", "image_embeds", cfg.img_context_token_id)
    shared = attention_inputs(w, "attention_mask", dim(w, "input_ids", 1),
                              rotary_caches(cfg, max_context))
    ffn, residual = layer_stack(w, "embedding", list(emb.encoder), cfg.rms_norm_eps, x, shared)
    w.op("Add", ffn, residual, out="inputs_embeds")  # no norm after the last embedding layer
    return w.model(ORT_OPSET)


def decoder_graph(model: HoVLE, dtype: str, max_context: int, data_path: str | None = None) -> onnx.ModelProto:
    """The decoder graph; with `data_path`, its weights are written there as they come (GraphWriter)."""
    with GraphWriter("decoder", dtype, data_path) as w:
        return _decoder_graph(w, model.language_model, max_context)


def _decoder_graph(w: GraphWriter, llm, max_context: int) -> onnx.ModelProto:
    cfg, dtype = llm.cfg, w.dtype
    declare_io(w, spec.decoder_io(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size,
                                  cfg.vocab_size, dtype, spec.IN_PLACE))
    shared = attention_inputs(w, "attention_mask", dim(w, "inputs_embeds", 1),
                              rotary_caches(cfg, max_context))
    ffn, residual = layer_stack(w, "llm", list(llm.model.layers), cfg.rms_norm_eps, "inputs_embeds", shared)
    last = (w.const([-1]), w.const([np.iinfo(np.int64).max]), w.const([1]))  # the last position only
    gamma = w.weight("llm.norm", numpy_of(llm.model.norm.weight))
    hidden, _ = skip_norm(w, w.op("Slice", ffn, *last), w.op("Slice", residual, *last), gamma, cfg.rms_norm_eps)
    logits = w.op("MatMul", hidden, w.weight("llm.output", matmul_weight(llm.output)))
    if dtype == "float32":
        w.op("Identity", logits, out="logits")
    else:
        w.op("Cast", logits, out="logits", to=onnx.TensorProto.FLOAT)  # logits are fp32 in every precision
    return w.model(ORT_OPSET)


GRAPH_WRITERS = {"embedding": embedding_graph, "decoder": decoder_graph}


def write_ort_graph(name: str, model: HoVLE, dtype: str, max_context: int, path: str) -> int:
    """Write graph `name` to `path` with its weights in `path`.data, one weight at a time (the graph is
    never whole in memory); returns the number of weight values."""
    graph = GRAPH_WRITERS[name](model, dtype, max_context, data_path=path + ".data")
    onnx.save_model(graph, path)  # its weights are references into path.data already
    del graph
    onnx.checker.check_model(path)  # by path: external weights are checked in place, never loaded
    return sum(math.prod(t.dims) for t in onnx.load(path, load_external_data=False).graph.initializer)
