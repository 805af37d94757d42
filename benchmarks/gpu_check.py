"""The one GPU check: for the tiny model and the w1024 benchmark model at fp16, build TensorRT engines,
check their greedy tokens against ONNX Runtime on the CPU, and measure time to first token and decode
tokens/s of the TensorRT backend against the PyTorch reference with its KV cache on the same GPU (same
weights), each placed on the bandwidth roofline. Writes one JSON; prints a table.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--work DIR] [--flavour tensorrt-rtx|tensorrt]
    python benchmarks/gpu_check.py --dry-run --compute-capability 8.9     # no GPU: exports + AOT builds

With --dry-run (no GPU needed) it does every step that needs none: the exports, the engine builds
ahead of time for the named compute capabilities (TensorRT for RTX), ONNX Runtime's greedy tokens and
the roofline bound; the JSON then holds those and says what was not measured. See benchmarks/README.md
for the wheels it needs. Target: under 8 minutes on one GPU."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import prepared, random_export  # noqa: E402

from hovle_edge.engines.builder import build_engines  # noqa: E402
from hovle_edge.runtime import Pipeline  # noqa: E402
from hovle_edge.profiling.roofline import DEVICES, decode_cost  # noqa: E402

MODELS = ("tiny", "w1024")


def tiny_prepared(work: str) -> tuple[str, str]:
    """(checkpoint, fp16 export) of the tiny preset with random weights spread wide enough (std 0.3)
    that greedy tokens are decided by clear margins, so fp16 on two engines picks the same ones."""
    from hovle_edge.config import preset

    return random_export(preset("tiny"), os.path.join(work, "tiny-checkpoint"), os.path.join(work, "tiny-fp16"),
                         std=0.3, precision="fp16", target="tensorrt", max_context=2048)


def prompt_ids(vocab: int, image_token: int, length: int) -> list[int]:
    """Random text ids (no image placeholder), the same every run."""
    ids = np.random.default_rng(0).integers(20, vocab, length)
    return [int(i) + 1 if i == image_token else int(i) for i in ids]


def greedy(pipe: Pipeline, ids: list[int], new_tokens: int) -> tuple[list[int], float, list[float]]:
    """(tokens, seconds to the first token, each decode step's seconds) through the runtime's own loop."""
    tokens, timings = pipe.generate_ids(pipe.new_cache(len(ids) + new_tokens), ids, stop_ids=(),
                                        max_new_tokens=new_tokens)
    return tokens, timings.first_token, timings.steps


def torch_greedy(checkpoint: str, ids: list[int], new_tokens: int, repeats: int) -> tuple[list[int], float, float]:
    """The PyTorch reference's own loop (model/generate.py) on the GPU, fp16, with its KV cache:
    (tokens, best TTFT s, median step s)."""
    import torch

    from hovle_edge.model import HoVLE, generate

    model = HoVLE.from_pretrained(checkpoint, dtype=torch.float16, device="cuda").eval()
    firsts, steps = [], []
    for _ in range(repeats + 1):  # the first run warms the kernels up and is not counted
        chosen = []  # each token's choice waits for the GPU (int() of its argmax)
        torch.cuda.synchronize()
        started = time.perf_counter()
        tokens = generate(model, torch.tensor([ids], device="cuda"), max_new_tokens=new_tokens,
                          on_token=lambda token: chosen.append(time.perf_counter()))
        firsts.append(chosen[0] - started)
        steps.append([b - a for a, b in zip(chosen, chosen[1:])])
    del model
    torch.cuda.empty_cache()
    return tokens, min(firsts[1:]), statistics.median(s for run in steps[1:] for s in run)


def gpu_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), best of a few 1 GiB copies:
    what a decode step can reach, a little under the datasheet's peak."""
    import torch

    source = torch.ones(2**28, dtype=torch.float32, device="cuda")
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        started = time.perf_counter()
        target.copy_(source)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * source.numel() * 4 / best / 1e9


def check_model(name: str, args, log) -> dict:
    if name == "tiny":
        checkpoint, model_dir = tiny_prepared(args.work)
    else:
        checkpoint, model_dir = prepared(name, args.work, "fp16", "tensorrt")
    engine_dir = os.path.join(args.work, f"{name}-fp16-engines")
    started = time.perf_counter()
    record = build_engines(model_dir, engine_dir, precision="fp16", max_context=args.max_context,
                           max_prompt=args.prompt_tokens, compute_capabilities=args.compute_capability,
                           flavour=args.flavour, cache_dir=os.path.join(args.work, "engine-cache"), overwrite=True,
                           log=log)
    result = {"model_dir": model_dir, "build_seconds": round(time.perf_counter() - started, 1),
              "engines": {g: {"bytes": e["bytes"], "build_seconds": e["build_seconds"], "from_cache": e["from_cache"]}
                          for g, e in record["engines"].items()},
              "flavour": record["flavour"], "tensorrt_version": record["tensorrt_version"],
              "compute_capabilities": record["compute_capabilities"]}
    with Pipeline.from_dir(model_dir) as cpu:
        model = cpu.manifest.model
        ids = prompt_ids(model["vocab"], cpu.image_token, args.prompt_tokens)
        reference, _, _ = greedy(cpu, ids, args.new_tokens)
    cost = decode_cost(model, "fp16")
    context = args.prompt_tokens + args.new_tokens // 2  # the decode steps' middle
    result.update(prompt_tokens=len(ids), new_tokens=args.new_tokens, onnxruntime_cpu_tokens=reference,
                  bytes_per_decode_step=cost.bytes_per_step(context))
    if args.dry_run:
        result["not_measured"] = "dry run: engines were not run, PyTorch was not timed (no GPU used)"
        return result
    with Pipeline.from_dir(engine_dir, backend="tensorrt", device="cuda") as gpu:
        greedy(gpu, ids, args.new_tokens)  # warm-up: TensorRT for RTX compiles its kernels here
        runs = [greedy(gpu, ids, args.new_tokens) for _ in range(args.repeats)]
    tokens = runs[0][0]
    trt_first = min(r[1] for r in runs)
    trt_step = statistics.median([s for r in runs for s in r[2]])
    torch_tokens, torch_first, torch_step = torch_greedy(checkpoint, ids, args.new_tokens, args.repeats)
    agree = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(tokens))
    bound = cost.bound_tokens_per_s(args.bandwidth, context)
    result.update(
        tensorrt_tokens=tokens, pytorch_tokens=torch_tokens, tokens_equal_onnxruntime=tokens == reference,
        tokens_agree_before_first_difference=agree,
        tensorrt={"ttft_ms": 1000 * trt_first, "decode_tokens_per_s": 1 / trt_step,
                  "roofline_fraction": (1 / trt_step) / bound},
        pytorch={"ttft_ms": 1000 * torch_first, "decode_tokens_per_s": 1 / torch_step,
                 "roofline_fraction": (1 / torch_step) / bound},
        roofline_tokens_per_s=bound)
    return result


