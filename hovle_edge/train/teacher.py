"""Teachers for stage 1: modules mapping image tiles to patch features [T, N, W]. Any local Hugging
Face vision model folder (InternViT for the real model), or the shapes world's tiny encoder. Which
one is read from the folder's config.json."""

from __future__ import annotations

import os

import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from hovle_edge.errors import ConfigError
from hovle_edge.files import read_json

SHAPES_TEACHER = "ShapesTeacher"


def fit(pixel_values, size: int):
    """Tiles resized (bicubic) to the teacher's own input size when the student's differs."""
    if pixel_values.shape[-1] == size:
        return pixel_values
    return F.interpolate(pixel_values, size=(size, size), mode="bicubic", align_corners=False)


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
    config = read_json(path, ConfigError)
    if SHAPES_TEACHER in config.get("architectures", []):
        from hovle_edge.shapes.teacher import ShapesTeacher

        keys = ("image_size", "grid", "width", "channels")
        teacher = ShapesTeacher(**{k: config[k] for k in keys})
        teacher.load_state_dict(load_file(os.path.join(directory, "model.safetensors")))
    else:
        teacher = HFVisionTeacher(directory)
    return teacher.eval().requires_grad_(False)
