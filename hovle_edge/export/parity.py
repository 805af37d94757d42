"""Each exported graph against the PyTorch module it came from, on ONNX Runtime (CPU): prefill into an
empty cache with batch 2 and left padding (different real lengths, handled by the mask), then a
decode step on the cache that prefill wrote. The PyTorch side (reference_cases) runs first and keeps
only inputs and outputs, so the model can be cast or freed before ONNX Runtime (check_graph) opens
the graph: at full size the two never hold their weights at once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from hovle_edge.errors import ExportError
from hovle_edge.export.graphs import GraphSpec
from hovle_edge.runtime.ort_threads import session_options
from hovle_edge.spec import CAPACITY

# Largest max-abs error accepted per output, by precision, for outputs of magnitude up to 1 (scaled
# by the largest magnitude above that). fp16 is measured against the fp32 reference, so it carries
# fp16's own rounding (about 1e-3 relative per op) through every layer.
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2}


@dataclass
class ParityRow:
    graph: str
    case: str
    output: str
    max_abs: float
    scale: float  # the largest magnitude in the expected output

    @property
    def max_rel(self) -> float:
        return self.max_abs / self.scale

    def exceeds(self, precision: str) -> bool:
        return self.max_abs > TOLERANCE[precision] * max(1.0, self.scale)


def compare(name: str, case: str, expected, got) -> ParityRow:
    expected = expected.detach().float().numpy()
    got = got.astype(np.float32)
    if expected.shape != got.shape:
        return ParityRow(name, case, f"shape {got.shape} != {expected.shape}", float("inf"), 1.0)
    scale = max(float(np.abs(expected).max()), 1e-6) if expected.size else 1.0
    max_abs = float(np.abs(expected - got).max()) if expected.size else 0.0
    return ParityRow(name, case, "", max_abs, scale)


@dataclass
class Case:
    """One parity case: the graph's inputs (in the graph's dtype) and what PyTorch made of them."""
    name: str
    inputs: tuple
    expected: tuple


def reference_case(graph: GraphSpec, name: str, inputs: tuple, precision: str) -> Case:
    """PyTorch's outputs for `inputs`, from the graph's module as it is now: fp32 for every precision (an
    fp16 graph is checked against fp32 outputs, so its module is cast only after this)."""
    with torch.no_grad():
        cast = tuple(x.float() if precision != "fp32" and x.is_floating_point() else x for x in inputs)
        expected = graph.module(*cast)
    expected = (expected,) if isinstance(expected, torch.Tensor) else tuple(expected)
    return Case(name, inputs, tuple(e.detach().float() for e in expected))


def reference_cases(graph: GraphSpec, config, precision: str) -> list[Case]:
    """Every case of one graph with its expected outputs, computed before the graph is exported so that
    the module can be cast and freed before ONNX Runtime opens the graph. Decode steps run on the
    cache that the reference prefill wrote."""
    dtype = torch.float16 if precision == "fp16" else torch.float32
    out = []
    for name, inputs in cases(graph, config, dtype):
        out.append(reference_case(graph, name, inputs, precision))
        if graph.name != "vision":
            step = decode_inputs(graph, inputs, out[-1].expected[1:], config, dtype)
            out.append(reference_case(graph, "decode", step, precision))
    return out


def add_references(graphs: list[GraphSpec], first: int, references: dict, config, precision: str) -> None:
    """Reference cases of graphs[first] and of every later graph that shares weights with it, from those
    weights in fp32 (cast in place, no copy), before graphs[first] is cast to the export precision:
    a shared submodule cast to fp16 could not give back its fp32 truth."""
    mine = {id(p) for p in graphs[first].module.parameters()}
    for graph in graphs[first:]:
        if graph.name not in references and mine & {id(p) for p in graph.module.parameters()}:
            graph.module.float()
            references[graph.name] = reference_cases(graph, config, precision)


class RecordedOutputs:
    """Stands where a reference module is called (a graph's own checker that runs its cases in order):
    returns the outputs recorded for those cases, after checking that it is given the same inputs."""

    def __init__(self, graph_name: str, cases: list[Case]):
        self.graph_name, self.cases = graph_name, list(cases)

    def __call__(self, *inputs):
        case = self.cases.pop(0)
        if len(inputs) != len(case.inputs) or not all(torch.equal(a.float(), b.float()) for a, b in zip(inputs, case.inputs)):
            raise ExportError(f"{self.graph_name}: parity inputs differ from the recorded reference case {case.name!r}")
        return case.expected


def run_case(graph: GraphSpec, session, case: Case) -> list[ParityRow]:
    """Run one case on ONNX Runtime and compare. Presents are compared on this call's rows: a graph that
    writes its buffer in place returns the whole buffer."""
    feeds = {spec.name: x.numpy() for spec, x in zip(graph.inputs, case.inputs)}
    got = session.run([spec.name for spec in graph.outputs], feeds)
    rows = []
    for spec, e, g in zip(graph.outputs, case.expected, got):
        if spec.name.startswith("present.") and spec.dims[2] == CAPACITY:
            total, new = cache_window(graph, case.inputs)
            g = g[:, :, total - new:total]
        row = compare(graph.name, case.name, e, g)
        row.output = row.output or spec.name
        rows.append(row)
    return rows


def cache_window(graph: GraphSpec, inputs: tuple) -> tuple[int, int]:
    """(T, S): the slots in use after this call and the tokens it adds."""
    total = inputs[graph_index(graph, "attention_mask")].shape[1]
    return total, inputs[0].shape[1]


CAPACITY_SLOTS = 10  # cache buffers in the cases: more slots than prefill and decode fill


def cases(graph: GraphSpec, config, dtype) -> list[tuple[str, tuple]]:
    """(case name, inputs) for prefill; the decode inputs are built from prefill's presents. The cache
    buffers start as noise: slots not yet written must not matter."""
    generator = torch.Generator().manual_seed(0)
    emb = config.embedding_config
    if graph.name == "vision":
        size = emb.image_size
        return [(f"tiles={n}", (torch.randn(n, 3, size, size, generator=generator),)) for n in (1, 3)]
    B, S = 2, 6
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :2] = 0  # row 1 is 2 tokens shorter: left padding
    # Each token at its slot, as the runtime's batch of one and the onnxruntime target's attention place
    # it; the mask's positions would give the same outputs (rotary sees differences of positions only)
    # but a padded row's keys turned less than the ones GroupQueryAttention writes (ort_graphs.py).
    positions = torch.arange(S).expand(B, S)
    past = [torch.randn(B, s.dims[1], CAPACITY_SLOTS, s.dims[3], generator=generator).to(dtype)
            for s in past_specs(graph)]
    if graph.name == "embedding":
        ids = torch.randint(20, emb.llm_vocab_size, (B, S), generator=generator)
        ids[0, 1:3] = ids[1, 3:5] = emb.img_context_token_id
        rows = torch.randn(4, emb.hidden_size, generator=generator).to(dtype)
        return [("prefill", (ids, rows, positions, mask, *past))]
    embeds = torch.randn(B, S, config.llm_config.hidden_size, generator=generator).to(dtype)
    return [("prefill", (embeds, positions, mask, *past))]


def past_specs(graph: GraphSpec):
    return [s for s in graph.inputs if s.name.startswith("past_key_values.")]


def decode_inputs(graph: GraphSpec, prefill_inputs: tuple, new_rows: tuple, config, dtype) -> tuple:
    """One new token after prefill: prefill's rows written into the buffers at their slots (what the
    runtime does), mask and positions extended."""
    generator = torch.Generator().manual_seed(1)
    total, new = cache_window(graph, prefill_inputs)
    mask = torch.cat((prefill_inputs[graph_index(graph, "attention_mask")], torch.ones(2, 1, dtype=torch.long)), 1)
    positions = torch.full((2, 1), total)  # the new token's slot
    first_past = len(prefill_inputs) - len(new_rows)
    buffers = []
    for buffer, rows in zip(prefill_inputs[first_past:], new_rows):
        buffer = buffer.clone()
        buffer[:, :, total - new:total] = rows.to(dtype)
        buffers.append(buffer)
    if graph.name == "embedding":
        ids = torch.randint(20, config.llm_config.vocab_size, (2, 1), generator=generator)
        dummy = torch.zeros(1, config.embedding_config.hidden_size, dtype=dtype)
        return (ids, dummy, positions, mask, *buffers)
    embeds = torch.randn(2, 1, config.llm_config.hidden_size, generator=generator).to(dtype)
    return (embeds, positions, mask, *buffers)


def graph_index(graph: GraphSpec, name: str) -> int:
    return [s.name for s in graph.inputs].index(name)


def check_graph(graph: GraphSpec, path: str, cases: list[Case], progress: bool = False,
                session=None) -> list[ParityRow]:
    """One exported graph against its reference cases; rows carry the errors, the caller applies the
    tolerance. A session opened here is closed before this returns (one graph's weights in memory at a
    time); `session`, one already open on `path` (verify passes the runtime's own), is left open."""
    import onnxruntime as ort

    if session is not None:
        return [row for case in cases for row in run_case(graph, session, case)]
    session = ort.InferenceSession(path, session_options(ort), providers=["CPUExecutionProvider"])
    try:
        return [row for case in tqdm(cases, desc=f"{graph.name} parity", unit="case", leave=False,
                                     disable=not progress) for row in run_case(graph, session, case)]
    finally:
        del session
