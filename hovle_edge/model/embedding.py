"""The holistic embedding: patch embedding, pixel shuffle and projection for image tiles; word
embedding for text; then N causal InternLM2 layers over the mixed sequence. Its hidden states at
every position (no final norm) are the LLM's inputs_embeds."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hovle_edge.config import EmbeddingConfig
from hovle_edge.model.layers import KV, DecoderLayer, run_layers


def pixel_shuffle(x):
    """[T, H, W, C] -> [T, H/2 * W/2, 4C]. Token (r, q) concatenates patches (2r, 2q), (2r, 2q+1),
    (2r+1, 2q), (2r+1, 2q+1) along channels, in that order (the official 0.5 shuffle)."""
    T, H, W, C = x.shape
    x = x.reshape(T, H // 2, 2, W // 2, 2, C)  # (T, r, a, q, b, C): patch (2r+a, 2q+b)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(T, (H // 2) * (W // 2), 4 * C)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: EmbeddingConfig):
        super().__init__()
        self.grid = cfg.grid
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))  # stored, unused
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + cfg.grid ** 2, cfg.hidden_size))

    def patch_positions(self, rows: int, cols: int):
        """The 1024 (grid^2) patch position rows, resized bicubically in fp32 when the grid differs."""
        pos = self.position_embedding[:, 1:]
        if (rows, cols) == (self.grid, self.grid):
            return pos
        C = pos.shape[-1]
        pos = pos.float().reshape(1, self.grid, self.grid, C).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(rows, cols), mode="bicubic", align_corners=False)
        return pos.permute(0, 2, 3, 1).reshape(1, rows * cols, C).to(self.position_embedding.dtype)

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [T, C, gh, gw]
        T, C, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2) + self.patch_positions(gh, gw)  # [T, gh*gw, C], row-major
        return x.reshape(T, gh, gw, C)


class HolisticEmbedding(nn.Module):
    def __init__(self, cfg: EmbeddingConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_embeddings = VisionEmbeddings(cfg)
        self.llm_text_embeddings = nn.Embedding(cfg.llm_vocab_size, cfg.llm_hidden_size)
        self.encoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.pixel_shuffle_proj = nn.Sequential(
            nn.Linear(4 * cfg.hidden_size, cfg.llm_hidden_size), nn.GELU(),
            nn.Linear(cfg.llm_hidden_size, cfg.llm_hidden_size))

    def image_embeds(self, pixel_values):
        """pixel_values [T, 3, S, S] -> image tokens [T, tokens_per_tile, C] (runs once per image)."""
        return self.pixel_shuffle_proj(pixel_shuffle(self.vision_embeddings(pixel_values)))

    def merge(self, input_ids, image_embeds):
        """Word embeddings with image rows at the `<IMG_CONTEXT>` positions: the k-th such position
        (row-major over the batch) takes row k of `image_embeds` [N, C]. Static shapes only."""
        words = self.llm_text_embeddings(input_ids)  # [B, S, C]
        if image_embeds is None:
            return words
        is_image = input_ids == self.cfg.img_context_token_id
        row = torch.cumsum(is_image.reshape(-1).long(), dim=0) - 1
        row = row.clamp(0, image_embeds.shape[0] - 1)
        rows = image_embeds.to(words.dtype)[row].reshape(words.shape)
        return torch.where(is_image[..., None], rows, words)

    def forward(self, input_ids, image_embeds, position_ids, attention_mask, past: list[KV] | None = None):
        """-> (inputs_embeds [B, S, C], presents). `image_embeds` [N, C] or None for text only."""
        x = self.merge(input_ids, image_embeds)
        return run_layers(self.encoder, self.cfg, x, position_ids, attention_mask, past)
