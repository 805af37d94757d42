"""Parity for the graphs that write their KV cache in place (the `onnxruntime` target): parity.py's
cases and comparison, run the way the runtime runs them, with each past and its present bound to one
buffer, so that the decode case reads the rows the graph itself wrote at prefill.

The cases run each token at its slot (parity.cases), which is where GroupQueryAttention rotates it, so
the reference's keys are the ones the graph writes into the cache.

Outputs are compared at real (not padding) positions only. The contract leaves a padding position's
output undefined, and the two sides differ there: a query that sees no real key averages every slot's
value in PyTorch (all scores masked alike) but only the slots up to its own in GroupQueryAttention."""

from __future__ import annotations

import numpy as np
import torch

from hovle_edge.export import parity
from hovle_edge.export.graphs import GraphSpec
from hovle_edge.runtime.ort_threads import session_options


def in_place_spec(graph: GraphSpec, config, dtype: str) -> GraphSpec:
    """`graph` with the contract's in_place I/O (presents of kv_capacity rows); same reference module."""
    from hovle_edge import spec

    cfg = config.embedding_config if graph.name == "embedding" else config.llm_config
    stack = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size)
    io = (spec.embedding_io(*stack, dtype, spec.IN_PLACE) if graph.name == "embedding"
          else spec.decoder_io(*stack, cfg.vocab_size, dtype, spec.IN_PLACE))
    return GraphSpec(graph.name, graph.module, *io)


def real_only(values: np.ndarray, real: np.ndarray, axis: int) -> np.ndarray:
    """`values` with the positions along `axis` where `real` [B, S] is False set to 0."""
    shape = [1] * values.ndim
    shape[0], shape[axis] = real.shape
    return np.where(real.reshape(shape), values, 0)


def run_in_place_case(graph: GraphSpec, session, case: str, inputs: tuple, buffers: dict,
                      reference=None) -> tuple[list[parity.ParityRow], tuple]:
    module = reference or graph.module
    with torch.no_grad():
        expected = module(*(x.float() if reference is not None and x.is_floating_point() else x for x in inputs))
    binding = session.io_binding()
    binding.bind_output(graph.outputs[0].name)  # first: get_outputs() lists outputs in the order bound
    for spec, x in zip(graph.inputs, inputs):
        if spec.name in buffers:
            binding.bind_ortvalue_input(spec.name, buffers[spec.name])
            binding.bind_ortvalue_output(spec.name.replace("past_key_values", "present"), buffers[spec.name])
        else:
            binding.bind_cpu_input(spec.name, np.ascontiguousarray(x.numpy()))
    session.run_with_iobinding(binding)
    total, new = parity.cache_window(graph, inputs)
    real = inputs[parity.graph_index(graph, "attention_mask")][:, total - new:].bool().numpy()
    rows = []
    for spec, e in zip(graph.outputs, expected):
        e = e.detach().float().numpy()
        if spec.name.startswith("present."):
            g = buffers[spec.name.replace("present", "past_key_values")].numpy()[:, :, total - new:total]
            e, g = real_only(e, real, 2), real_only(g, real, 2)
        else:
            g = binding.get_outputs()[0].numpy()
            if spec.dims[1] != 1:  # logits are the last position's only, which is always real
                e, g = real_only(e, real, 1), real_only(g, real, 1)
        row = parity.compare(graph.name, case, torch.from_numpy(e), g)
        row.output = row.output or spec.name
        rows.append(row)
    return rows, expected


def check_in_place_graph(graph: GraphSpec, path: str, config, precision: str, reference_module=None,
                         session=None) -> list:
    """Prefill (batch 2, left padding) then a decode step on the buffers prefill wrote; on `session` when
    one is open on `path` already (verify passes the runtime's own)."""
    import onnxruntime as ort

    dtype = torch.float16 if precision == "fp16" else torch.float32
    if session is None:
        session = ort.InferenceSession(path, session_options(ort), providers=["CPUExecutionProvider"])
    rows = []
    for case, inputs in parity.cases(graph, config, dtype):
        buffers = {spec.name: ort.OrtValue.ortvalue_from_numpy(x.numpy().copy())
                   for spec, x in zip(graph.inputs, inputs) if spec.name.startswith("past_key_values.")}
        case_rows, expected = run_in_place_case(graph, session, case, inputs, buffers, reference_module)
        # The reference reads its own rows from the step's inputs; the graph reads what it wrote.
        step = parity.decode_inputs(graph, inputs, tuple(expected[1:]), config, dtype)
        rows += case_rows + run_in_place_case(graph, session, "decode", step, buffers, reference_module)[0]
    return rows
