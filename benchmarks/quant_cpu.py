"""Weight-only quantization on ONNX Runtime CPU, side by side in one run, same weights: decode
tokens/s of the float export and of its int8 and int4 folders (`hovle-edge quantize`, round to
nearest, group 128) at several contexts, and each folder's bytes.

    python benchmarks/quant_cpu.py [--size w1024] [--target onnxruntime|tensorrt] [--contexts 128,512,2048]
                                   [--steps 32] [--threads 2] [--no-genai] [--work DIR]

The float export is of --target's graphs (onnxruntime: GroupQueryAttention and fused norms, the
flavour a CPU user runs; tensorrt: the portable ones); quantized folders are MatMulNBits either way.
"acc4" is MatMulNBits accuracy_level 4 (activations rounded to int8 inside the GEMM); "head": the output
head quantized too (`--quantize-head`), the word table stays float. All folders stay
open and each context measures them in turn, `--rounds` times (median of the rounds), so that a
machine whose load drifts penalizes none of them alone. Beside them, in the same turns, "genai int4":
onnxruntime-genai's own int4 build (`-p int4 -e cpu`) of a Llama with the same widths, heads, MLP,
vocab and layers (both stacks' in one), timed through its own loop (needs `hovle-edge[bench]`).

Target (issue 19): int4 well above 2x fp32 where decode is bound by reading weights."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import SIZES, genai_folder, prepared  # noqa: E402

from hovle_edge.quantize import QuantizeSettings, quantize_model  # noqa: E402
from hovle_edge.runtime import Pipeline  # noqa: E402
from hovle_edge.spec import load_manifest  # noqa: E402

# name: settings (None: the float export itself). "int8" (accuracy level 0) was left out after one run:
# ONNX Runtime 1.32's 8-bit MatMulNBits computing in fp32 decoded at 0.2-0.4x fp32's speed.
VARIANTS = {
    "fp32": None,
    "int8 acc4": QuantizeSettings(bits=8, group_size=128, held_out_prompts=0, accuracy_level=4),
    "int4": QuantizeSettings(bits=4, group_size=128, held_out_prompts=0),
    "int4 acc4": QuantizeSettings(bits=4, group_size=128, held_out_prompts=0, accuracy_level=4),
    # The output head too, as onnxruntime-genai's int4 build does (at w1024 the fp32 head is 128 MiB a token).
    "int4 acc4 head": QuantizeSettings(bits=4, group_size=128, held_out_prompts=0, accuracy_level=4,
                                       quantize_head=True),
}


def folder_bytes(model_dir: str) -> int:
    manifest = load_manifest(model_dir, verify=False)
    return sum(os.path.getsize(os.path.join(model_dir, f)) for f in manifest.data["files"])


def decode_tokens_per_s(pipe: Pipeline, ids: list[int], steps: int) -> float:
    """Median decode step after a prefill of `ids`, as tokens/s, through the runtime's own loop (greedy,
    stop tokens ignored)."""
    _, timings = pipe.generate_ids(pipe.new_cache(capacity=len(ids) + steps + 1), ids, stop_ids=(),
                                   max_new_tokens=steps + 1)
    return 1.0 / statistics.median(timings.steps)


def genai_tokens_per_s(model, ids: list[int], steps: int) -> float:
    """The same for onnxruntime-genai's model, through its own loop: each generate_next_token after the
    first runs the model on the previous token and picks the next."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + steps + 1, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([ids], dtype=np.int32))
    generator.generate_next_token()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        generator.generate_next_token()
        generator.get_next_tokens()
        times.append(time.perf_counter() - started)
    return 1.0 / statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="w1024")
    parser.add_argument("--target", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    parser.add_argument("--contexts", default="128,512,2048")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per context and model")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every model, genai's too")
    parser.add_argument("--genai", action=argparse.BooleanOptionalAction, default=True,
                        help="measure onnxruntime-genai's int4 build beside them")
    parser.add_argument("--rounds", type=int, default=3, help="times each context measures every folder in turn")
    parser.add_argument("--work", default=os.path.join("benchmarks", ".work"))
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    _, float_dir = prepared(args.size, args.work, "fp32", args.target)
    _, half_dir = prepared(args.size, args.work, "fp16", args.target)
    folders = {}
    for name, settings in VARIANTS.items():
        folders[name] = float_dir if settings is None else f"{float_dir}-{name.replace(' ', '-')}"
        if settings is not None and not os.path.isfile(os.path.join(folders[name], "manifest.json")):
            quantize_model(float_dir, folders[name], settings, overwrite=True, log=lambda line: None)
    manifest = load_manifest(float_dir, verify=False)
    vocab, image_context = manifest.model["vocab"], manifest.data["tokens"]["img_context"]
    rng = np.random.default_rng(0)
    prompts = {c: [int(i) + (int(i) == image_context) for i in rng.integers(20, vocab - 1, c)] for c in contexts}
    pipes = {name: Pipeline.from_dir(folder, threads=args.threads) for name, folder in folders.items()}
    runs = {name: lambda ids, pipe=pipe: decode_tokens_per_s(pipe, ids, args.steps) for name, pipe in pipes.items()}
    if args.genai:
        import onnxruntime_genai as og

        folders["genai int4"] = genai_folder(args.size, args.work, "int4", args.threads)
        genai = og.Model(folders["genai int4"])
        runs["genai int4"] = lambda ids: genai_tokens_per_s(genai, ids, args.steps)
    speed = {name: {} for name in runs}
    for c in contexts:
        rounds = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                rounds[name].append(run(prompts[c]))
        for name in runs:
            speed[name][c] = statistics.median(rounds[name])
    for pipe in pipes.values():
        pipe.close()
    width, layers = SIZES[args.size][0], SIZES[args.size][1]
    print(f"model {args.size}: width {width}, {layers} + {layers} layers, {args.target} graphs; ONNX Runtime CPU, "
          f"{args.threads or 'default'} threads; median decode step as tokens/s; group 128, round to nearest")
    names = list(folders)
    width = {n: max(11, len(n) + 3) for n in names}
    print(f"{'context':>8}" + "".join(f"{n:>{width[n]}}" for n in names)
          + "".join(f"{n + ' x':>{width[n] + 2}}" for n in names[1:]))
    for c in contexts:
        cells = "".join(f"{speed[n][c]:>{width[n]}.1f}" for n in names)
        ratios = "".join(f"{speed[n][c] / speed['fp32'][c]:>{width[n] + 1}.2f}x" for n in names[1:])
        print(f"{c:>8}{cells}{ratios}")
    sizes = {"fp32": folder_bytes(float_dir), "fp16": folder_bytes(half_dir),
             **{n: folder_bytes(folders[n]) for n in names[1:] if n in pipes}}
    if args.genai:
        sizes["genai int4"] = sum(e.stat().st_size for e in os.scandir(folders["genai int4"]) if e.is_file())
    print("folder MiB: " + ", ".join(f"{n} {b / 2**20:.1f}" for n, b in sizes.items()))


if __name__ == "__main__":
    main()
