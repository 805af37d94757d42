"""Checkpoint -> a folder of ONNX graphs + manifest.json + tokenizer files, each graph checked against
PyTorch before the folder appears (needs torch, onnx, onnxruntime)."""

from __future__ import annotations

import os
import shutil
import time

import torch
from tqdm import tqdm

from hovle_edge import __version__, spec
from hovle_edge.errors import ExportError
from hovle_edge.export.graphs import graph_specs
from hovle_edge.export.onnx_export import export_graph
from hovle_edge.export.ort_graphs import write_ort_graph
from hovle_edge.export.ort_parity import check_in_place_graph, in_place_spec
from hovle_edge.export.parity import TOLERANCE, RecordedOutputs, add_references, check_graph
from hovle_edge.files import atomic_directory, check_replaceable, folder_with, sha256_file, sha256_files
from hovle_edge.model.weights import checkpoint_files, load_model, release_weights
from hovle_edge.tokenizer import (IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START, INTERNVL_SYSTEM, TOKENIZER_FILES,
                                  Tokenizer)

DEFAULT_OPSET = 18  # the newest opset TensorRT 10.3 (JetPack 6) parses that torch's exporter writes
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
# onnxruntime: ORT's fused contrib ops, KV written in place (export/ort_graphs.py); tensorrt: portable standard ops
TARGETS = ("onnxruntime", "tensorrt")


def export_model(checkpoint: str, out: str, precision: str = "fp32", opset: int | None = None,
                 max_context: int | None = None, overwrite: bool = False, progress: bool = True,
                 target: str = "onnxruntime") -> spec.Manifest:
    """Export, check and write the model folder `out`, whole or not at all, for graph `target` (see
    TARGETS; `hovle-edge build` and TensorRT need target="tensorrt")."""
    exported_here = folder_with(spec.MANIFEST, format=spec.MANIFEST_FORMAT)  # what --overwrite may replace
    check_replaceable(out, overwrite, exported_here, [checkpoint], what="export folder")  # before the model loads
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if target not in TARGETS:
        raise ExportError(f"target {target!r}: choose one of {', '.join(TARGETS)}")
    opset = opset or DEFAULT_OPSET  # of the torch.onnx graphs; the onnxruntime target's own are at ORT_OPSET
    tokenizer = Tokenizer.from_dir(checkpoint)
    # The weights as stored (a bf16 checkpoint stays bf16), in memory once: each graph's submodule is
    # cast in place to fp32 for its reference outputs, then to the export precision, exported, freed.
    model = load_model(checkpoint, dtype=None, progress=progress)
    release_weights(model.language_model.model.tok_embeddings)  # the LLM's own table: no graph reads it (0.7 GiB fp32)
    check_context_token(tokenizer, model.config)
    config = model.config
    max_context = max_context or config.llm_config.max_position_embeddings
    dtype = "float16" if precision == "fp16" else "float32"
    specs = graph_specs(model, dtype)
    references, graphs = {}, {}
    with atomic_directory(out, overwrite=overwrite, owned_by=exported_here, inputs=[checkpoint], what="export folder") as tmp:
        bar = tqdm(total=3 * len(specs), desc="export", unit="step", disable=not progress)
        for i, graph in enumerate(specs):
            path = os.path.join(tmp, f"{graph.name}.onnx")
            started = time.perf_counter()
            bar.set_postfix_str(f"{graph.name}: PyTorch reference")
            add_references(specs, i, references, config, precision)
            graph.module.to(PRECISIONS[precision])
            bar.update()
            bar.set_postfix_str(f"{graph.name}: export")
            in_place = target == "onnxruntime" and graph.name != "vision"  # the vision graph is the same for both
            if in_place:
                graph = in_place_spec(graph, config, dtype)
                parameters = write_ort_graph(graph.name, model, dtype, max_context, path)
            else:
                parameters = export_graph(graph, path, opset)
            release_weights(graph.module, keep=[later.module for later in specs[i + 1:]])  # before ORT loads the graph
            bar.update()
            bar.set_postfix_str(f"{graph.name}: parity")
            cases = references.pop(graph.name)
            if in_place:
                rows = check_in_place_graph(graph, path, config, precision, RecordedOutputs(graph.name, cases))
            else:
                rows = check_graph(graph, path, cases, progress)
            bar.update()
            failed = [r for r in rows if r.exceeds(precision)]
            if failed:
                r = failed[0]
                raise ExportError(f"{graph.name}.onnx differs from PyTorch: {r.output} ({r.case}) max abs {r.max_abs:.3g}, "
                                  f"relative {r.max_rel:.3g}, over the {precision} tolerance {TOLERANCE[precision]:g}")
            worst = max(rows, key=lambda r: r.max_rel)
            graphs[graph.name] = graph_entry(graph, tmp, parameters, worst, time.perf_counter() - started)
        bar.close()
        copy_tokenizer(checkpoint, tmp, tokenizer)
        manifest = build_manifest(config, tokenizer, graphs, precision, opset, max_context, checkpoint, tmp, target,
                                  progress)
        spec.write_manifest(tmp, manifest)
    return spec.load_manifest(out)


