"""InternLM2 building blocks shared by the holistic embedding and the LLM: RMSNorm, rotary
embedding, grouped-query attention with the fused `wqkv`, SwiGLU, and a stack of causal layers
with an explicit KV cache. Written to export cleanly: real cos/sin in fp32, masks built from
tensors, no `.item()`, no branches on tensor values."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

KV = tuple[torch.Tensor, torch.Tensor]  # one layer's (key, value), each [B, kv_heads, T, head_dim]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # the variance in fp32, also inside fp16 graphs
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(position_ids, head_dim: int, theta: float, dtype):
    """cos, sin [B, 1, S, head_dim] for `position_ids` [B, S], computed in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                            dtype=torch.float32) / head_dim)
    freqs = position_ids.float()[..., None] * inv_freq  # [B, S, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, S, head_dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def causal_mask(attention_mask, query_len: int):
    """Boolean [B, 1, S, P+S]: query i (absolute position P+i) sees key j when j <= P+i and key j is
    not padding. `attention_mask` [B, P+S] holds 1 for real tokens, 0 for padding."""
    total = attention_mask.shape[1]
    key_pos = torch.arange(total, device=attention_mask.device)
    query_pos = key_pos[total - query_len:]  # the last S positions are the new queries
    causal = key_pos[None, :] <= query_pos[:, None]  # [S, P+S]
    return causal[None, None] & attention_mask[:, None, None, :].bool()


class Attention(nn.Module):
    """Grouped-query attention. `wqkv` rows are grouped per KV head: (kv_head, [q]*groups + [k, v], head_dim)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, theta: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.groups = heads // kv_heads
        self.theta = theta
        self.wqkv = nn.Linear(hidden, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, hidden, bias=False)

    def forward(self, x, cos, sin, mask, past: KV):
        B, S, _ = x.shape
        qkv = self.wqkv(x).view(B, S, self.kv_heads, self.groups + 2, self.head_dim)
        q = qkv[:, :, :, : self.groups].reshape(B, S, self.heads, self.head_dim).transpose(1, 2)
        k = qkv[:, :, :, self.groups].transpose(1, 2)  # [B, kvh, S, d]
        v = qkv[:, :, :, self.groups + 1].transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k = torch.cat((past[0], k), dim=2)  # [B, kvh, P+S, d]
        v = torch.cat((past[1], v), dim=2)
        # GQA by reshape: the query heads of one KV head are adjacent, so [B, h, S, d] is
        # [B, kvh, groups*S, d] and meets its own K/V without expanding the cache per step.
        T, g = k.shape[2], self.groups
        q = (q * self.head_dim ** -0.5).reshape(B, self.kv_heads, g * S, self.head_dim)
        scores = (q @ k.transpose(2, 3)).reshape(B, self.kv_heads, g, S, T)
        scores = scores.float().masked_fill(~mask[:, :, None], torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(v.dtype).reshape(B, self.kv_heads, g * S, T)  # softmax in fp32
        out = (probs @ v).reshape(B, self.heads, S, self.head_dim).transpose(1, 2).reshape(B, S, self.heads * self.head_dim)
        return self.wo(out), (k, v)


class FeedForward(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=False)
        self.w3 = nn.Linear(hidden, intermediate, bias=False)
        self.w2 = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention = Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rope_theta)
        self.feed_forward = FeedForward(cfg.hidden_size, cfg.intermediate_size)
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past: KV):
        h, present = self.attention(self.attention_norm(x), cos, sin, mask, past)
        x = x + h
        return x + self.feed_forward(self.ffn_norm(x)), present


def empty_cache(cfg, batch: int, device, dtype) -> list[KV]:
    """A past of length 0 for every layer of a stack configured by `cfg`."""
    shape = (batch, cfg.num_key_value_heads, 0, cfg.hidden_size // cfg.num_attention_heads)
    return [(torch.zeros(shape, device=device, dtype=dtype),) * 2 for _ in range(cfg.num_hidden_layers)]


def run_layers(layers: nn.ModuleList, cfg, x, position_ids, attention_mask, past: list[KV] | None):
    """N causal layers over `x` [B, S, C] with their KV cache; returns (hidden, presents). No final norm."""
    if past is None:
        past = empty_cache(cfg, x.shape[0], x.device, x.dtype)
    cos, sin = rotary_cos_sin(position_ids, cfg.hidden_size // cfg.num_attention_heads, cfg.rope_theta, x.dtype)
    # A [B, 1, S, S] boolean mask is taken as it is: training rows that pack several examples (train.data.collate).
    mask = attention_mask if attention_mask.dim() == 4 else causal_mask(attention_mask, x.shape[1])
    presents = []
    for layer, layer_past in zip(layers, past):
        x, present = layer(x, cos, sin, mask, layer_past)
        presents.append(present)
    return x, presents
