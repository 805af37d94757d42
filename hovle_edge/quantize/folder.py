"""`hovle-edge quantize`: an exported model folder in, a complete quantized model folder out. Weight
MatMuls of both stacks (embedding.onnx and decoder.onnx) are rewritten block-wise to 4 or 8 bits; the
vision graph, run once per image, stays as exported. The manifest gains a `quantization` section
(settings, bytes, and the agreement with the source folder on held-out prompts), and the folder
appears whole or not at all. The runtime reads it like any other folder."""

from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from hovle_edge import spec
from hovle_edge.errors import InputError, ModelFolderError
from hovle_edge.files import atomic_directory, check_replaceable, folder_with, sha256_file
from hovle_edge.quantize.agreement import measure_agreement
from hovle_edge.quantize.awq import output_error, rows_for_search, search_clip, search_scale
from hovle_edge.quantize.blocks import BITS, check_group_size
from hovle_edge.quantize.calibration import (HELD_OUT_SEED, calibration_samples, collect_activations, folder_samples,
                                             shapes_world_samples)
from hovle_edge.quantize.graph import TARGETS, default_opset, rewrite, weight_matmuls

QUANTIZED_GRAPHS = ("embedding", "decoder")
METHODS = ("rtn", "awq")


@dataclass
class QuantizeSettings:
    bits: int = 4
    group_size: int = 128
    method: str = "rtn"  # rtn: round-to-nearest; awq: activation-aware scales searched on calibration prompts
    target: str = "onnxruntime"  # onnxruntime: MatMulNBits; tensorrt: DequantizeLinear -> MatMul (opset 21)
    quantize_head: bool = False
    calibration: str | None = None  # a folder with prompts.jsonl; None: the shapes world
    calibration_prompts: int = 64
    held_out_prompts: int = 16  # for the agreement check (0: skip it)
    answer_tokens: int = 8  # positions compared per held-out prompt
    accuracy_level: int = 0  # MatMulNBits: 0 computes in the activations' float type, 4 in int8

    def __post_init__(self):
        if self.bits not in BITS:
            raise InputError(f"{self.bits} bits: choose 4 or 8", setting="bits")
        if self.method not in METHODS:
            raise InputError(f"method {self.method!r}: choose one of {', '.join(METHODS)}", setting="method")
        if self.target not in TARGETS:
            raise InputError(f"target {self.target!r}: choose one of {', '.join(TARGETS)}", setting="target")
        if self.calibration is not None and not os.path.isdir(self.calibration):
            raise InputError(f"calibration folder {self.calibration}: no such folder", setting="calibration")


def quantize_model(model_dir: str, out: str, settings: QuantizeSettings, overwrite: bool = False,
                   log=print) -> spec.Manifest:
    """Quantize the float folder `model_dir` into `out`; returns the new folder's manifest."""
    made_here = folder_with(spec.MANIFEST, format=spec.MANIFEST_FORMAT)  # what --overwrite may replace
    inputs = [model_dir, settings.calibration]
    check_replaceable(out, overwrite, made_here, inputs, what="quantized folder")  # before any work
    source = spec.load_manifest(model_dir)
    if "quantization" in source.data:
        raise ModelFolderError(f"{model_dir}: already quantized ({source.data['quantization']['bits']} bits); "
                               "quantize the float export it came from")
    if settings.target == "tensorrt" and source.data.get("target") == "onnxruntime":
        raise InputError(f"{model_dir} was exported with --target onnxruntime, whose fused ops TensorRT does not "
                         "parse: quantize an export made with --target tensorrt for --target tensorrt")
    started = time.perf_counter()
    models, chosen, kept = {}, {}, {}
    for graph in QUANTIZED_GRAPHS:
        models[graph] = onnx.load(source.graph_path(graph))
        chosen[graph], kept[graph] = weight_matmuls(models[graph], source.model["vocab"], settings.quantize_head)
        for matmul in chosen[graph]:  # every width checked before any work
            check_group_size(matmul.shape[0], settings.group_size, f"{graph}.onnx MatMul {matmul.node.name} "
                             f"(weight {matmul.weight.name}, {matmul.shape[0]} x {matmul.shape[1]})")
    calibration, held_out = split_prompts(settings)
    scales, clips = activation_scales(source, chosen, calibration, settings, log) if settings.method == "awq" else ({}, {})
    with atomic_directory(out, overwrite=overwrite, owned_by=made_here, inputs=inputs, what="quantized folder") as tmp:
        reports = {}
        for graph in QUANTIZED_GRAPHS:
            reports[graph] = rewrite(models[graph], chosen[graph], settings.bits, settings.group_size, settings.target,
                                     scales.get(graph), clips.get(graph), settings.accuracy_level)
            onnx.save_model(models[graph], os.path.join(tmp, f"{graph}.onnx"), save_as_external_data=True,
                            location=f"{graph}.onnx.data", size_threshold=1024)
            log(f"{graph}.onnx: {reports[graph].matmuls} MatMuls to {settings.bits} bits "
                f"({reports[graph].float_bytes / 2**20:.1f} -> {reports[graph].quantized_bytes / 2**20:.1f} MiB)"
                + (f", {len(kept[graph])} kept in float (the output head)" if kept[graph] else ""))
        copy_other_files(source, tmp)
        data = quantized_manifest(source, tmp, models, reports, kept, settings, len(calibration))
        spec.write_manifest(tmp, data)
        if held_out:
            log(f"agreement with {model_dir} on {len(held_out)} held-out prompts")
            agreement = measure_agreement(source, spec.load_manifest(tmp), held_out, settings.answer_tokens)
            data["quantization"]["agreement"] = agreement.to_json()
            spec.write_manifest(tmp, data)
            log(f"top-1 agreement {100 * agreement.top1:.1f}% over {agreement.positions} positions, mean KL "
                f"{agreement.mean_kl:.4g} nats")
        data["quantization"]["seconds"] = round(time.perf_counter() - started, 1)
        spec.write_manifest(tmp, data)
    return spec.load_manifest(out)


