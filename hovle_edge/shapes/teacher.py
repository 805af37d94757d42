"""The shapes world's teacher for stage 1: a tiny vision encoder, the stand-in for InternViT, trained
here on scene attributes. train/teacher.py loads it (or any Hugging Face vision model) for distill."""

from __future__ import annotations

import os
import random

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from hovle_edge.errors import ConfigError
from hovle_edge.files import write_json
from hovle_edge.preprocess import normalize
from hovle_edge.shapes import world
from hovle_edge.train.loop import Task, TrainSettings, train
from hovle_edge.train.teacher import SHAPES_TEACHER as ARCHITECTURE, fit


class ShapesTeacher(nn.Module):
    """A small convolutional encoder: stride-2 3x3 stages down to a grid x grid feature map (one
    feature per patch, each seeing about a quadrant), and per-quadrant attribute heads. Convolutions
    because a ViT of the same cost and budget never learned to tell shapes apart, and a teacher cannot
    pass on what it does not know."""

    def __init__(self, image_size: int = 128, grid: int = 8, width: int = 128, channels: tuple = (32, 64, 128)):
        super().__init__()
        channels = tuple(channels)
        if image_size != grid * 2 ** (len(channels) + 1):
            raise ConfigError(f"teacher: image_size {image_size} must be grid {grid} x 2^{len(channels) + 1}")
        self.config = dict(architectures=[ARCHITECTURE], image_size=image_size, grid=grid, width=width,
                           channels=list(channels))
        self.grid = grid
        stages, inputs = [], 3
        for outputs in channels + (width,):
            stages += [nn.Conv2d(inputs, outputs, 3, stride=2, padding=1), nn.GELU()]
            inputs = outputs
        self.body = nn.Sequential(*stages, nn.Conv2d(width, width, 3, padding=1))
        self.norm = nn.LayerNorm(width)
        # Attribute heads per quadrant; "none" is the last class of shape and colour.
        self.shape_head = nn.Linear(width, len(world.SHAPES) + 1)
        self.colour_head = nn.Linear(width, len(world.COLOURS) + 1)
        self.size_head = nn.Linear(width, len(world.SIZES) + 1)

    @property
    def heads(self) -> dict[str, nn.Linear]:
        """The attribute heads, in the order of scene_targets' columns."""
        return {"shape": self.shape_head, "colour": self.colour_head, "size": self.size_head}

    @property
    def width(self) -> int:
        return self.config["width"]

    def forward(self, pixel_values):
        """[T, 3, S, S] -> patch features [T, grid^2, width], row-major."""
        x = self.body(fit(pixel_values, self.config["image_size"]))  # [T, width, grid, grid]
        return self.norm(x.flatten(2).transpose(1, 2))

    def quadrants(self, features):
        """[T, grid^2, W] -> [T, 4, W]: mean feature of each quadrant in the order of world.POSITIONS."""
        T, _, W = features.shape
        half = self.grid // 2
        grid = features.reshape(T, 2, half, 2, half, W)
        return grid.mean(dim=(2, 4)).reshape(T, 4, W)


def scene_targets(things) -> list[tuple[int, int, int]]:
    """(shape, colour, size) class ids for each quadrant."""
    at = {t.position: t for t in things}
    out = []
    for position in world.POSITIONS:
        t = at.get(position)
        out.append((len(world.SHAPES), len(world.COLOURS), len(world.SIZES)) if t is None else
                   (world.SHAPES.index(t.shape), list(world.COLOURS).index(t.colour), world.SIZES.index(t.size)))
    return out


def scene_batch(seed: int, size: int, image_size: int):
    pixels, targets = [], []
    for i in range(size):
        things, image = world.sample(seed * 100_003 + i)
        pixels.append(torch.from_numpy(normalize(image.resize((image_size, image_size)))))
        targets.append(scene_targets(things))
    return torch.stack(pixels), torch.tensor(targets)


def teacher_loss(teacher: ShapesTeacher, pixels, targets):
    pooled = teacher.quadrants(teacher(pixels))  # [T, 4, W]
    loss = 0.0
    for k, head in enumerate(teacher.heads.values()):
        logits = head(pooled)
        loss = loss + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[..., k].reshape(-1))
    return loss


TEACHER_DEFAULTS = TrainSettings(steps=200, batch_size=32, lr=2e-3, warmup=20)  # shape, colour, size at 97% or more


class TeacherModule(nn.Module):
    def __init__(self, teacher: ShapesTeacher):
        super().__init__()
        self.model = teacher

    def forward(self, batch):
        return teacher_loss(self.model, batch["pixel_values"], batch["targets"]), torch.tensor(batch["targets"].numel())


class PretrainTeacher(Task):
    """The teacher as a Task of the one training loop: batches of freshly drawn scenes, a pure
    function of (seed, step), so a resumed run draws what it would have drawn."""

    def __init__(self, seed: int):
        self.model = ShapesTeacher()
        self.module = TeacherModule(self.model)
        self.seed = seed
        self.accuracy: dict[str, float] = {}

    def batch(self, step, micro, rank, world, batch_size):
        draw = ((self.seed * 1_000_000 + step) * 64 + micro) * world + rank
        pixels, targets = scene_batch(draw, batch_size, self.model.config["image_size"])
        return {"pixel_values": pixels, "targets": targets}

    def save(self, directory: str, weights: dict) -> None:
        self.accuracy = attribute_accuracy(self.model.eval(), seed=random.Random(self.seed).randrange(10**6) + 7_000_000)
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(directory, "model.safetensors"))
        write_json(os.path.join(directory, "config.json"), {**self.model.config, "accuracy_on_things": self.accuracy})


def pretrain_teacher(out: str, settings: TrainSettings | None = None, progress: bool = True) -> dict[str, float]:
    """Train the shapes teacher on scene attributes through the shared loop; returns each attribute's
    accuracy on the things of fresh scenes."""
    settings = settings or TEACHER_DEFAULTS
    torch.manual_seed(settings.seed)
    task = PretrainTeacher(settings.seed)
    train(task, settings, out, desc="teacher", progress=progress)
    return task.accuracy


@torch.no_grad()
def attribute_accuracy(teacher: ShapesTeacher, seed: int, count: int = 256) -> dict[str, float]:
    """Accuracy of each attribute head on the quadrants that hold a thing (empty ones are easy and
    would hide a teacher blind to shape)."""
    pixels, targets = scene_batch(seed, count, teacher.config["image_size"])
    pooled = teacher.quadrants(teacher(pixels))
    held = targets[..., 0] != len(world.SHAPES)
    return {name: round(float((head(pooled).argmax(-1) == targets[..., k])[held].float().mean()), 4)
            for k, (name, head) in enumerate(teacher.heads.items())}
