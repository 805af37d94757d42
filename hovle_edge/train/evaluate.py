"""Scoring in the shapes world: exact-match accuracy on questions about fresh scenes, through PyTorch
or through the exported graphs and the runtime, and whether text-only answers stayed those of the
language model (language kept)."""

from __future__ import annotations

import random

import torch

from hovle_edge.model import generate
from hovle_edge.preprocess import preprocess_image
from hovle_edge.train import shapes

EVAL_SEED = 10_000_000  # far from every seed used to make training data


def scene_questions(count: int, seed: int = EVAL_SEED) -> list[tuple]:
    """(image, question, answer) on fresh scenes, one question each."""
    items = []
    for i in range(count):
        things, image = shapes.sample(seed + i)
        question, answer = random.Random(seed - i).choice(shapes.questions(things, random.Random(seed + i)))
        items.append((image, question, answer))
    return items


def text_questions(count: int, seed: int = EVAL_SEED) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [shapes.text_questions(rng) for _ in range(count)]


@torch.no_grad()
def torch_answer(model, tokenizer, template, question: str, image=None, max_new_tokens: int = 8) -> str:
    config = model.config
    pixels = None
    if image is not None:
        pixels = torch.from_numpy(preprocess_image(image, max_num=config.max_dynamic_patch, image_size=config.image_size))
    ids = tokenizer.encode(template.prompt(question, tiles=0 if pixels is None else len(pixels)), bos=True)
    new = generate(model, torch.tensor([ids]), pixels, max_new_tokens=max_new_tokens, stop_ids=set(tokenizer.stop_ids))
    return tokenizer.decode([t for t in new if t not in tokenizer.stop_ids]).strip()


@torch.no_grad()
def caption_exact(model, tokenizer, template, count: int = 50, seed: int = EVAL_SEED) -> float:
    """Percent of fresh scenes whose caption, generated as stage 2 trains it (the image block, a newline),
    is the scene's caption word for word: whether the frozen LLM reads every thing out of the image tokens."""
    config = model.config
    right = 0
    for i in range(count):
        things, image = shapes.sample(seed + 500_000 + i)
        pixels = torch.from_numpy(preprocess_image(image, max_num=config.max_dynamic_patch, image_size=config.image_size))
        ids = tokenizer.encode(template.image_block(len(pixels)) + "\n", bos=True)
        new = generate(model, torch.tensor([ids]), pixels, max_new_tokens=48, stop_ids=set(tokenizer.stop_ids))
        right += tokenizer.decode([t for t in new if t not in tokenizer.stop_ids]).strip() == shapes.caption(things)
    return 100.0 * right / max(1, count)


def runtime_answer(pipe, question: str, image=None, max_new_tokens: int = 8) -> str:
    return pipe.generate(question, image=image, max_new_tokens=max_new_tokens).strip()


def percent(answers: list[str], expected: list[str]) -> float:
    return 100.0 * sum(a == e for a, e in zip(answers, expected)) / max(1, len(expected))
