"""`hovle-edge verify`: an exported folder against the PyTorch checkpoint it came from. Every graph on
random inputs (prefill, decode, batch 2 with padding) and on real ones (an image through DynProcess,
a templated prompt), then greedy generation end to end through the torch-free runtime."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw

from hovle_edge.export.graphs import graph_specs
from hovle_edge.export.parity import TOLERANCE, ParityRow, check_graph, compare
from hovle_edge.model import HoVLE, generate
from hovle_edge.runtime import Pipeline
from hovle_edge.spec import load_manifest


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


def sample_image(size: int = 320) -> Image.Image:
    """A plain picture with shapes and colours, standing in for a user's photo."""
    image = Image.new("RGB", (size * 3 // 2, size), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 20, size // 2, size // 2), fill="red")
    draw.rectangle((size // 2 + 40, size // 3, size + 60, size - 30), fill="blue")
    return image


def verify_model(checkpoint: str, model_dir: str, image=None, prompt: str = "What is in the image?",
                 new_tokens: int = 32) -> VerifyReport:
    manifest = load_manifest(model_dir)
    precision = manifest.precision
    reference = HoVLE.from_pretrained(checkpoint, dtype=torch.float32)
    report = VerifyReport(precision)
    fp32_graphs = {g.name: g for g in graph_specs(reference, "float32")}
    for graph in graph_specs(reference, manifest.kv_dtype):
        fp32 = fp32_graphs[graph.name].module if precision != "fp32" else None
        report.rows += check_graph(graph, manifest.graph_path(graph.name), reference.config, precision, fp32)
    with Pipeline.from_dir(model_dir) as pipe:
        pixels = pipe.pixel_values(image if image is not None else sample_image(), None)
        ids = pipe.tokenizer.encode(pipe.template.prompt(prompt, tiles=len(pixels)), bos=True)
        embeds = pipe.image_embeds(pixels)
        with torch.no_grad():
            expected = reference.embedding_model.image_embeds(torch.from_numpy(pixels))
        report.rows.append(named(compare("vision", "real", expected.flatten(0, 1), embeds), "image_embeds"))
        with torch.no_grad():
            logits = reference(torch.tensor([ids]), pixel_values=torch.from_numpy(pixels)).logits[0, -1]
        prefill = pipe.prefill(pipe.new_cache(), ids, embeds)
        report.rows.append(named(compare("end2end", "real", logits, prefill), "logits"))
        report.runtime_tokens, _ = pipe.generate_ids(pipe.new_cache(), ids, embeds, max_new_tokens=new_tokens)
    report.reference_tokens = generate(reference, torch.tensor([ids]), torch.from_numpy(pixels),
                                       max_new_tokens=new_tokens, stop_ids=set(manifest.stop_ids))
    return report


def named(row: ParityRow, output: str) -> ParityRow:
    row.output = output
    return row