def table(results: dict, bandwidth: float) -> str:
    measured = f"bandwidth {bandwidth:.0f} GB/s" if bandwidth == bandwidth else "dry run, nothing timed"  # nan: dry
    lines = [f"{measured}; fp16; TTFT best of runs, decode median step",
             f"{'model':<7}{'engine':>10}{'TTFT ms':>10}{'tok/s':>10}{'roofline':>10}{'tokens = ORT':>14}"]
    for name, r in results.items():
        if "tensorrt" not in r:
            lines.append(f"{name:<7}  built in {r['build_seconds']} s; {r['not_measured']}")
            continue
        for engine in ("tensorrt", "pytorch"):
            m = r[engine]
            same = str(r["tokens_equal_onnxruntime"]) if engine == "tensorrt" else ""
            lines.append(f"{name:<7}{engine:>10}{m['ttft_ms']:>10.2f}{m['decode_tokens_per_s']:>10.1f}"
                         f"{m['roofline_fraction']:>9.0%}{same:>14}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--work", default=os.path.join("benchmarks", ".work"))
    parser.add_argument("--flavour", choices=["tensorrt", "tensorrt-rtx"], default=None)
    parser.add_argument("--compute-capability", action="append", default=[],
                        help="build for this architecture (repeat for several); default: the GPU's own")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-context", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device-model", choices=sorted(DEVICES), default=None,
                        help="place speed against this datasheet bandwidth instead of a measured copy")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: exports, AOT builds and ONNX Runtime only")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.device_model:
        args.bandwidth = DEVICES[args.device_model][1]
    else:
        args.bandwidth = float("nan") if args.dry_run else gpu_bandwidth_gbs()
    results = {name: check_model(name, args, log=print) for name in args.models.split(",")}
    report = {"dry_run": args.dry_run, "bandwidth_gbs": args.bandwidth,
              "bandwidth_from": args.device_model or ("nothing (dry run)" if args.dry_run else "measured copy"),
              "seconds": round(time.perf_counter() - started, 1), "models": results}
    if not args.dry_run:
        import torch

        report["gpu"] = torch.cuda.get_device_name()
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(table(results, args.bandwidth))
    print(f"wrote {args.out} in {report['seconds']} s")


if __name__ == "__main__":
    main()