def split_prompts(settings: QuantizeSettings) -> tuple[list, list]:
    """(calibration prompts, held-out prompts). A calibration folder gives its last prompts to the
    held-out set; the shapes world draws the held-out scenes from seeds of their own."""
    needs_calibration = settings.method == "awq"
    if settings.calibration is None:
        calibration = calibration_samples(None, settings.calibration_prompts) if needs_calibration else []
        return calibration, shapes_world_samples(settings.held_out_prompts, HELD_OUT_SEED)
    prompts = folder_samples(settings.calibration)
    held = settings.held_out_prompts
    if needs_calibration and len(prompts) <= held:
        raise InputError(f"{settings.calibration}: {len(prompts)} prompts, but {held} are held out for the "
                         f"agreement check; add prompts or pass fewer held-out prompts")
    return prompts[:len(prompts) - held][:settings.calibration_prompts], prompts[len(prompts) - held:]


def activation_scales(source, chosen: dict, calibration: list, settings: QuantizeSettings, log) -> tuple[dict, dict]:
    """({graph: {activation name: s}}, {graph: {weight name: clip}}): one scale per input tensor,
    searched over every MatMul reading it (fused wqkv alone; gate and up together), so one Mul serves
    them all; then each block's clipping ratio."""
    from onnx import numpy_helper

    wanted = {graph: sorted({m.activation for m in chosen[graph]}) for graph in QUANTIZED_GRAPHS}
    log(f"calibration: {len(calibration)} prompts through {source.directory}")
    activations = collect_activations(source, calibration, wanted)
    scales, clips, ratios = {}, {}, []
    for graph in QUANTIZED_GRAPHS:
        scales[graph], clips[graph] = {}, {}
        for name in wanted[graph]:
            readers = [m for m in chosen[graph] if m.activation == name]
            weight = np.concatenate([numpy_helper.to_array(m.weight) for m in readers], axis=1).astype(np.float32)
            rows = activations[graph][name]
            choice = search_scale(weight, rows, settings.bits, settings.group_size)
            clip = search_clip(weight * choice.scale[:, None], rows / choice.scale, settings.bits, settings.group_size)
            scales[graph][name] = choice.scale
            start = 0
            for m in readers:
                clips[graph][m.weight.name] = clip[:, start:start + m.shape[1]]
                start += m.shape[1]
            sample = rows_for_search(rows)
            error = output_error(sample, weight, sample @ weight, choice.scale, settings.bits, settings.group_size, clip)
            if choice.rtn_error > 0:
                ratios.append(error / choice.rtn_error)
    log(f"activation-aware scales and clipping for {len(ratios)} inputs: output error {100 * np.mean(ratios):.1f}% "
        "of round-to-nearest's on average")
    return scales, clips


def copy_other_files(source, directory: str) -> None:
    """Everything the source manifest lists except the graphs rewritten here."""
    rewritten = {f for g in QUANTIZED_GRAPHS for f in source.data["graphs"][g]["files"]}
    for name in source.data["files"]:
        if name not in rewritten:
            os.makedirs(os.path.dirname(os.path.join(directory, name)) or directory, exist_ok=True)
            shutil.copyfile(os.path.join(source.directory, name), os.path.join(directory, name))


def quantized_manifest(source, directory: str, models: dict, reports: dict, kept: dict,
                       settings: QuantizeSettings, calibration_prompts: int) -> dict:
    data = copy.deepcopy(source.data)
    for graph in QUANTIZED_GRAPHS:
        entry = data["graphs"][graph]
        files = [f for f in (f"{graph}.onnx", f"{graph}.onnx.data") if os.path.exists(os.path.join(directory, f))]
        entry.update(files=files, bytes=sum(os.path.getsize(os.path.join(directory, f)) for f in files),
                     opset=default_opset(models[graph]), quantized_matmuls=reports[graph].matmuls,
                     float_matmuls=len(kept[graph]))
        entry.pop("parity", None)  # parity was against PyTorch in float; the agreement below replaces it
    data["opset"] = max([data["opset"]] + [default_opset(m) for m in models.values()])
    if settings.target == "onnxruntime":  # MatMulNBits is an ONNX Runtime contrib op: `build` must refuse the folder
        data["target"] = "onnxruntime"
    data["quantization"] = {
        **{k: v for k, v in asdict(settings).items() if k in ("bits", "group_size", "method", "target")},
        "quantized_head": settings.quantize_head,
        "scheme": "symmetric, one scale per block of group_size input rows and output column, no zero point",
        "accuracy_level": settings.accuracy_level if settings.target == "onnxruntime" else None,
        "calibration": None if settings.method == "rtn" else
        {"source": settings.calibration or "shapes world", "prompts": calibration_prompts},
        "weight_bytes": {"float": sum(r.float_bytes for r in reports.values()),
                         "quantized": sum(r.quantized_bytes for r in reports.values())},
        "source_files": {f: source.data["files"][f] for g in QUANTIZED_GRAPHS for f in source.data["graphs"][g]["files"]},
    }
    files = sorted(f for f in os.listdir(directory) if not f.startswith(".") and f != spec.MANIFEST)
    data["files"] = {f: sha256_file(os.path.join(directory, f)) for f in files}
    return data
