"""`hovle-edge verify`: an exported folder against the PyTorch checkpoint it came from. Every graph on
random inputs (prefill, decode, batch 2 with padding) and on real ones (an image through DynProcess,
a templated prompt), then greedy generation end to end through the torch-free runtime.

In two phases so that the weights are never in memory twice: PyTorch first computes every expected
output (graph cases, image rows, the prompt's logits, its greedy tokens) and is freed; then ONNX
Runtime opens the graphs, one at a time for the cases, all together for the end-to-end run."""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from hovle_edge import spec
from hovle_edge.errors import ModelFolderError
from hovle_edge.export.graphs import graph_specs
from hovle_edge.export.ort_parity import check_in_place_graph, in_place_spec
from hovle_edge.export.parity import TOLERANCE, ParityRow, RecordedOutputs, check_graph, compare, reference_cases
from hovle_edge.model.hovle import HoVLECache
from hovle_edge.model.weights import load_model, release_weights
from hovle_edge.runtime import Pipeline
from hovle_edge.spec import load_manifest
from hovle_edge.tokenizer import Tokenizer


@dataclass
class VerifyReport:
    precision: str
    rows: list = field(default_factory=list)
    reference_tokens: list = field(default_factory=list)
    runtime_tokens: list = field(default_factory=list)

    @property
    def tokens_match(self) -> bool:
        return self.reference_tokens == self.runtime_tokens

    @property
    def ok(self) -> bool:
        # fp16 tokens may part from the fp32 reference after a near tie; its logits are held to the tolerance.
        tokens_ok = self.tokens_match or self.precision != "fp32"
        return tokens_ok and not any(r.exceeds(self.precision) for r in self.rows)

    def table(self) -> str:
        lines = [f"{'graph':<10} {'case':<10} {'output':<24} {'max abs':>10} {'max rel':>10}  ok"]
        for r in self.rows:
            lines.append(f"{r.graph:<10} {r.case:<10} {r.output:<24} {r.max_abs:>10.3g} {r.max_rel:>10.3g}  "
                         f"{'no' if r.exceeds(self.precision) else 'yes'}")
        agree = next((i for i, (a, b) in enumerate(zip(self.reference_tokens, self.runtime_tokens)) if a != b),
                     min(len(self.reference_tokens), len(self.runtime_tokens)))
        lines.append(f"greedy tokens: {len(self.runtime_tokens)} from the runtime, {len(self.reference_tokens)} from "
                     f"PyTorch, equal for the first {agree}: {'same' if self.tokens_match else 'DIFFERENT'}")
        lines.append(f"tolerance ({self.precision}): max abs {TOLERANCE[self.precision]:g} x max(1, |largest value|)")
        return "\n".join(lines)


@dataclass
class Expected:
    """What PyTorch made of the real inputs."""
    image_rows: torch.Tensor  # [tiles * tokens_per_tile, hidden]
    logits: torch.Tensor  # [vocab], the prompt's last position
    tokens: list[int]


