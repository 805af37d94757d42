"""The real 2.6B shape on an ordinary machine: wall time and peak memory of `hovle-edge export` (fp16 and
fp32), `verify` and the first and second start of `run`, each command in its own process under
/usr/bin/time -v, against the budgets of issue 21. Builds a random-weight checkpoint with the official
config (bf16 shards, ~5 GB) under the work folder when it is absent; speed and memory do not depend
on the weights' values.

    python benchmarks/full_size.py --work /tmp/full-size [--target tensorrt] [--steps export-fp32,verify,run]
        [--verify-precision fp16]

Needs ~5 GB + 5 GB (fp16) + 10 GB (fp32) of disk; `--drop-fp32` deletes the fp32 export at the end."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time

GIB = 2**30
# Issue 21's figures before this work, and its budgets (peak RSS GiB, wall seconds).
BEFORE = {"export-fp16": "stopped at 21.1 GiB", "export-fp32": "17.4 GiB, 236 s", "verify": "stopped at 20.5 GiB",
          "run": "~40 s; 9.1 GB cache"}
BUDGET_GIB = {"export-fp16": 12, "export-fp32": 14, "verify": 12}
RUN_PROMPT = "Say hello."


def build_checkpoint(directory: str) -> None:
    """Random bf16 weights of the official 2.6B config, written shard by shard (never the whole model at
    once in memory) with the shapes world's tokenizer; the image-context id moves to that tokenizer's."""
    import torch
    from safetensors.torch import save_file

    from hovle_edge.config import preset
    from hovle_edge.model import HoVLE
    from hovle_edge.model.weights import INDEX_FILE, OFFICIAL_SHARD_BYTES
    from hovle_edge.shapes.world import world_tokenizer

    config = preset("hovle-2.6b")
    tokenizer = world_tokenizer()
    config.embedding_config = dataclasses.replace(config.embedding_config,
                                                  img_context_token_id=tokenizer.token_id("<IMG_CONTEXT>"))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in HoVLE(config).state_dict().items()}
    groups, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * _numel(shape)
        if current and size + nbytes > OFFICIAL_SHARD_BYTES:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    groups.append(current)
    tmp = directory + ".building"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, names in enumerate(groups, 1):
        shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            if len(shapes[name]) == 1:  # norms at one, biases at zero: activations keep a sane scale
                tensors[name] = (torch.ones if name.endswith("norm.weight") else torch.zeros)(shapes[name], dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.bfloat16)
            weight_map[name] = shard
            total += 2 * _numel(shapes[name])
        save_file(tensors, os.path.join(tmp, shard), metadata={"format": "pt"})
        del tensors
        print(f"  wrote {shard}", flush=True)
    with open(os.path.join(tmp, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config.save_pretrained(tmp)
    tokenizer.save(tmp)
    os.replace(tmp, directory)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclasses.dataclass
class Measurement:
    step: str
    seconds: float
    peak_gib: float
    ok: bool
    note: str = ""


def measure(step: str, command: list[str], log: str) -> Measurement:
    """One command in its own process: wall time and peak RSS from GNU time."""
    print(f"$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        done = subprocess.run(["/usr/bin/time", "-v", *command], stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    with open(log, encoding="utf-8", errors="replace") as f:
        text = f.read()
    peak_kb = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    peak = int(peak_kb.group(1)) * 1024 / GIB if peak_kb else float("nan")
    result = Measurement(step, seconds, peak, done.returncode == 0, "" if done.returncode == 0 else f"exit {done.returncode}, see {log}")
    print(f"  {result.seconds:.0f} s, peak {result.peak_gib:.2f} GiB, {'ok' if result.ok else result.note}", flush=True)
    return result


def folder_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory) for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/full-size")
    parser.add_argument("--steps", default="export-fp32,verify,run,export-fp16",
                        help="in this order; verify and run use the fp32 folder when there is one")
    parser.add_argument("--target", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                        help="graph target of the exports (the CLI's default: onnxruntime)")
    parser.add_argument("--verify-precision", choices=["fp32", "fp16"], default=None,
                        help="the folder verify checks (default: fp32 when there is one; fp16 is the slower on CPU)")
    parser.add_argument("--drop-fp32", action="store_true", help="delete the fp32 export after measuring it")
    args = parser.parse_args()
    checkpoint = os.path.join(args.work, "checkpoint")
    os.makedirs(args.work, exist_ok=True)
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        print(f"building the random 2.6B checkpoint in {checkpoint}", flush=True)
        build_checkpoint(checkpoint)
    cli = [sys.executable, "-m", "hovle_edge.cli"]
    folder = {p: os.path.join(args.work, f"{p}-{args.target}") for p in ("fp32", "fp16")}
    results = []
    for step in args.steps.split(","):
        verified = folder["fp32"] if os.path.isdir(folder["fp32"]) else folder["fp16"]
        if step == "verify" and args.verify_precision:
            verified = folder[args.verify_precision]
        name = os.path.basename(verified)
        if step.startswith("export-"):
            precision = step.split("-")[1]
            results.append(measure(f"{step} ({args.target})",
                                   [*cli, "export", "--checkpoint", checkpoint, "--out", folder[precision], "--dtype",
                                    precision, "--target", args.target, "--overwrite"],
                                   os.path.join(args.work, f"{step}-{args.target}.log")))
        elif step == "verify":
            results.append(measure(f"verify ({name})", [*cli, "verify", "--checkpoint", checkpoint, "--model", verified],
                                   os.path.join(args.work, f"verify-{name}.log")))
        elif step == "run":
            results += measure_starts(cli, verified, args.work)
    if args.drop_fp32:
        shutil.rmtree(folder["fp32"], ignore_errors=True)
    print(f"\n{'step':<34} {'wall s':>7} {'peak GiB':>9} {'budget':>7}  {'before':<22} note")
    for r in results:
        kind = r.step.split(" ")[0]
        print(f"{r.step:<34} {r.seconds:>7.0f} {r.peak_gib:>9.2f} {BUDGET_GIB.get(kind, ''):>7}  "
              f"{BEFORE.get(kind, ''):<22} {'' if r.ok else 'FAILED '}{r.note}")


def measure_starts(cli: list[str], model_dir: str, work: str) -> list[Measurement]:
    """ONNX Runtime sessions alone, then `run` twice: a cold first start (no remembered hash: a folder just
    copied to a device), the second with what the first left; and how much the folder grew."""
    from hovle_edge.verified_hashes import RECORD

    if os.path.exists(os.path.join(model_dir, RECORD)):  # a cold first start: no hash remembered yet
        os.remove(os.path.join(model_dir, RECORD))
    before = folder_bytes(model_dir)
    sessions = ("import sys, onnxruntime as ort; d = sys.argv[1]; "
                "[ort.InferenceSession(f'{d}/{g}.onnx', providers=['CPUExecutionProvider']) "
                "for g in ('vision', 'embedding', 'decoder')]")
    results = [measure("ORT sessions alone", [sys.executable, "-c", sessions, model_dir], os.path.join(work, "sessions.log"))]
    run = [*cli, "run", "--model", model_dir, "--prompt", RUN_PROMPT, "--max-new-tokens", "4", "--no-stream"]
    for which in ("first", "second"):
        results.append(measure(f"run ({which} start)", run, os.path.join(work, f"run-{which}.log")))
    results[-1].note = f"model folder grew by {(folder_bytes(model_dir) - before) / 2**20:.0f} MiB over the two starts"
    return results


if __name__ == "__main__":
    main()
