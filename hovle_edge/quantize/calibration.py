"""Calibration for activation-aware quantization: prompts (with pictures) run through the fp32 graphs
of a model folder, and the inputs of the MatMuls to be quantized recorded. HoVLE's image tokens go
through the same layers as its text, so the set holds both: in the shapes world, questions about
drawn scenes and text-only questions; for a real checkpoint, a folder with `prompts.jsonl` (one
{"prompt": ..., "image": "file in the folder" (optional), "answer": ... (optional)} a line).

Each sample runs as one prefill from an empty cache (prefill.PrefillRunner); decode steps would show
the layers the same kind of rows, one at a time."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import numpy as np

from hovle_edge.errors import InputError
from hovle_edge.preprocess import load_image, preprocess_image
from hovle_edge.quantize.prefill import PrefillRunner, check_image_rows
from hovle_edge.tokenizer import ChatTemplate, Tokenizer

CALIBRATION_SEED = 20_000_000  # far from the demo's training seeds and its evaluation seeds (10_000_000 + i)
HELD_OUT_SEED = 30_000_000
PROMPTS_FILE = "prompts.jsonl"


@dataclass
class CalibrationSample:
    question: str
    answer: str = ""  # appended after the assistant's opening, so answer tokens are calibrated too
    image: object = None  # a PIL image, a path, or None


def shapes_world_samples(count: int, seed: int = CALIBRATION_SEED) -> list[CalibrationSample]:
    """Questions about fresh drawn scenes, and every fourth a text-only question."""
    from hovle_edge.shapes import world as shapes

    samples = []
    for i in range(count):
        rng = random.Random(seed + i)
        if i % 4 == 3:
            question, answer = shapes.text_questions(rng)
            samples.append(CalibrationSample(question, answer))
            continue
        things, image = shapes.sample(seed + i)
        question, answer = rng.choice(shapes.questions(things, rng))
        samples.append(CalibrationSample(question, answer, image))
    return samples


def folder_samples(directory: str, count: int | None = None) -> list[CalibrationSample]:
    path = os.path.join(directory, PROMPTS_FILE)
    if not os.path.isfile(path):
        raise InputError(f"{directory}: a calibration folder needs {PROMPTS_FILE} (one JSON object a line with "
                         "\"prompt\" and optionally \"image\", a file in the folder, and \"answer\")")
    samples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                prompt = record["prompt"]
            except (ValueError, KeyError, TypeError) as e:
                raise InputError(f"{path}, line {number}: expected a JSON object with a \"prompt\" ({e})") from e
            image = os.path.join(directory, record["image"]) if record.get("image") else None
            if image and not os.path.isfile(image):
                raise InputError(f"{path}, line {number}: image {record['image']!r} is not in {directory}")
            samples.append(CalibrationSample(prompt, record.get("answer", ""), image))
    if not samples:
        raise InputError(f"{path}: no prompts in it")
    return samples[:count]


def calibration_samples(directory: str | None, count: int, seed: int = CALIBRATION_SEED) -> list[CalibrationSample]:
    return shapes_world_samples(count, seed) if directory is None else folder_samples(directory, count)


def encode(sample: CalibrationSample, manifest, tokenizer: Tokenizer) -> tuple[list[int], np.ndarray | None]:
    """(templated prompt ids with the answer, pixel_values or None), as the runtime would make them."""
    model = manifest.model
    template = ChatTemplate(tokens_per_tile=model["tokens_per_tile"], system=manifest.data["chat"]["system"])
    pixels = None
    if sample.image is not None:
        image = load_image(sample.image) if isinstance(sample.image, str) else sample.image
        pixels = preprocess_image(image, min_num=model["min_tiles"], max_num=model["max_tiles"],
                                  image_size=model["image_size"], use_thumbnail=model["use_thumbnail"])
    text = template.prompt(sample.question, tiles=0 if pixels is None else len(pixels)) + sample.answer
    return tokenizer.encode(text, bos=True), pixels


def collect_activations(manifest, samples: list[CalibrationSample], wanted: dict[str, list[str]],
                        max_rows: int = 4096, seed: int = 0, progress=None) -> dict[str, dict[str, np.ndarray]]:
    """{graph: {tensor name: rows [n, K] float32}}: the tensors in `wanted` over every token of every
    sample, at most `max_rows` rows each (an even random subset when there are more)."""
    tokenizer = Tokenizer.from_dir(manifest.directory)
    image_context = manifest.data["tokens"]["img_context"]
    recorded = {graph: {name: [] for name in names} for graph, names in wanted.items()}
    runner = PrefillRunner(manifest, wanted)
    for sample in samples:
        ids, pixels = encode(sample, manifest, tokenizer)
        image_embeds = runner.image_embeds(pixels)
        check_image_rows(ids, image_embeds, image_context, pixels is not None, f"calibration prompt {sample.question[:40]!r}")
        _, values = runner.run(ids, image_embeds)
        for graph, names in wanted.items():
            for name in names:
                value = values[graph][name]
                recorded[graph][name].append(value.reshape(-1, value.shape[-1]).astype(np.float32))
        if progress:
            progress()
    rng = np.random.default_rng(seed)
    out = {}
    for graph, tensors in recorded.items():
        out[graph] = {}
        for name, parts in tensors.items():
            rows = np.concatenate(parts)
            if len(rows) > max_rows:
                rows = rows[np.sort(rng.choice(len(rows), max_rows, replace=False))]
            out[graph][name] = rows
    return out
