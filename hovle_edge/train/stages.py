"""The paper's three stages as Tasks for the shared loop.

1. distill: only the holistic embedding trains; its image tokens are pulled to a frozen teacher's
   features (through a learned map, dropped afterwards), its text tokens to the frozen LLM's input
   embeddings, by negative cosine similarity, on unpaired images and random token sequences.
2. align: holistic embedding + frozen LLM, next-token loss on image-caption pairs.
3. instruct: the whole model, conversations with images, loss on the assistant's tokens only.
Each stage starts from the previous stage's folder and inherits its settings unless overridden."""

from __future__ import annotations

import os
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

from hovle_edge.config import EmbeddingConfig, HoVLEConfig
from hovle_edge.errors import ConfigError
from hovle_edge.files import read_json, write_json
from hovle_edge.model import HoVLE
from hovle_edge.model.weights import save_model
from hovle_edge.preprocess import load_image, preprocess_image
from hovle_edge.tokenizer import IMG_CONTEXT, IMG_END, IMG_START, TOKENIZER_FILES, ChatTemplate, Tokenizer
from hovle_edge.train.data import Examples, collate, image_files, picks
from hovle_edge.model.llm import ARCHITECTURE as LM_ARCHITECTURE, InternLM2ForCausalLM
from hovle_edge.train.losses import next_token_loss
from hovle_edge.train.loop import Task, TrainSettings, claim_training_output, inherited, train
from hovle_edge.train.teacher import load_teacher


