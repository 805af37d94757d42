"""InternLM2 as HoVLE uses it: inputs_embeds in, logits out, with a KV cache. Parameter names match
`language_model.*` of the official checkpoint."""

from __future__ import annotations

import torch.nn as nn

from hovle_edge.config import LLMConfig
from hovle_edge.model.layers import KV, DecoderLayer, RMSNorm, run_layers


class InternLM2Model(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # unused by HoVLE at inference
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class InternLM2ForCausalLM(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.model = InternLM2Model(cfg)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def hidden_states(self, inputs_embeds, position_ids, attention_mask, past: list[KV] | None = None):
        """-> (final-normed hidden [B, S, C], presents)."""
        x, presents = run_layers(self.model.layers, self.cfg, inputs_embeds, position_ids, attention_mask, past)
        return self.model.norm(x), presents

    def forward(self, inputs_embeds, position_ids, attention_mask, past: list[KV] | None = None):
        """-> (logits [B, S, V], presents)."""
        hidden, presents = self.hidden_states(inputs_embeds, position_ids, attention_mask, past)
        return self.output(hidden), presents
