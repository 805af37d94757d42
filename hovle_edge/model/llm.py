"""InternLM2 as HoVLE uses it: inputs_embeds in, logits out, with a KV cache. Parameter names match
`language_model.*` of the official checkpoint."""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from hovle_edge.config import LLMConfig, config_from_dict
from hovle_edge.errors import ConfigError
from hovle_edge.files import read_json
from hovle_edge.model.layers import KV, DecoderLayer, RMSNorm, run_layers
from hovle_edge.model.weights import check_state_dict, read_state_dict

ARCHITECTURE = "InternLM2ForCausalLM"


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

    @classmethod
    def from_pretrained(cls, directory: str) -> "InternLM2ForCausalLM":
        """An InternLM2 folder (config.json with the llm keys, `model.*` / `output.weight` safetensors),
        in eval mode; the weights are assigned, not copied into fresh parameters."""
        path = os.path.join(directory, "config.json")
        config = config_from_dict(LLMConfig, read_json(path, ConfigError), path)
        with torch.device("meta"):
            model = cls(config)
        state = read_state_dict(directory)
        check_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()}, state, directory)
        model.load_state_dict(state, assign=True)
        return model.eval()
