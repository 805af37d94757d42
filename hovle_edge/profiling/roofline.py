"""The decode roofline: a decoded token reads every weight of both stacks once (plus one row of the
word embedding) and the KV cache of the whole context, so memory bandwidth bounds tokens/s. From a
manifest's model numbers and a device's bandwidth; no GPU needed, so a device can be sized before
it is bought. Torch-free."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

# Peak DRAM bandwidth from the vendors' datasheets, in GB/s (10^9 bytes).
DEVICES = {
    "orin-nano": ("Jetson Orin Nano 8GB", 68.0),
    "orin-nx": ("Jetson Orin NX 16GB", 102.4),
    "orin-agx": ("Jetson AGX Orin 64GB", 204.8),
    "thor": ("Jetson Thor", 273.0),
    "rtx4090": ("GeForce RTX 4090", 1008.0),
    "h100": ("H100 SXM", 3350.0),
    "h200": ("H200", 4800.0),
}
DTYPE_BYTES = {"fp32": 4, "fp16": 2}


def layer_parameters(stack: dict, hidden: int) -> int:
    """Weights of one InternLM2 layer: fused wqkv, wo, SwiGLU, two RMSNorms."""
    attention = hidden * (stack["heads"] + 2 * stack["kv_heads"]) * stack["head_dim"] + stack["heads"] * stack["head_dim"] * hidden
    return attention + 3 * hidden * stack["intermediate"] + 2 * hidden


@dataclass
class DecodeCost:
    weight_bytes: int  # read once per decoded token
    kv_bytes_per_token: int  # read per token of context, per decoded token

    def bytes_per_step(self, context: int) -> int:
        return self.weight_bytes + context * self.kv_bytes_per_token

    def bound_tokens_per_s(self, bandwidth_gbs: float, context: int) -> float:
        return bandwidth_gbs * 1e9 / self.bytes_per_step(context)


def decode_cost(model: dict, precision: str, quantization: dict | None = None) -> DecodeCost:
    """From a manifest's "model" section (spec.model_section), its precision, and its "quantization"
    section when `hovle-edge quantize` made it (linear weights then cost bits/8 bytes plus one scale
    per group; norms, the embedding row and, unless quantized too, the head stay in `precision`)."""
    size = DTYPE_BYTES[precision]
    hidden, vocab = model["hidden"], model["vocab"]
    stacks = model["stacks"].values()
    linear = size if not quantization else quantization["bits"] / 8 + size / quantization["group_size"]
    head = linear if quantization and quantization["quantized_head"] else size
    norms = sum(s["layers"] * 2 * hidden for s in stacks)
    linears = sum(s["layers"] * layer_parameters(s, hidden) for s in stacks) - norms
    weights = linears * linear + (norms + hidden + hidden) * size  # + one word-embedding row, the final norm
    weights += vocab * hidden * head  # the output head
    kv = sum(2 * s["layers"] * s["kv_heads"] * s["head_dim"] for s in stacks)
    return DecodeCost(round(weights), kv * size)


def host_bandwidth_gbs(megabytes: int = 256, repeats: int = 5) -> float:
    """This machine's copy bandwidth (bytes read + written per second), best of a few numpy copies."""
    source = np.ones(megabytes * 2**20 // 8, dtype=np.float64)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - started)
    return 2 * source.nbytes / best / 1e9


def roofline_table(cost: DecodeCost, contexts: list[int], devices: dict[str, tuple[str, float]],
                   measured: dict[int, float] | None = None, measured_device: str | None = None) -> list[dict]:
    """One row per (device, context): the bound on decode tokens/s, and the measured fraction of it
    for the device the measurement ran on."""
    rows = []
    for key, (name, bandwidth) in devices.items():
        for context in contexts:
            bound = cost.bound_tokens_per_s(bandwidth, context)
            row = {"device": key, "name": name, "bandwidth_gbs": bandwidth, "context": context,
                   "bytes_per_token": cost.bytes_per_step(context), "bound_tokens_per_s": bound}
            if measured and key == measured_device and context in measured:
                row["measured_tokens_per_s"] = measured[context]
                row["fraction_of_bound"] = measured[context] / bound
            rows.append(row)
    return rows
