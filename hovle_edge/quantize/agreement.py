"""How far a quantized folder's next-token distributions are from its source folder's, on held-out
prompts: the source answers greedily, both read the same tokens (teacher forcing), and at every
answer position we count whether their top-1 tokens agree and take KL(source || quantized). This is
what `quantize` reports instead of the bit-exact parity `verify` demands of a float export."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hovle_edge.quantize.calibration import CalibrationSample, encode
from hovle_edge.quantize.prefill import PrefillRunner
from hovle_edge.tokenizer import Tokenizer


@dataclass
class Agreement:
    prompts: int
    positions: int
    top1: float  # fraction of positions whose top-1 tokens agree
    mean_kl: float  # nats, KL(source || quantized), averaged over positions
    max_kl: float

    def to_json(self) -> dict:
        return {"prompts": self.prompts, "positions": self.positions, "top1_agreement": round(self.top1, 4),
                "mean_kl": float(f"{self.mean_kl:.4g}"), "max_kl": float(f"{self.max_kl:.4g}")}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def kl_divergence(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    p = log_softmax(reference_logits)
    return float(np.sum(np.exp(p) * (p - log_softmax(logits))))


def measure_agreement(source, quantized, samples: list[CalibrationSample], new_tokens: int = 8) -> Agreement:
    """`source` and `quantized` are manifests; each prompt's answer runs `new_tokens` tokens or to a stop."""
    tokenizer = Tokenizer.from_dir(source.directory)
    stop_ids = set(source.stop_ids)
    reference, candidate = PrefillRunner(source), PrefillRunner(quantized)
    agree, divergences = 0, []
    for sample in samples:
        ids, pixels = encode(CalibrationSample(sample.question, "", sample.image), source, tokenizer)
        reference_embeds, candidate_embeds = reference.image_embeds(pixels), candidate.image_embeds(pixels)
        for _ in range(new_tokens):  # each position a prefill of the prefix: the graphs give the last logits only
            expected, _ = reference.run(ids, reference_embeds)
            got, _ = candidate.run(ids, candidate_embeds)
            agree += int(expected.argmax() == got.argmax())
            divergences.append(kl_divergence(expected, got))
            token = int(expected.argmax())
            if token in stop_ids:
                break
            ids = ids + [token]
    return Agreement(len(samples), len(divergences), agree / max(1, len(divergences)),
                     float(np.mean(divergences)) if divergences else 0.0, max(divergences, default=0.0))
