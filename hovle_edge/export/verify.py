"""`hovle-edge verify`: an exported folder against the PyTorch checkpoint it came from. Every graph on
random inputs (prefill, decode, batch 2 with padding), then end to end through the torch-free runtime
on real inputs (an image through DynProcess, a templated prompt): the image rows, the prompt's logits,
and a few greedy steps, which the runtime takes teacher-forced on PyTorch's tokens so that both sides
do the same work and every step's logits are compared (an fp16 graph parting from PyTorch at a near tie
would otherwise leave the rest unchecked). The prompt is the long part at full size (1,981 tokens with
the default image), so the steps are few (8 by default): each costs what a token costs, and proves
what the decode case and the first step already prove, on a cache that grew one row more.

In two phases so that the weights are never in memory twice: PyTorch first computes every expected
output (graph cases, image rows, the prompt's and each step's logits, its greedy tokens) and is freed;
then the runtime opens the graphs once, and its sessions run the cases and the end-to-end check."""

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
from hovle_edge.model.generate import generate
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
        same = sum(a == b for a, b in zip(self.reference_tokens, self.runtime_tokens))
        lines.append(f"greedy tokens: the runtime (fed PyTorch's tokens) chose PyTorch's at {same} of "
                     f"{len(self.reference_tokens)} steps: {'same' if self.tokens_match else 'DIFFERENT'}")
        lines.append(f"tolerance ({self.precision}): max abs {TOLERANCE[self.precision]:g} x max(1, |largest value|)")
        return "\n".join(lines)


@dataclass
class Expected:
    """What PyTorch made of the real inputs."""
    image_rows: torch.Tensor  # [tiles * tokens_per_tile, hidden]
    logits: list[torch.Tensor]  # [vocab] each: the prompt's last position, then each greedy step's
    tokens: list[int]  # PyTorch's greedy tokens (a stop id last, when one came)


def sample_image(size: int = 320) -> Image.Image:
    """A plain picture with shapes and colours, standing in for a user's photo."""
    image = Image.new("RGB", (size * 3 // 2, size), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 20, size // 2, size // 2), fill="red")
    draw.rectangle((size // 2 + 40, size // 3, size + 60, size - 30), fill="blue")
    return image


def verify_model(checkpoint: str, model_dir: str, image=None, prompt: str = "What is in the image?",
                 new_tokens: int = 8, progress: bool = True) -> VerifyReport:
    """Check `model_dir` against `checkpoint`: each graph's outputs on random inputs, then the image rows,
    the prompt's logits and `new_tokens` greedy steps of PyTorch, which the runtime decodes teacher-forced
    (PyTorch's tokens fed back), every step's logits compared."""
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
    stop_ids = set(manifest.stop_ids)
    stage(f"{len(pixels)} tiles, {len(ids)} prompt tokens; loading the checkpoint in fp32")

    model = load_model(checkpoint, dtype=torch.float32, progress=progress)
    release_weights(model.language_model.model.tok_embeddings)  # the LLM's own table: unused at inference
    specs = graph_specs(model, manifest.kv_dtype)
    stage("PyTorch: graph cases (random inputs: prefill with padding, a decode step)")
    cases = {g.name: reference_cases(g, model.config, precision) for g in specs}
    stage(f"PyTorch: the image, the prompt and {new_tokens} greedy tokens")
    expected = reference_run(model, ids, pixels, new_tokens, stop_ids, progress)
    config = model.config
    release_weights(model)  # the specs keep only names and shapes from here on
    del model
    gc.collect()

    report = VerifyReport(precision, reference_tokens=expected.tokens)
    stage("ONNX Runtime: opening the runtime's sessions")
    with Pipeline.from_dir(model_dir) as pipe:  # the cases run on its sessions too: each graph is opened once
        for graph in specs:
            stage(f"ONNX Runtime: {graph.name} cases")
            path, session = manifest.graph_path(graph.name), pipe.backend.sessions[graph.name]
            if manifest.kv_present == spec.IN_PLACE and graph.name != "vision":
                graph = in_place_spec(graph, config, manifest.kv_dtype)
                report.rows += check_in_place_graph(graph, path, config, precision,
                                                    RecordedOutputs(graph.name, cases.pop(graph.name)), session)
            else:
                report.rows += check_graph(graph, path, cases.pop(graph.name), progress, session)
        rows, report.runtime_tokens = runtime_run(pipe, ids, pixels, expected, progress, stage)
    report.rows += rows
    stage("done")
    return report


class RecordingModel:
    """Stands for the model in generate(): calls it and keeps each call's last-position logits (fp32)."""

    def __init__(self, model, bar):
        self.model, self.bar, self.logits = model, bar, []

    def __call__(self, input_ids, **kwargs):
        out = self.model(input_ids, **kwargs)
        self.logits.append(out.logits[0, -1].float().clone())
        self.bar.update()
        return out


@torch.no_grad()
def reference_run(model, ids: list[int], pixels: np.ndarray, new_tokens: int, stop_ids: set,
                  progress: bool) -> Expected:
    """PyTorch's greedy generation (model/generate.py) of the prompt with the image; keeps the image rows,
    the logits of the prompt and of each step, and the tokens."""
    rows = []
    hooks = [model.embedding_model.pixel_shuffle_proj.register_forward_hook(lambda module, args, out: rows.append(out)),
             # The head on the last position only, all that generate reads: the prompt's [S, vocab] fp32
             # logits would be 0.7 GiB and 0.75 TFLOP more for the default image.
             model.language_model.output.register_forward_pre_hook(lambda module, args: (args[0][:, -1:],))]
    try:
        with tqdm(total=new_tokens, desc="PyTorch: the prompt, then each step", unit="call", leave=False,
                  disable=not progress) as bar:
            recorder = RecordingModel(model, bar)
            tokens = generate(recorder, torch.tensor([ids]), torch.from_numpy(pixels), max_new_tokens=new_tokens,
                              stop_ids=stop_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return Expected(rows[0].flatten(0, 1), recorder.logits[:len(tokens)], tokens)


def runtime_run(pipe: Pipeline, ids: list[int], pixels: np.ndarray, expected: Expected, progress: bool,
                stage) -> tuple[list[ParityRow], list[int]]:
    """The same work through the runtime's step API: the image, the prompt, then PyTorch's tokens fed
    back one decode step at a time (teacher forcing: an fp16 graph that parts from PyTorch at a near tie
    is still checked on every step). Returns the rows and the runtime's own choice at each step."""
    stage(f"ONNX Runtime: the image ({len(pixels)} tiles) and the prompt ({len(ids)} tokens)")
    embeds = pipe.image_embeds(pixels)
    rows = [named(compare("vision", "real", expected.image_rows, embeds), "image_embeds")]
    cache = pipe.new_cache(min(len(ids) + len(expected.tokens), pipe.backend.max_context))
    logits = pipe.prefill(cache, ids, embeds)
    stage(f"ONNX Runtime: PyTorch's {len(expected.tokens)} tokens, one decode step each")
    chosen = []
    for step, (want, token) in enumerate(tqdm(list(zip(expected.logits, expected.tokens)), desc="runtime steps",
                                              unit="token", leave=False, disable=not progress)):
        rows.append(named(compare("end2end", "real", want, logits), "logits" if step == 0 else f"logits step {step}"))
        chosen.append(int(np.argmax(logits)))
        if step + 1 < len(expected.tokens):
            logits = pipe.decode_step(cache, token)
    return rows, chosen


def named(row: ParityRow, output: str) -> ParityRow:
    row.output = output
    return row
