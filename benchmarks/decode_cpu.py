"""Decode speed on this CPU, side by side in one run, same weights: this runtime (ONNX Runtime),
the PyTorch reference with its KV caches, and the PyTorch reference recomputing the whole sequence
at every step (what the official remote code does), at several contexts.

    python benchmarks/decode_cpu.py [--size w512|w1024] [--target onnxruntime|tensorrt] [--contexts 128,512,2048]
                                    [--work DIR]

Both sides run their own loops: the runtime's Pipeline.generate_ids and the reference's generate.

Targets (issue 5): decode step time grows less than 1.5x from 128 to 2048 context; this runtime at
least 1.3x the cached reference and at least 10x the recomputing reference at 2048."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import SIZES, prepared  # noqa: E402

from hovle_edge.model import HoVLE, generate  # noqa: E402
from hovle_edge.runtime import Pipeline  # noqa: E402


def runtime_step_ms(pipe: Pipeline, ids: list[int], steps: int) -> float:
    _, timings = pipe.generate_ids(pipe.new_cache(), ids, stop_ids=(), max_new_tokens=steps + 1)
    return 1000 * statistics.median(timings.steps)


def torch_step_ms(model: HoVLE, ids: list[int], steps: int, cached: bool) -> float:
    """Median step of the PyTorch reference's own loop (model/generate.py), from one chosen token to the next."""
    chosen = []
    generate(model, torch.tensor([ids]), max_new_tokens=steps + 1, use_cache=cached,
             on_token=lambda token: chosen.append(time.perf_counter()))
    return 1000 * statistics.median(b - a for a, b in zip(chosen, chosen[1:]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="w512")
    parser.add_argument("--target", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                        help="graph target of the runtime's export")
    parser.add_argument("--contexts", default="128,512,2048")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per context (runtime, cached)")
    parser.add_argument("--recompute-steps", type=int, default=3, help="steps timed for the recomputing reference")
    parser.add_argument("--work", default=os.path.join("benchmarks", ".work"))
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    checkpoint, model_dir = prepared(args.size, args.work, "fp32", args.target)
    model = HoVLE.from_pretrained(checkpoint)
    rng = np.random.default_rng(0)
    vocab = model.config.llm_config.vocab_size
    rows = []
    with Pipeline.from_dir(model_dir) as pipe:
        for context in contexts:
            ids = [int(i) for i in rng.integers(20, vocab, context)]
            ids = [i if i != model.config.embedding_config.img_context_token_id else i + 1 for i in ids]
            ort_ms = runtime_step_ms(pipe, ids, args.steps)
            cached_ms = torch_step_ms(model, ids, args.steps, cached=True)
            recompute_ms = torch_step_ms(model, ids, args.recompute_steps, cached=False)
            rows.append((context, ort_ms, cached_ms, recompute_ms))
    width, layers = SIZES[args.size][0], SIZES[args.size][1]
    print(f"model {args.size}: width {width}, {layers} + {layers} layers, fp32, {args.target} graphs; "
          f"{torch.get_num_threads()} threads; "
          f"median step time")
    print(f"{'context':>8}{'runtime ms':>12}{'cached ms':>11}{'recompute ms':>14}{'runtime tok/s':>15}"
          f"{'vs cached':>11}{'vs recompute':>14}")
    for context, ort_ms, cached_ms, recompute_ms in rows:
        print(f"{context:>8}{ort_ms:>12.2f}{cached_ms:>11.2f}{recompute_ms:>14.1f}{1000 / ort_ms:>15.1f}"
              f"{cached_ms / ort_ms:>10.2f}x{recompute_ms / ort_ms:>13.1f}x")
    first, last = rows[0], rows[-1]
    print(f"runtime step time growth {first[0]} -> {last[0]}: {last[1] / first[1]:.2f}x (target < 1.5x); "
          f"cached reference: {last[2] / first[2]:.2f}x")


if __name__ == "__main__":
    main()