def init_model(init: str, embedding: dict | None = None) -> HoVLE:
    """A HoVLE checkpoint folder as it is, or a fresh holistic embedding in front of an InternLM2
    folder (its word embedding copied from the LLM's). Which one is read from config.json."""
    path = os.path.join(init, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{init}: no config.json")
    data = read_json(path, ConfigError)
    if "embedding_config" in data:
        return HoVLE.from_pretrained(init)
    if LM_ARCHITECTURE not in data.get("architectures", []):
        raise ConfigError(f"{path}: neither a HoVLE checkpoint nor an {LM_ARCHITECTURE} folder")
    lm = InternLM2ForCausalLM.from_pretrained(init)
    tokenizer = Tokenizer.from_dir(init)
    llm = lm.cfg
    settings = dict(hidden_size=llm.hidden_size, num_attention_heads=llm.num_attention_heads,
                    num_key_value_heads=llm.num_key_value_heads, intermediate_size=llm.intermediate_size,
                    rope_theta=llm.rope_theta, rms_norm_eps=llm.rms_norm_eps, llm_hidden_size=llm.hidden_size,
                    llm_vocab_size=llm.vocab_size, img_context_token_id=tokenizer.token_id(IMG_CONTEXT))
    settings.update(embedding or {})
    emb = EmbeddingConfig(**settings)
    config = HoVLEConfig(embedding_config=emb, llm_config=llm, force_image_size=emb.image_size,
                         max_dynamic_patch=4, extra={"system_message": None})
    model = HoVLE(config)
    model.language_model.load_state_dict(lm.state_dict())
    with torch.no_grad():
        model.embedding_model.llm_text_embeddings.weight.copy_(lm.model.tok_embeddings.weight)
        # Patch positions start as fixed 2D sines and cosines. Started random (std 0.02, beside patch
        # features of norm ~30), no linear probe could tell an image token's quadrant (25%, chance).
        model.embedding_model.vision_embeddings.position_embedding[0, 1:] = sincos_positions(emb.grid, emb.hidden_size)
    return model


def sincos_positions(grid: int, width: int):
    """[grid*grid, width] fixed 2D sine-cosine positions (as MAE's): half the channels the row, half the column."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    angles = torch.arange(grid, dtype=torch.float32)[:, None] * omega  # [grid, quarter]
    axis = torch.cat((angles.sin(), angles.cos()), dim=1)  # [grid, width/2]
    rows = axis[:, None].expand(grid, grid, -1)
    cols = axis[None, :].expand(grid, grid, -1)
    return torch.cat((rows, cols), dim=-1).reshape(grid * grid, width)


def tokenizer_files(directory: str) -> dict[str, str]:
    return {name: os.path.join(directory, name) for name in TOKENIZER_FILES if os.path.isfile(os.path.join(directory, name))}


class HoVLETask(Task):
    """What the three stages share: the model, its tokenizer and template, and how to save."""

    def __init__(self, init: str, model: HoVLE, record: dict):
        self.init = init
        self.model = model
        self.tokenizer = Tokenizer.from_dir(init)
        self.template = ChatTemplate(model.config.tokens_per_tile, model.config.extra.get("system_message"))
        self.tokenizer_sources = tokenizer_files(init)
        self.record = record

    def save(self, directory: str, weights: dict) -> None:
        save_model(self.model, directory, extra_files=self.tokenizer_sources, weights=weights)


class DistillModule(nn.Module):
    def __init__(self, model: HoVLE, teacher_width: int, image_open_close: tuple[int, int]):
        super().__init__()
        self.model = model
        self.projection = nn.Linear(model.config.embedding_config.hidden_size, teacher_width)  # dropped afterwards
        self.image_open_close = image_open_close

    def image_tokens(self, pixel_values):
        """The holistic embedding's outputs at the image positions of `<img>` + tokens + `</img>`."""
        emb = self.model.embedding_model
        cfg = emb.cfg
        n = cfg.tokens_per_tile
        opening, closing = self.image_open_close
        ids = torch.tensor([opening] + [cfg.img_context_token_id] * n + [closing], device=pixel_values.device)
        ids = ids.expand(len(pixel_values), -1)
        mask = torch.ones_like(ids)
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        out, _ = emb(ids, emb.image_embeds(pixel_values).flatten(0, 1), positions, mask)
        return out[:, 1:1 + n]

    def text_tokens(self, ids):
        emb = self.model.embedding_model
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        out, _ = emb(ids, None, positions, torch.ones_like(ids))
        return out

    def forward(self, batch):
        image_cos = cosine(self.projection(self.image_tokens(batch["pixel_values"])), batch["teacher_features"])
        text_cos = cosine(self.text_tokens(batch["text_ids"]),
                          self.model.language_model.model.tok_embeddings(batch["text_ids"]))
        loss = (1 - image_cos).mean() + (1 - text_cos).mean()  # negative cosine, shifted to be >= 0
        return loss, torch.tensor(image_cos.numel() + text_cos.numel())


def cosine(a, b):
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def pool_tokens(features, tokens: int):
    """Teacher features [T, N, W] -> [T, tokens, W] by average pooling over the square patch grid."""
    T, N, W = features.shape
    if N == tokens:
        return features
    side, target = int(N ** 0.5), int(tokens ** 0.5)
    grid = features.transpose(1, 2).reshape(T, W, side, side)
    return F.adaptive_avg_pool2d(grid, target).reshape(T, W, tokens).transpose(1, 2)


class Distill(HoVLETask):
    def __init__(self, init: str, images: str, teacher: str, text: str | None = None, text_length: int = 32,
                 embedding: dict | None = None, seed: int = 0):
        model = init_model(init, embedding)
        super().__init__(init, model, {"images": images, "teacher": teacher, "text": text})
        model.language_model.requires_grad_(False)
        self.teacher = load_teacher(teacher)
        self.images = image_files(images)
        self.tokens = model.config.tokens_per_tile
        self.module = DistillModule(model, self.teacher.width,
                                    (self.tokenizer.token_id(IMG_START), self.tokenizer.token_id(IMG_END)))
        self.text = None if text is None else self.tokenizer.encode(open(text, encoding="utf-8").read())
        self.text_length, self.seed = text_length, seed

    def tile(self, index: int):
        size = self.model.config.image_size
        return torch.from_numpy(preprocess_image(load_image(self.images[index]), max_num=1, image_size=size))

    def text_ids(self, rng: random.Random):
        """One text sequence: a window of --text, or random tokens that are never an image position."""
        if self.text is not None and len(self.text) > self.text_length:
            start = rng.randrange(len(self.text) - self.text_length)
            return self.text[start:start + self.text_length]
        vocab = self.model.config.llm_config.vocab_size
        context = self.model.config.embedding_config.img_context_token_id
        ids = [rng.randrange(vocab) for _ in range(self.text_length)]
        return [(i + 1) % vocab if i == context else i for i in ids]

    def batch(self, step, micro, rank, world, batch_size):
        images = picks(self.seed, step, rank, world, batch_size, len(self.images), micro)
        texts = picks(self.seed + 1, step, rank, world, batch_size, 1 << 30, micro)
        pixels = torch.cat([self.tile(i) for i in images])
        with torch.no_grad():
            features = pool_tokens(self.teacher(pixels), self.tokens)
        text_ids = torch.tensor([self.text_ids(random.Random(i)) for i in texts])
        return {"pixel_values": pixels, "teacher_features": features, "text_ids": text_ids}

    @torch.no_grad()
    def scores(self, images: list[str], count: int = 64) -> dict:
        """Mean cosine to the teacher on `images` and to the LLM's embeddings on random text."""
        pixels = torch.cat([torch.from_numpy(preprocess_image(load_image(p), max_num=1, image_size=self.model.config.image_size))
                            for p in images[:count]])
        features = pool_tokens(self.teacher(pixels), self.tokens)
        image = cosine(self.module.projection(self.module.image_tokens(pixels)), features).mean()
        ids = torch.tensor([self.text_ids(random.Random(-1 - i)) for i in range(count)])
        text = cosine(self.module.text_tokens(ids), self.model.language_model.model.tok_embeddings(ids)).mean()
        return {"image_cosine": float(image), "text_cosine": float(text)}


class LanguageModule(nn.Module):
    def __init__(self, model: HoVLE):
        super().__init__()
        self.model = model

    def forward(self, batch):
        out = self.model(batch["input_ids"], pixel_values=batch["pixel_values"], position_ids=batch["position_ids"],
                         attention_mask=batch["attention_mask"])
        return next_token_loss(out.logits, batch["labels"])


class Supervised(HoVLETask):
    """align (LLM frozen) and instruct (everything trains): next-token loss on JSONL records."""

    def __init__(self, init: str, data: str, freeze_llm: bool, max_tiles: int | None = None, seed: int = 0):
        model = init_model(init)
        super().__init__(init, model, {"data": data, "max_tiles": max_tiles})
        model.language_model.requires_grad_(not freeze_llm)
        self.module = LanguageModule(model)
        config = model.config
        self.examples = Examples(data, self.tokenizer, self.template, config.image_size,
                                 max_tiles or config.max_dynamic_patch, system=self.template.system is not None)
        self.seed = seed

    def batch(self, step, micro, rank, world, batch_size):
        indices = picks(self.seed, step, rank, world, batch_size, len(self.examples), micro)
        return collate([self.examples.example(i) for i in indices], pad_id=self.tokenizer.eos_id)


STAGE_DEFAULTS = {
    "distill": TrainSettings(steps=2000, batch_size=32, lr=1e-3, warmup=100),
    "align": TrainSettings(steps=2000, batch_size=32, lr=5e-4, warmup=100),
    "instruct": TrainSettings(steps=2000, batch_size=32, lr=2e-4, warmup=50),
}


def settings_for(stage: str, init: str, overrides: dict) -> TrainSettings:
    """The stage's defaults, then what the previous stage used (if it was this stage), then overrides."""
    base = dict(vars(STAGE_DEFAULTS[stage]))
    previous = inherited(init)
    if previous.get("stage") == stage:
        base.update(previous.get("settings", {}))
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainSettings.from_dict(base)


def run_stage(stage: str, init: str, out: str, data: str | None = None, overrides: dict | None = None,
              teacher: str | None = None, text: str | None = None, embedding: dict | None = None,
              held_out: str | None = None, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train one stage from `init` into `out`; returns the final metrics and, for distill with a
    `held_out` image folder, the mean cosines there (written to distill_scores.json)."""
    claim_training_output(out, inputs=[init, data, teacher, text, held_out])  # before any model loads
    settings = settings_for(stage, init, overrides or {})
    previous = inherited(init)
    torch.manual_seed(settings.seed)
    if stage == "distill":
        teacher = teacher or previous.get("teacher")
        if not teacher or not data:
            raise ConfigError("distill needs data (an image folder) and a teacher (a vision model folder)",
                              setting="data" if not data else "teacher")
        task = Distill(init, data, teacher, text=text, embedding=embedding, seed=settings.seed)
    else:
        data = data or previous.get("data")
        if not data:
            raise ConfigError(f"{stage} needs data (a JSONL file)", setting="data")
        task = Supervised(init, data, freeze_llm=stage == "align", seed=settings.seed)
    metrics = train(task, settings, out, desc=stage, progress=progress, stop_after=stop_after)
    if stage == "distill" and held_out and stop_after is None:
        metrics = {**metrics, **task.scores(image_files(held_out))}
        write_json(os.path.join(out, "distill_scores.json"), metrics)
    return metrics
