"""Activation-aware scales (after AWQ, Lin et al. 2023): input channels that carry large activations
matter more, so their weight rows are scaled up by s before rounding (losing less to it) and the
activation divided by s. s = mean|x|^alpha per input channel, alpha picked from a small grid to
minimise the layer's output error on calibration activations; alpha = 0 is plain round-to-nearest,
so the search never does worse than it on those activations."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hovle_edge.quantize.blocks import quantize_weight

GRID = 20  # alphas 0, 0.05, ..., 0.95
SEARCH_ROWS = 512  # calibration rows used to score each alpha


@dataclass
class ScaleChoice:
    scale: np.ndarray  # s [K], float32
    alpha: float
    error: float  # mean squared output error with s
    rtn_error: float  # the same for plain round-to-nearest (alpha 0)


def output_error(activations: np.ndarray, weight: np.ndarray, reference: np.ndarray, scale: np.ndarray,
                 bits: int, group_size: int) -> float:
    quantized = quantize_weight(weight * scale[:, None], bits, group_size).dequantize().astype(np.float32)
    approx = (activations / scale) @ quantized
    return float(np.mean((approx - reference) ** 2))


def search_scale(weight: np.ndarray, activations: np.ndarray, bits: int, group_size: int,
                 grid: int = GRID, rows: int = SEARCH_ROWS) -> ScaleChoice:
    """The best s for `weight` [K, N] (several MatMuls reading one input may be concatenated along N)
    given its input `activations` [n, K]."""
    weight = weight.astype(np.float32)
    magnitude = np.abs(activations).mean(axis=0)  # over every calibration row
    sample = activations[np.linspace(0, len(activations) - 1, min(rows, len(activations))).astype(int)]
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
