"""Scoring in the shapes world: exact-match accuracy on questions about fresh scenes, through PyTorch
or through the exported graphs and the runtime, and whether text-only answers stayed those of the
language model (language kept)."""

from __future__ import annotations

import random

import torch

from hovle_edge.model import generate
from hovle_edge.preprocess import preprocess_image
from hovle_edge.shapes import world

EVAL_SEED = 10_000_000  # far from every seed used to make training data


def fresh_scene(seed: int) -> tuple:
    """(things, picture, every question with its answer) of the scene drawn from `seed`."""
    things, image = world.sample(seed)
    return things, image, world.questions(things, random.Random(seed))


def scored_scenes(count: int, seed: int = EVAL_SEED) -> list[tuple]:
    """(things, image, question, answer) on fresh scenes, one question each: what the demo is scored on."""
    items = []
    for i in range(count):
        things, image, asked = fresh_scene(seed + i)
        question, answer = random.Random(seed - i).choice(asked)
        items.append((things, image, question, answer))
    return items


def scene_questions(count: int, seed: int = EVAL_SEED) -> list[tuple]:
    """(image, question, answer) on fresh scenes, one question each."""
    return [(image, question, answer) for _, image, question, answer in scored_scenes(count, seed)]


def described_questions(scored: list[tuple]) -> list[tuple[str, str]]:
    """scored_scenes' questions with the scene told in words instead of shown ("<caption>. <question>"):
    what the language model alone can read out of a description, the skill stage 2 builds on."""
    return [(f"{world.caption(things)}. {question}", answer) for things, _, question, answer in scored]


def follow_up_questions(count: int, seed: int = EVAL_SEED + 300_000) -> list[tuple]:
    """(image, first question, follow-up question, follow-up's answer): two different questions about
    one fresh scene, the second to be asked in the same conversation after the model answered the first."""
    items = []
    for i in range(count):
        _, image, asked = fresh_scene(seed + i)
        (first, _), (second, answer) = random.Random(seed - i).sample(asked, 2)
        items.append((image, first, second, answer))
    return items


def runtime_follow_up(pipe, first: str, second: str, image, max_new_tokens: int = 8) -> str:
    """The answer to `second` asked after `first` (with the image) in one runtime conversation."""
    chat = pipe.conversation()
    for _ in chat.ask(first, image=image, max_new_tokens=max_new_tokens):
        pass  # run the first answer to its end: it stays in the conversation, whatever it says
    return "".join(chat.ask(second, max_new_tokens=max_new_tokens)).strip()


def text_questions(count: int, seed: int = EVAL_SEED) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [world.text_questions(rng) for _ in range(count)]


def tiles_of(model, image):
    """The model's input tiles for a picture, or None without one."""
    if image is None:
        return None
    config = model.config
    return torch.from_numpy(preprocess_image(image, max_num=config.max_dynamic_patch, image_size=config.image_size))


@torch.no_grad()
def generated_text(model, tokenizer, prompt: str, pixels, max_new_tokens: int) -> str:
    """Greedy continuation of `prompt` (with the tiles in its image block), without the stop tokens."""
    ids = tokenizer.encode(prompt, bos=True)
    new = generate(model, torch.tensor([ids]), pixels, max_new_tokens=max_new_tokens, stop_ids=set(tokenizer.stop_ids))
    return tokenizer.decode([t for t in new if t not in tokenizer.stop_ids]).strip()


def torch_answer(model, tokenizer, template, question: str, image=None, max_new_tokens: int = 8) -> str:
    pixels = tiles_of(model, image)
    prompt = template.prompt(question, tiles=0 if pixels is None else len(pixels))
    return generated_text(model, tokenizer, prompt, pixels, max_new_tokens)


def caption_exact(model, tokenizer, template, count: int = 50, seed: int = EVAL_SEED) -> float:
    """Percent of fresh scenes whose caption, generated as stage 2 trains it (the image block, a newline),
    is the scene's caption word for word: whether the frozen LLM reads every thing out of the image tokens."""
    right = 0
    for i in range(count):
        things, image = world.sample(seed + 500_000 + i)
        pixels = tiles_of(model, image)
        prompt = template.image_block(len(pixels)) + "\n"
        right += generated_text(model, tokenizer, prompt, pixels, max_new_tokens=48) == world.caption(things)
    return 100.0 * right / max(1, count)


def runtime_answer(pipe, question: str, image=None, max_new_tokens: int = 8, timings: list | None = None) -> str:
    """The runtime's answer to one question; the turn's Timings appended to `timings` when given."""
    chat = pipe.conversation()
    answer = "".join(chat.ask(question, image=image, max_new_tokens=max_new_tokens)).strip()
    if timings is not None:
        timings.append(chat.timings)
    return answer


def percent(answers: list[str], expected: list[str]) -> float:
    return 100.0 * sum(a == e for a, e in zip(answers, expected)) / max(1, len(expected))
