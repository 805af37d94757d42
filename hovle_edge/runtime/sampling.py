"""Choosing the next token from logits in numpy: greedy, temperature, top-k, top-p, repetition
penalty, seeded so that the same seed gives the same text."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hovle_edge.errors import InputError


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 is greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1 (got {self.max_new_tokens})")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise InputError(f"sampling settings out of range: temperature {self.temperature} (>= 0), top_k "
                             f"{self.top_k} (>= 0), top_p {self.top_p} (0 < p <= 1), repetition_penalty "
                             f"{self.repetition_penalty} (> 0)")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, seen_ids: list[int]) -> int:
        """logits [V] -> the next token id; `seen_ids` are penalized as Hugging Face does."""
        p = self.params
        logits = logits.astype(np.float64)
        if p.repetition_penalty != 1.0 and seen_ids:
            seen = np.unique(np.asarray(seen_ids))
            values = logits[seen]
            logits[seen] = np.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if p.temperature == 0:
            return int(np.argmax(logits))
        logits = logits / p.temperature
        if 0 < p.top_k < logits.size:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            sorted_probs = probs[order]
            keep = np.cumsum(sorted_probs) - sorted_probs < p.top_p  # the first token is always kept
            probs = np.zeros_like(probs)
            probs[order[keep]] = sorted_probs[keep]
            probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))
