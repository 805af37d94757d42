"""hovle-edge against its peers on this CPU, on equal work per token, in one run: the w512 benchmark
model (8 embedding + 8 LLM layers, width 512, 8 heads, 4 KV heads, MLP 2048, vocab 16384) exported
for both graph targets, against onnxruntime-genai (its model builder, fp32 and int4) and PyTorch
(transformers' Llama with its cache) on a random-weight 16-layer Llama of the same widths and vocab.

    python benchmarks/peer_cpu.py [--contexts 128,512,2048] [--new-tokens 64] [--repeats 3] [--work DIR]

Each measurement runs in its own process (so that peak RSS is that engine's alone), engines
interleaved, repeated; the table shows medians. TTFT is the prompt's prefill to the first token;
ms/token the median decode step (greedy). Each engine runs its own loop: hovle-edge Pipeline.generate_ids,
genai its Generator, PyTorch transformers' generate. Needs `pip install 'hovle-edge[bench]'`.

Targets (issue 18): ms/token at or below genai fp32 at every context, TTFT at or below, step growth
128 -> 2048 below 1.4x, at least 1.5x PyTorch cached, peak RSS after a 2048 prefill within 1.2x genai's."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import benchmark_config, genai_folder, llama_folder  # noqa: E402

SIZE = "w512"
THREADS = 2
ENGINES = ("hovle-ort", "hovle-trt", "genai-fp32", "genai-int4", "torch")


def hovle_folder(work: str, target: str) -> str:
    """The w512 checkpoint (benchmarks/models.py) exported for graph `target`."""
    from models import prepared

    return prepared(SIZE, work, "fp32", target)[1]


# ---- one measurement, in its own process ----

def prompt_ids(context: int) -> list[int]:
    """The same random prompt for every engine (no image-context id among them)."""
    config = benchmark_config(SIZE)
    ids = np.random.default_rng(context).integers(20, config.llm_config.vocab_size, context)
    return [int(i) + (int(i) == config.embedding_config.img_context_token_id) for i in ids]


def run_hovle(folder: str, ids: list[int], new_tokens: int):
    """The runtime's own loop (Pipeline.generate_ids): (TTFT, decode step times) in seconds."""
    from hovle_edge.runtime import Pipeline

    with Pipeline.from_dir(folder, threads=THREADS) as pipe:
        cache = pipe.new_cache(capacity=len(ids) + new_tokens)
        _, timings = pipe.generate_ids(cache, ids, stop_ids=(), max_new_tokens=new_tokens)
    return timings.first_token, timings.steps


def run_genai(folder: str, ids: list[int], new_tokens: int):
    """genai's own loop: append_tokens runs the prompt, the first generate_next_token only picks the token,
    each later one runs the model on the previous token and picks the next."""
    import onnxruntime_genai as og

    model = og.Model(folder)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    started = time.perf_counter()
    generator.append_tokens(np.asarray([ids], dtype=np.int32))
    generator.generate_next_token()
    ttft = time.perf_counter() - started
    steps = []
    for _ in range(new_tokens - 1):
        started = time.perf_counter()
        generator.generate_next_token()
        generator.get_next_tokens()
        steps.append(time.perf_counter() - started)
    return ttft, steps


