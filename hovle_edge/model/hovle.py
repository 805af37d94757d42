"""HoVLE: the holistic embedding feeding an unchanged InternLM2. One cached 32-layer stack cut in
two: the embedding's layers and the LLM's layers each keep their own KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn

from hovle_edge.config import HoVLEConfig
from hovle_edge.model.embedding import HolisticEmbedding
from hovle_edge.model.layers import KV
from hovle_edge.model.llm import InternLM2ForCausalLM


class HoVLECache(NamedTuple):
    embedding: list[KV]  # one (key, value) per embedding layer, [B, kv_heads, T, head_dim]
    llm: list[KV]  # one per LLM layer

    @property
    def length(self) -> int:
        return self.llm[0][0].shape[2]


@dataclass
class HoVLEOutput:
    logits: torch.Tensor  # [B, S, V]
    past_key_values: HoVLECache


def default_positions(input_ids, attention_mask, past_length: int):
    """attention_mask [B, P+S] (ones when None) and position_ids [B, S] counting real tokens only."""
    B, S = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, past_length + S, dtype=torch.long, device=input_ids.device)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -S:]
    return position_ids, attention_mask


class HoVLE(nn.Module):
    def __init__(self, config: HoVLEConfig):
        super().__init__()
        self.config = config
        self.embedding_model = HolisticEmbedding(config.embedding_config)
        self.language_model = InternLM2ForCausalLM(config.llm_config)

    def forward(self, input_ids, pixel_values=None, position_ids=None, attention_mask=None,
                past_key_values: HoVLECache | None = None) -> HoVLEOutput:
        past_length = 0 if past_key_values is None else past_key_values.length
        if attention_mask is not None and attention_mask.dim() == 4:  # a packed training batch (train.data.collate)
            if position_ids is None or past_length:
                raise ValueError("a 4-D (packed) attention mask needs position_ids and no cache")
        else:
            default_pos, attention_mask = default_positions(input_ids, attention_mask, past_length)
            position_ids = default_pos if position_ids is None else position_ids
        image_embeds = None
        if pixel_values is not None:
            image_embeds = self.embedding_model.image_embeds(pixel_values).flatten(0, 1)  # [tiles*256, C]
        emb_past = None if past_key_values is None else past_key_values.embedding
        llm_past = None if past_key_values is None else past_key_values.llm
        inputs_embeds, emb_presents = self.embedding_model(input_ids, image_embeds, position_ids, attention_mask, emb_past)
        logits, llm_presents = self.language_model(inputs_embeds, position_ids, attention_mask, llm_past)
        return HoVLEOutput(logits, HoVLECache(emb_presents, llm_presents))

    @classmethod
    def from_pretrained(cls, directory: str, dtype=torch.float32, device="cpu") -> "HoVLE":
        from hovle_edge.model.weights import load_model
        return load_model(directory, dtype=dtype, device=device)

    def save_pretrained(self, directory: str, max_shard_bytes: int = 5_000_000_000) -> None:  # HF "5GB"
        from hovle_edge.model.weights import save_model
        save_model(self, directory, max_shard_bytes=max_shard_bytes)