def sample_image(size: int = 320) -> Image.Image:
    """A plain picture with shapes and colours, standing in for a user's photo."""
    image = Image.new("RGB", (size * 3 // 2, size), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 20, size // 2, size // 2), fill="red")
    draw.rectangle((size // 2 + 40, size // 3, size + 60, size - 30), fill="blue")
    return image


def verify_model(checkpoint: str, model_dir: str, image=None, prompt: str = "What is in the image?",
                 new_tokens: int = 32, progress: bool = True) -> VerifyReport:
    started = time.perf_counter()

    def stage(what: str) -> None:
        if progress:
            tqdm.write(f"verify [{time.perf_counter() - started:5.0f} s] {what}", file=sys.stderr)

    stage("hashing the model folder")
    manifest = load_manifest(model_dir)  # every file re-hashed from disk: verify trusts no remembered hash
    quantized = manifest.data.get("quantization")
    if quantized:  # its weights were rounded on purpose: parity with PyTorch cannot hold
        agreement = quantized.get("agreement") or {}
        raise ModelFolderError(f"{model_dir} holds {quantized['bits']}-bit weights made by `hovle-edge quantize`, which "
                               "cannot match PyTorch bit for bit: verify the float folder it came from; this one's check "
                               f"is its agreement with that folder (top-1 {agreement.get('top1_agreement')}, mean KL "
                               f"{agreement.get('mean_kl')} on held-out prompts, manifest.json quantization.agreement)")
    precision = manifest.precision
    # Inputs first (no graph opened: this pipeline only preprocesses), so a bad image fails before loading.
    inputs = Pipeline(manifest, None, Tokenizer.from_dir(model_dir))
    pixels = inputs.pixel_values(image if image is not None else sample_image(), None)
    ids = inputs.tokenizer.encode(inputs.template.prompt(prompt, tiles=len(pixels)), bos=True)
    stage(f"{len(pixels)} tiles, {len(ids)} prompt tokens; loading the checkpoint in fp32")

    model = load_model(checkpoint, dtype=torch.float32, progress=progress)
    release_weights(model.language_model.model.tok_embeddings)  # the LLM's own table: unused at inference
    specs = graph_specs(model, manifest.kv_dtype)
    stage("PyTorch: graph cases")
    cases = {g.name: reference_cases(g, model.config, precision) for g in specs}
    stage("PyTorch: the image, the prompt and greedy tokens")
    expected = reference_run(model, ids, pixels, new_tokens, set(manifest.stop_ids), progress)
    config = model.config
    release_weights(model)  # the specs keep only names and shapes from here on
    del model
    gc.collect()

    report = VerifyReport(precision)
    for graph in specs:
        stage(f"ONNX Runtime: {graph.name} cases")
        path = manifest.graph_path(graph.name)
        if manifest.kv_present == spec.IN_PLACE and graph.name != "vision":
            graph = in_place_spec(graph, config, manifest.kv_dtype)
            report.rows += check_in_place_graph(graph, path, config, precision,
                                                RecordedOutputs(graph.name, cases.pop(graph.name)))
        else:
            report.rows += check_graph(graph, path, cases.pop(graph.name), progress)
    stage("ONNX Runtime: the image, the prompt and greedy tokens")
    with Pipeline.from_dir(model_dir) as pipe:
        embeds = pipe.image_embeds(pixels)
        report.rows.append(named(compare("vision", "real", expected.image_rows, embeds), "image_embeds"))
        cache = pipe.new_cache(min(len(ids) + new_tokens + 1, pipe.backend.max_context))
        logits = pipe.prefill(cache, ids, embeds)
        report.rows.append(named(compare("end2end", "real", expected.logits, logits), "logits"))
        report.runtime_tokens = greedy(lambda token: pipe.decode_step(cache, token), logits, new_tokens,
                                       set(manifest.stop_ids), progress, "runtime tokens")
    report.reference_tokens = expected.tokens
    stage("done")
    return report


@torch.no_grad()
def reference_run(model, ids: list[int], pixels: np.ndarray, new_tokens: int, stop_ids: set, progress: bool) -> Expected:
    """Prefill the prompt with both caches, then greedy decode; logits of the last position only."""
    image_rows = model.embedding_model.image_embeds(torch.from_numpy(pixels)).flatten(0, 1)
    state = {"cache": None, "length": 0}

    def step(tokens: list[int], rows=None) -> torch.Tensor:
        cache, length = state["cache"], state["length"]
        input_ids = torch.tensor([tokens])
        positions = torch.arange(length, length + len(tokens))[None]
        mask = torch.ones(1, length + len(tokens), dtype=torch.long)
        embeds, emb_presents = model.embedding_model(input_ids, rows, positions, mask, None if cache is None else cache.embedding)
        hidden, llm_presents = model.language_model.hidden_states(embeds, positions, mask, None if cache is None else cache.llm)
        state["cache"], state["length"] = HoVLECache(emb_presents, llm_presents), length + len(tokens)
        return model.language_model.output(hidden[0, -1]).float()

    logits = step(ids, image_rows)
    tokens = greedy(lambda token: step([token]), logits, new_tokens, stop_ids, progress, "PyTorch tokens")
    return Expected(image_rows, logits, tokens)


def greedy(decode_step, logits, new_tokens: int, stop_ids: set, progress: bool, desc: str) -> list[int]:
    """Argmax tokens from the prompt's `logits`, one decode step each, until a stop id (kept) or `new_tokens`."""
    tokens = []
    for _ in tqdm(range(new_tokens), desc=desc, unit="token", leave=False, disable=not progress):
        tokens.append(int(np.argmax(np.asarray(logits, dtype=np.float32))))
        if tokens[-1] in stop_ids or len(tokens) == new_tokens:
            break
        logits = decode_step(tokens[-1])
    return tokens


def named(row: ParityRow, output: str) -> ParityRow:
    row.output = output
    return row
