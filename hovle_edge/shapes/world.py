"""The shapes world: scenes of coloured shapes drawn with pillow from a seed, their captions, questions
with answers, text-only questions for the language model, and its tokenizer. Everything the whole
HoVLE method needs to run and be scored where no weights can be downloaded. Torch-free."""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle", "star"]
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 70, 220), "yellow": (230, 200, 20),
           "purple": (140, 50, 170)}
SIZES = ["small", "large"]
POSITIONS = ["top left", "top right", "bottom left", "bottom right"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SIDES = {"circle": "zero", "square": "four", "triangle": "three", "star": "ten"}
DRAWN_SIZE = 112  # the canvas; the demo model's tile size is the same, so a scene is one tile


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str
    position: str

    def words(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} at the {self.position}"


def scene(rng: random.Random) -> list[Thing]:
    """One to three things, each in its own quadrant, in reading order (so a caption is a function of
    the picture: a model is never asked to guess which thing a caption names first)."""
    count = rng.randint(1, 3)
    positions = sorted(rng.sample(POSITIONS, count), key=POSITIONS.index)
    return [Thing(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), position) for position in positions]


def draw(things: list[Thing], rng: random.Random, size: int = DRAWN_SIZE) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    half = size // 2
    for thing in things:
        column, row = ("right" in thing.position), ("bottom" in thing.position)
        radius = (0.38 if thing.size == "large" else 0.2) * half
        cx = column * half + half / 2 + rng.uniform(-0.08, 0.08) * half
        cy = row * half + half / 2 + rng.uniform(-0.08, 0.08) * half
        colour = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[thing.colour])
        pen.polygon(outline(thing.shape, cx, cy, radius), fill=colour) if thing.shape != "circle" else \
            pen.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    return image


def outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    points = []  # a five-pointed star
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def caption(things: list[Thing]) -> str:
    return " and ".join(t.words() for t in things)


def questions(things: list[Thing], rng: random.Random) -> list[tuple[str, str]]:
    """Questions about the scene with one right answer each: colour, shape, count, position."""
    by_shape = {s: [t for t in things if t.shape == s] for s in SHAPES}
    unique = [t for t in things if len(by_shape[t.shape]) == 1]
    out = [("how many shapes are there?", NUMBERS[len(things)])]
    thing = rng.choice(things)
    out.append((f"what shape is at the {thing.position}?", thing.shape))
    out.append((f"what colour is the shape at the {thing.position}?", thing.colour))
    if unique:
        thing = rng.choice(unique)
        out.append((f"what colour is the {thing.shape}?", thing.colour))
        out.append((f"where is the {thing.shape}?", thing.position))
    empty = [p for p in POSITIONS if p not in {t.position for t in things}]
    if empty:
        out.append((f"what shape is at the {rng.choice(empty)}?", "nothing"))
    return out


def turns(asked: list[tuple[str, str]]) -> list[dict]:
    """(question, answer) pairs as a conversation in the InternVL/LLaVA JSONL format."""
    return [turn for q, a in asked for turn in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]


def text_questions(rng: random.Random) -> tuple[str, str]:
    """A question the language model answers without a picture."""
    kind = rng.randrange(3)
    if kind == 0:
        shape = rng.choice(SHAPES)
        return f"how many sides does a {shape} have?", SIDES[shape]
    if kind == 1:
        n = rng.randrange(9)
        return f"what number comes after {NUMBERS[n]}?", NUMBERS[n + 1]
    a = rng.randrange(5)
    b = rng.randrange(5)
    return f"what is {NUMBERS[a]} plus {NUMBERS[b]}?", NUMBERS[a + b]


def sample(seed: int) -> tuple[list[Thing], Image.Image]:
    rng = random.Random(seed)
    things = scene(rng)
    return things, draw(things, rng)


def world_texts(count: int = 4000, seed: int = 0) -> list[str]:
    """Text of the world for the tokenizer, as the trainers encode it: captions and answers on their
    own, and conversations as lines ("user\n..." / "assistant\n..."), where a question's first word and
    the role names follow a newline as they do inside the chat template."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        things = scene(rng)
        asked = questions(things, rng) + [text_questions(rng)]
        asked[0] = (f"{caption(things)}. {asked[0][0]}", asked[0][1])
        texts.append(caption(things))
        texts.extend(a for _, a in asked)
        texts.append("\n".join(f"user\n{q}\nassistant\n{a}" for q, a in asked))
    return texts


def world_tokenizer(vocab_size: int = 768):
    from hovle_edge.tokenizer import train_tokenizer

    return train_tokenizer(world_texts(), vocab_size)


TEXT_RECORDS_PER_SLOT = 5  # in every tenth scene's place: about a sixth of chat records are text-only


def write_dataset(directory: str, kind: str, count: int, seed: int) -> str:
    """Write `count` scenes of `kind` as JSONL with PNG images beside it, in the formats the trainers
    read; returns the JSONL path. "caption": one record per scene. "chat": the scene's questions in
    shuffled order, two to a conversation (the image in its first turn), and every tenth scene's place
    taken by text-only questions that keep the language model's answers. Two because the model is
    asked both ways, a first question right after the image and a follow-up after an answer, and each
    is trained as often (docs/experiments.md has what one and all-in-one records gave)."""
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    path = os.path.join(directory, f"{kind}.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for i in range(count):
            rng = random.Random(seed * 1_000_003 + i)
            things = scene(rng)
            name = f"images/{kind}-{seed}-{i:06d}.png"
            text_only = kind == "chat" and i % 10 == 9
            if not text_only:
                draw(things, rng).save(os.path.join(directory, name))
            if kind == "caption":
                records = [{"image": name, "text": caption(things)}]
            elif text_only:
                records = [{"conversations": turns([text_questions(rng)])} for _ in range(TEXT_RECORDS_PER_SLOT)]
            else:
                asked = questions(things, rng)
                rng.shuffle(asked)
                pairs = [asked[k:k + 2] for k in range(0, len(asked), 2)]
                records = [{"image": name, "conversations": turns([("<image>\n" + q, a)] + rest)}
                           for (q, a), *rest in pairs]
            f.writelines(json.dumps(record) + "\n" for record in records)
    os.replace(path + ".tmp", path)
    return path