def run_torch(folder: str, ids: list[int], new_tokens: int):
    """transformers' own loop (generate with its cache, greedy), each token's arrival stamped by a streamer."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times = []  # the first put() is the prompt, each later one a new token

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    torch.set_num_threads(THREADS)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    stamps = Stamps()
    with torch.inference_mode():
        started = time.perf_counter()
        model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       streamer=stamps, pad_token_id=0)
    tokens = stamps.times[1:]
    return tokens[0] - started, [b - a for a, b in zip(tokens, tokens[1:])]


def worker(engine: str, folder: str, context: int, new_tokens: int) -> dict:
    run = run_hovle if engine.startswith("hovle") else run_genai if engine.startswith("genai") else run_torch
    ttft, steps = run(folder, prompt_ids(context), new_tokens)
    return {"engine": engine, "context": context, "ttft_ms": 1000 * ttft,
            "step_ms": 1000 * statistics.median(steps), "rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss, which a process started
    with fork + exec inherits from its parent (here the one that ran the exports)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB on Linux, bytes on macOS


def prepare(engine: str, work: str) -> str:
    """The engine's model folder, made once (in the parent, so that no worker imports the exporter)."""
    if engine.startswith("hovle"):
        return hovle_folder(work, "onnxruntime" if engine == "hovle-ort" else "tensorrt")
    if engine.startswith("genai"):
        return genai_folder(SIZE, work, engine.split("-")[1], THREADS)
    return llama_folder(SIZE, work)


# ---- the run: every engine and context in turn, repeated; medians ----

def measure(engine: str, folder: str, context: int, new_tokens: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--work", folder,
               "--contexts", str(context), "--new-tokens", str(new_tokens)]
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(results: list[dict], engines: list[str], contexts: list[int]) -> str:
    def median(engine, context, key):
        return statistics.median(r[key] for r in results if r["engine"] == engine and r["context"] == context)

    lines = [f"{'context':>7} {'engine':<11}{'TTFT ms':>10}{'ms/token':>10}{'tokens/s':>10}{'peak RSS MB':>13}"]
    for context in contexts:
        for engine in engines:
            step = median(engine, context, "step_ms")
            lines.append(f"{context:>7} {engine:<11}{median(engine, context, 'ttft_ms'):>10.0f}{step:>10.2f}"
                         f"{1000 / step:>10.1f}{median(engine, context, 'rss_mb'):>13.0f}")
    if "hovle-ort" in engines and len(contexts) > 1:
        first, last = contexts[0], contexts[-1]
        growth = median("hovle-ort", last, "step_ms") / median("hovle-ort", first, "step_ms")
        lines.append(f"hovle-ort step growth {first} -> {last}: {growth:.2f}x (target < 1.4x)")

        def ratios(numerator, denominator, key):
            return ", ".join(f"{c}: {median(numerator, c, key) / median(denominator, c, key):.2f}x" for c in contexts)

        if "genai-fp32" in engines:
            for key, what in (("step_ms", "ms/token"), ("ttft_ms", "TTFT")):
                lines.append(f"hovle-ort {what} over genai-fp32's (target <= 1.0x): "
                             f"{ratios('hovle-ort', 'genai-fp32', key)}")
            lines.append(f"hovle-ort peak RSS over genai-fp32's (target <= 1.2x at {last}): "
                         f"{median('hovle-ort', last, 'rss_mb') / median('genai-fp32', last, 'rss_mb'):.2f}x")
        if "torch" in engines:
            lines.append(f"torch ms/token over hovle-ort's (target >= 1.5x): {ratios('torch', 'hovle-ort', 'step_ms')}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="128,512,2048")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--work", default=os.path.join("benchmarks", ".work"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # then --work is the engine's folder
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.worker:
        print(json.dumps(worker(args.worker, args.work, contexts[0], args.new_tokens)))
        return
    engines = args.engines.split(",")
    folders = {engine: prepare(engine, args.work) for engine in engines}  # every model before timing anything
    results = []
    for repeat in range(args.repeats):
        for context in contexts:
            for engine in engines:
                results.append(measure(engine, folders[engine], context, args.new_tokens))
                print(f"repeat {repeat + 1}/{args.repeats}: {results[-1]}", file=sys.stderr, flush=True)
    print(f"model {SIZE} (16 layers, width 512, vocab 16384), fp32 unless named; {THREADS} threads each; "
          f"{args.new_tokens} greedy tokens; medians of {args.repeats}")
    print(table(results, engines, contexts))


if __name__ == "__main__":
    main()
