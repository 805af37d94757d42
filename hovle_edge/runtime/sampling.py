"""Choosing the next token from logits in numpy: greedy, temperature, top-k, top-p, repetition
penalty, seeded so that the same seed gives the same text."""

from __future__ import annotations

import math
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
        # NaN passes every `<` test, so each number is first checked to be finite (or whole).
        rules = [("max_new_tokens", _whole, lambda v: v >= 1, ">= 1"),
                 ("temperature", _finite, lambda v: v >= 0, ">= 0 (0 is greedy)"),
                 ("top_k", _whole, lambda v: v >= 0, ">= 0 (0 keeps every token)"),
                 ("top_p", _finite, lambda v: 0 < v <= 1, "in (0, 1]"),
                 ("repetition_penalty", _finite, lambda v: v > 0, "> 0"),
                 ("seed", _whole, lambda v: 0 <= v < 2**63, "in [0, 2**63)")]
        for name, kind, in_range, rule in rules:
            value = getattr(self, name)
            if name == "seed" and value is None:
                continue
            if not kind(value) or not in_range(value):
                raise InputError(f"{name} {value!r} is not a usable setting: it must be a "
                                 f"{'whole' if kind is _whole else 'finite'} number {rule}")


def _whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _finite(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self._scratch = None  # float64 logits [V], made at the first call that needs it and reused

    def __call__(self, logits: np.ndarray, seen_ids: list[int]) -> int:
        """logits [V] -> the next token id; `seen_ids` are penalized as Hugging Face does. The caller's
        logits are never changed."""
        p = self.params
        if p.temperature == 0 and p.repetition_penalty == 1.0:
            return int(np.argmax(logits))  # widening to float64 keeps the order: no copy needed
        if self._scratch is None or self._scratch.shape != logits.shape:
            self._scratch = np.empty(logits.shape, dtype=np.float64)
        np.copyto(self._scratch, logits)
        logits = self._scratch
        if p.repetition_penalty != 1.0 and seen_ids:
            seen = np.unique(np.asarray(seen_ids))
            values = logits[seen]
            logits[seen] = np.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if p.temperature == 0:
            return int(np.argmax(logits))
        logits /= p.temperature  # in the scratch buffer, as the steps below
        if 0 < p.top_k < logits.size:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits[logits < kth] = -np.inf
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