def graph_entry(graph, directory: str, parameters: int, worst, seconds: float) -> dict:
    files = [f for f in (f"{graph.name}.onnx", f"{graph.name}.onnx.data") if os.path.exists(os.path.join(directory, f))]
    return {
        "file": f"{graph.name}.onnx",
        "files": files,
        "bytes": sum(os.path.getsize(os.path.join(directory, f)) for f in files),
        "parameters": parameters,
        "inputs": [t.to_json() for t in graph.inputs],
        "outputs": [t.to_json() for t in graph.outputs],
        "parity": {"max_abs": worst.max_abs, "max_rel": worst.max_rel, "output": worst.output, "case": worst.case},
        "export_seconds": round(seconds, 2),
    }


def copy_tokenizer(checkpoint: str, directory: str, tokenizer: Tokenizer) -> None:
    """tokenizer.json (converted from tokenizer.model when needed) and its small config files."""
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(checkpoint, name)):
            shutil.copyfile(os.path.join(checkpoint, name), os.path.join(directory, name))
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        tokenizer.backend.save(os.path.join(directory, "tokenizer.json"))


def build_manifest(config, tokenizer: Tokenizer, graphs: dict, precision: str, opset: int, max_context: int,
                   checkpoint: str, directory: str, target: str = "tensorrt", progress: bool = False) -> dict:
    emb = config.embedding_config
    files = sorted(f for f in os.listdir(directory) if not f.startswith("."))
    checkpoint_sha256, hashes = hash_inputs_and_outputs(checkpoint, directory, files, progress)
    return {
        "format": spec.MANIFEST_FORMAT,
        "manifest_version": spec.MANIFEST_VERSION,
        "exporter_version": __version__,
        "torch_version": torch.__version__,
        "precision": precision,
        "opset": opset,
        "max_context": max_context,
        "target": target,
        "kv": {"layout": "capacity", "present": spec.IN_PLACE if target == "onnxruntime" else spec.NEW_ROWS},
        "model": spec.model_section(config),
        "tokens": {
            "img_context": emb.img_context_token_id, "img_start": tokenizer.token_id(IMG_START),
            "img_end": tokenizer.token_id(IMG_END), "im_start": tokenizer.token_id(IM_START),
            "im_end": tokenizer.token_id(IM_END), "bos": tokenizer.bos_id, "eos": tokenizer.eos_id,
            "add_bos": tokenizer.add_bos, "stop_ids": tokenizer.stop_ids,
        },
        "chat": {"template": config.template, "system": config.extra.get("system_message", INTERNVL_SYSTEM)},
        "graphs": graphs,
        "checkpoint_sha256": checkpoint_sha256,
        "files": hashes,
    }


def hash_inputs_and_outputs(checkpoint: str, directory: str, files: list[str], progress: bool) -> tuple[str, dict]:
    """The checkpoint's hash and each written file's, under a bar in bytes (~15 GB at full size)."""
    sources = checkpoint_files(checkpoint) + [os.path.join(checkpoint, "config.json")]
    outputs = [os.path.join(directory, f) for f in files]
    with tqdm(total=sum(map(os.path.getsize, sources + outputs)), desc="hashing", unit="B", unit_scale=True,
              unit_divisor=1024, disable=not progress) as bar:
        checkpoint_sha256 = sha256_files(sources)
        bar.update(sum(map(os.path.getsize, sources)))
        hashes = {}
        for name, path in zip(files, outputs):
            hashes[name] = sha256_file(path)
            bar.update(os.path.getsize(path))
    return checkpoint_sha256, hashes


def check_context_token(tokenizer: Tokenizer, config) -> None:
    if tokenizer.token_id(IMG_CONTEXT) != config.embedding_config.img_context_token_id:
        raise ExportError(f"the tokenizer's {IMG_CONTEXT} id {tokenizer.token_id(IMG_CONTEXT)} differs from "
                          f"config.json's img_context_token_id {config.embedding_config.img_context_token_id}")
