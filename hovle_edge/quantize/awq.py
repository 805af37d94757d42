"""Activation-aware scales (after AWQ, Lin et al. 2023): input channels that carry large activations
matter more, so their weight rows are scaled up by s before rounding (losing less to it) and the
activation divided by s. s = mean|x|^alpha per input channel, alpha picked from a small grid to
minimise the layer's output error on calibration activations; alpha = 0 is plain round-to-nearest,
so the search never does worse than it on those activations. Then, as AWQ does too, each block's
range may be clipped (its largest values saturate so the rest round finer) where that lowers the
block's share of the output error."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hovle_edge.quantize.blocks import quantize_weight

GRID = 20  # alphas 0, 0.05, ..., 0.95
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55)
SEARCH_ROWS = 512  # calibration rows used to score each choice


@dataclass
class ScaleChoice:
    scale: np.ndarray  # s [K], float32
    alpha: float
    error: float  # mean squared output error with s
    rtn_error: float  # the same for plain round-to-nearest (alpha 0)


def output_error(activations: np.ndarray, weight: np.ndarray, reference: np.ndarray, scale: np.ndarray,
                 bits: int, group_size: int, clip: np.ndarray | None = None) -> float:
    quantized = quantize_weight(weight * scale[:, None], bits, group_size, clip=clip).dequantize().astype(np.float32)
    approx = (activations / scale) @ quantized
    return float(np.mean((approx - reference) ** 2))


def rows_for_search(activations: np.ndarray, rows: int = SEARCH_ROWS) -> np.ndarray:
    return activations[np.linspace(0, len(activations) - 1, min(rows, len(activations))).astype(int)]


def search_clip(weight: np.ndarray, activations: np.ndarray, bits: int, group_size: int,
                ratios=CLIP_RATIOS) -> np.ndarray:
    """Per block and column, the range ratio [K // g, N] that least disturbs that block's share of the
    output (`weight` and `activations` already scaled by s and 1/s); blocks are scored apart, their
    cross terms left out."""
    rows, cols = weight.shape
    blocks = rows // group_size
    sample = rows_for_search(activations)
    best = np.ones((blocks, cols), dtype=np.float32)
    best_error = np.full((blocks, cols), np.inf)
    for ratio in ratios:
        clip = np.full((blocks, cols), ratio, dtype=np.float32)
        difference = weight - quantize_weight(weight, bits, group_size, clip=clip).dequantize().astype(np.float32)
        for b in range(blocks):
            part = slice(b * group_size, (b + 1) * group_size)
            error = np.mean((sample[:, part] @ difference[part]) ** 2, axis=0)  # [N]
            better = error < best_error[b]
            best[b, better], best_error[b, better] = ratio, error[better]
    return best


def search_scale(weight: np.ndarray, activations: np.ndarray, bits: int, group_size: int,
                 grid: int = GRID, rows: int = SEARCH_ROWS) -> ScaleChoice:
    """The best s for `weight` [K, N] (several MatMuls reading one input may be concatenated along N)
    given its input `activations` [n, K]."""
    weight = weight.astype(np.float32)
    magnitude = np.abs(activations).mean(axis=0)  # over every calibration row
    sample = rows_for_search(activations, rows)
    reference = sample @ weight
    best = None
    rtn_error = None
    for step in range(grid):
        alpha = step / grid
        scale = np.maximum(magnitude, 1e-8) ** alpha
        scale = (scale / np.sqrt(scale.max() * scale.min())).astype(np.float32)  # centred around 1
        error = output_error(sample, weight, reference, scale, bits, group_size)
        if step == 0:
            rtn_error = error
        if best is None or error < best.error:
            best = ScaleChoice(scale, alpha, error, rtn_error)
    best.rtn_error = rtn_error
    return best
