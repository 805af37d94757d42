"""Teachers for stage 1: modules mapping image tiles to patch features [T, N, W]. The shapes world's
tiny vision encoder (the stand-in for InternViT, trained here on scene attributes), or any local
Hugging Face vision model folder. Which one is read from the folder's config.json."""

from __future__ import annotations

import json
import os
import random

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hovle_edge.errors import ConfigError
from hovle_edge.files import atomic_directory, check_replaceable, folder_with
from hovle_edge.preprocess import normalize
from hovle_edge.shapes import world

ARCHITECTURE = "ShapesTeacher"
MADE_HERE = folder_with("config.json", architectures=[ARCHITECTURE])  # what --out may replace


def fit(pixel_values, size: int):
    """Tiles resized (bicubic) to the teacher's own input size when the student's differs."""
    if pixel_values.shape[-1] == size:
        return pixel_values
    return F.interpolate(pixel_values, size=(size, size), mode="bicubic", align_corners=False)


class ShapesTeacher(nn.Module):
    """A small convolutional encoder: stride-2 3x3 stages down to a grid x grid feature map (one
    feature per patch, each seeing about a quadrant), and per-quadrant attribute heads. A ViT of the
    same cost trained on the same budget never learned to tell shapes apart (30% on occupied
    quadrants against 98% for this one), and a teacher cannot pass on what it does not know."""

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


TEACHER_STEPS = 400  # 40-50 s on 2 CPU cores; shape, colour and size at 97% or more on the things


def pretrain_teacher(out: str, steps: int = TEACHER_STEPS, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                     progress: bool = True) -> dict[str, float]:
    """Train the shapes teacher on scene attributes; returns each attribute's accuracy on the things
    of fresh scenes."""
    from tqdm import tqdm

    check_replaceable(out, True, MADE_HERE, what="teacher folder")
    torch.manual_seed(seed)
    teacher = ShapesTeacher()
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=lr)
    bar = tqdm(range(steps), desc="teacher", disable=not progress, dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / steps))
        pixels, targets = scene_batch(seed * 1_000_000 + step, batch_size, teacher.config["image_size"])
        loss = teacher_loss(teacher, pixels, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    accuracy = attribute_accuracy(teacher, seed=random.Random(seed).randrange(10**6) + 7_000_000)
    with atomic_directory(out, overwrite=True, owned_by=MADE_HERE, what="teacher folder") as tmp:
        save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump({**teacher.config, "accuracy_on_things": accuracy}, f, indent=2)
    return accuracy


@torch.no_grad()
def attribute_accuracy(teacher: ShapesTeacher, seed: int, count: int = 256) -> dict[str, float]:
    """Accuracy of each attribute head on the quadrants that hold a thing (empty ones are easy and
    would hide a teacher blind to shape)."""
    pixels, targets = scene_batch(seed, count, teacher.config["image_size"])
    pooled = teacher.quadrants(teacher(pixels))
    held = targets[..., 0] != len(world.SHAPES)
    return {name: round(float((head(pooled).argmax(-1) == targets[..., k])[held].float().mean()), 4)
            for k, (name, head) in enumerate(teacher.heads.items())}


class HFVisionTeacher(nn.Module):
    """A local Hugging Face vision model: patch features of its last hidden state, class token dropped."""

    def __init__(self, directory: str):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        vision = getattr(config, "vision_config", config)
        self.model = AutoModel.from_pretrained(directory, local_files_only=True)
        self.model = getattr(self.model, "vision_model", self.model)
        self.image_size = vision.image_size
        self.width = vision.hidden_size

    def forward(self, pixel_values):
        hidden = self.model(pixel_values=fit(pixel_values, self.image_size)).last_hidden_state
        grid = int(hidden.shape[1] ** 0.5)
        return hidden[:, -grid * grid:]  # drop a leading class token when there is one


def load_teacher(directory: str) -> nn.Module:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{directory}: no config.json for the teacher")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if ARCHITECTURE in config.get("architectures", []):
        keys = ("image_size", "grid", "width", "channels")
        teacher = ShapesTeacher(**{k: config[k] for k in keys})
        teacher.load_state_dict(load_file(os.path.join(directory, "model.safetensors")))
    else:
        teacher = HFVisionTeacher(directory)
    return teacher.eval().requires_grad_(False)
