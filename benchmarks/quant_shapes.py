"""Weight-only quantization in the shapes world, side by side in one run: the demo's 200 questions on
fresh scenes answered through the runtime by the float export and by its int8 and int4 folders (round
to nearest and activation-aware), the top-1 agreement and mean KL against the float folder on held-out
prompts (measured by `hovle-edge quantize`), and each folder's bytes.

    hovle-edge demo --out /tmp/q-demo        # once: trains and exports the demo model
    python benchmarks/quant_shapes.py --demo /tmp/q-demo [--questions 200] [--held-out 64]

Target (issue 19): the activation-aware int4 model at most 1 point below the float one."""

from __future__ import annotations

import argparse
import os
import time

from hovle_edge.quantize import QuantizeSettings, quantize_model
from hovle_edge.runtime import Pipeline
from hovle_edge.spec import load_manifest
from hovle_edge.shapes.evaluate import percent, runtime_answer, scene_questions


def variants(held_out: int, group_size: int) -> dict:
    common = dict(group_size=group_size, held_out_prompts=held_out)
    return {"int8 rtn": QuantizeSettings(bits=8, **common), "int4 rtn": QuantizeSettings(bits=4, **common),
            "int4 awq": QuantizeSettings(bits=4, method="awq", **common)}


def folder_bytes(model_dir: str) -> int:
    manifest = load_manifest(model_dir, verify=False)
    return sum(os.path.getsize(os.path.join(model_dir, f)) for f in manifest.data["files"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="/tmp/q-demo", help="the folder `hovle-edge demo --out` wrote")
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--held-out", type=int, default=64, help="held-out prompts for top-1 agreement and KL")
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    from hovle_edge.export import export_model

    float_dir, half_dir = os.path.join(args.demo, "onnx"), os.path.join(args.demo, "onnx-fp16")
    for folder, precision in ((float_dir, "fp32"), (half_dir, "fp16")):  # as the demo exports (the default target)
        if not os.path.isfile(os.path.join(folder, "manifest.json")):
            export_model(os.path.join(args.demo, "stage3-instruct"), folder, precision=precision, max_context=1024,
                         progress=False)
    folders, seconds = {"fp32": float_dir}, {}
    for name, settings in variants(args.held_out, args.group_size).items():
        folders[name] = os.path.join(args.demo, "onnx-" + name.replace(" ", "-"))
        started = time.perf_counter()
        quantize_model(float_dir, folders[name], settings, overwrite=True, log=lambda line: None)
        seconds[name] = time.perf_counter() - started
    items = scene_questions(args.questions)
    expected = [answer for _, _, answer in items]
    answers = {}
    for name, folder in folders.items():
        with Pipeline.from_dir(folder) as pipe:
            answers[name] = [runtime_answer(pipe, question, image) for image, question, _ in items]
    print(f"shapes world demo model, {args.questions} questions on fresh scenes, greedy, ONNX Runtime CPU; "
          f"group {args.group_size}; agreement on {args.held_out} held-out prompts, every answer position (up to 8)")
    print(f"{'model':<10}{'accuracy':>10}{'same as fp32':>14}{'top-1 agree':>13}{'positions':>11}{'mean KL':>10}"
          f"{'MiB':>8}{'quantize s':>12}")
    for name, folder in folders.items():
        agreement = load_manifest(folder, verify=False).data.get("quantization", {}).get("agreement")
        top1 = f"{100 * agreement['top1_agreement']:.1f}%" if agreement else "-"
        kl = f"{agreement['mean_kl']:.2g}" if agreement else "-"
        positions = agreement["positions"] if agreement else "-"
        took = f"{seconds[name]:.1f}" if name in seconds else "-"
        print(f"{name:<10}{percent(answers[name], expected):>9.1f}%{percent(answers[name], answers['fp32']):>13.1f}%"
              f"{top1:>13}{positions:>11}{kl:>10}{folder_bytes(folder) / 2**20:>8.2f}{took:>12}")
    print(f"{'fp16':<10}{'':>10}{'':>14}{'':>13}{'':>11}{'':>10}{folder_bytes(half_dir) / 2**20:>8.2f}")


if __name__ == "__main__":
    main()
