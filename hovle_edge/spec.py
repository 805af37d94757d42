"""The graph contract between export, engines and runtime: tensor names, dtypes, named dims, and the
manifest that describes an exported model folder. The runtime derives everything from the manifest.
Torch-free.

KV caches (manifest version 2) are buffers of a fixed capacity, allocated once per conversation and
filled slot by slot: `past_key_values.{i}.key|value [batch, kv_heads, kv_capacity, head_dim]`, and
`attention_mask [batch, total_sequence]` covering the T slots in use after the call, of which the
call's S tokens are the last (slots T-S..T-1). Query s sees key slot j when j <= T-S+s and the mask
holds 1 there. No shape ties the past to the total, so TensorRT profiles are independent boxes; a
decode step copies nothing but its new rows; and the in-place form (IN_PLACE) is what ONNX Runtime's
GroupQueryAttention does with a shared past/present buffer."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from hovle_edge import __version__
from hovle_edge.errors import ModelFolderError
from hovle_edge.files import read_json, resolve_inside
from hovle_edge.verified_hashes import VerifiedHashes

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "hovle-edge/onnx"
MANIFEST_VERSION = 2  # 2: fixed-capacity KV caches (1 concatenated past and new into a longer present)
GRAPHS = ("vision", "embedding", "decoder")
# Named dims. A KV cache is a buffer of kv_capacity slots; total_sequence T counts the slots in use
# after this call (the attention mask covers them), so this call's S tokens sit at slots T-S..T-1.
BATCH, SEQUENCE, TOTAL, CAPACITY, TILES, IMAGE_ROWS = ("batch", "sequence", "total_sequence", "kv_capacity",
                                                       "tiles", "image_rows")
# What a graph's present.{i}.key|value hold (the manifest's kv.present). new_rows: only this call's
# rows [B, kvh, S, d], which the runtime writes into its buffers (standard ops, what TensorRT
# parses). in_place: the whole buffer [B, kvh, C, d], bound to the same memory as the past, written
# by the graph itself (ONNX Runtime's GroupQueryAttention with a shared past/present buffer).
NEW_ROWS, IN_PLACE = "new_rows", "in_place"
KV_PRESENT_MODES = (NEW_ROWS, IN_PLACE)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy-style name: float32, float16, int64
    dims: tuple  # ints for fixed sizes, names from above for dynamic ones

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}

    @classmethod
    def from_json(cls, data: dict) -> "TensorSpec":
        return cls(data["name"], data["dtype"], tuple(data["dims"]))


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def cache_specs(layers: int, kv_heads: int, head_dim: int, dtype: str, present: str = NEW_ROWS) -> tuple[list, list]:
    present_rows = SEQUENCE if present == NEW_ROWS else CAPACITY
    pasts = [TensorSpec(n, dtype, (BATCH, kv_heads, CAPACITY, head_dim)) for n in past_names(layers)]
    presents = [TensorSpec(n, dtype, (BATCH, kv_heads, present_rows, head_dim)) for n in present_names(layers)]
    return pasts, presents


def vision_io(image_size: int, tokens_per_tile: int, hidden: int, dtype: str):
    inputs = [TensorSpec("pixel_values", "float32", (TILES, 3, image_size, image_size))]
    outputs = [TensorSpec("image_embeds", dtype, (TILES, tokens_per_tile, hidden))]
    return inputs, outputs


def embedding_io(layers: int, kv_heads: int, head_dim: int, hidden: int, dtype: str, present_mode: str = NEW_ROWS):
    past, present = cache_specs(layers, kv_heads, head_dim, dtype, present_mode)
    inputs = [TensorSpec("input_ids", "int64", (BATCH, SEQUENCE)),
              TensorSpec("image_embeds", dtype, (IMAGE_ROWS, hidden)),
              TensorSpec("position_ids", "int64", (BATCH, SEQUENCE)),
              TensorSpec("attention_mask", "int64", (BATCH, TOTAL))] + past
    outputs = [TensorSpec("inputs_embeds", dtype, (BATCH, SEQUENCE, hidden))] + present
    return inputs, outputs


def decoder_io(layers: int, kv_heads: int, head_dim: int, hidden: int, vocab: int, dtype: str,
               present_mode: str = NEW_ROWS):
    past, present = cache_specs(layers, kv_heads, head_dim, dtype, present_mode)
    inputs = [TensorSpec("inputs_embeds", dtype, (BATCH, SEQUENCE, hidden)),
              TensorSpec("position_ids", "int64", (BATCH, SEQUENCE)),
              TensorSpec("attention_mask", "int64", (BATCH, TOTAL))] + past
    outputs = [TensorSpec("logits", "float32", (BATCH, 1, vocab))] + present
    return inputs, outputs


@dataclass
class Stack:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int


def model_section(config) -> dict:
    """The manifest's "model" numbers for a HoVLEConfig; the runtime and the roofline read only these."""
    emb, llm = config.embedding_config, config.llm_config

    def stack(cfg) -> dict:
        return {"layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                "head_dim": cfg.head_dim, "intermediate": cfg.intermediate_size}

    return {
        "hidden": llm.hidden_size, "vocab": llm.vocab_size, "image_size": emb.image_size,
        "patch_size": emb.patch_size, "tokens_per_tile": emb.tokens_per_tile,
        "min_tiles": config.min_dynamic_patch, "max_tiles": config.max_dynamic_patch,
        "use_thumbnail": config.use_thumbnail,
        "stacks": {"embedding": stack(emb), "llm": stack(llm)},
    }


@dataclass
class Manifest:
    """A parsed manifest.json with the numbers the runtime needs as attributes."""

    directory: str
    data: dict

    @property
    def model(self) -> dict:
        return self.data["model"]

    @property
    def precision(self) -> str:
        return self.data["precision"]

    @property
    def kv_dtype(self) -> str:
        return "float16" if self.precision == "fp16" else "float32"

    @property
    def kv_present(self) -> str:
        """new_rows or in_place: see KV_PRESENT_MODES."""
        return self.data["kv"]["present"]

    @property
    def max_context(self) -> int:
        return self.data["max_context"]

    @property
    def stop_ids(self) -> list[int]:
        return self.data["tokens"]["stop_ids"]

    def stack(self, name: str) -> Stack:
        return Stack(**self.data["model"]["stacks"][name])

    def graph_path(self, name: str) -> str:
        return resolve_inside(self.directory, self.data["graphs"][name]["file"], f"{MANIFEST} graphs.{name}.file")

    def graph_io(self, name: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
        graph = self.data["graphs"][name]
        return ([TensorSpec.from_json(t) for t in graph["inputs"]], [TensorSpec.from_json(t) for t in graph["outputs"]])

    def verify_files(self, graphs: bool = True, remembered: bool = True) -> None:
        """Every file the manifest lists lies inside the folder, exists and has the hash it had at
        export (with graphs=False, the ONNX graphs are skipped: an engine folder carries engines
        instead). A file unchanged since this machine last hashed it is not read again, unless
        remembered=False (`hovle-edge verify`): see verified_hashes.py."""
        hashes = VerifiedHashes(self.directory)
        try:
            for name, expected in self.data["files"].items():
                if not graphs and (name.endswith(".onnx") or name.endswith(".onnx.data")):
                    continue
                path = resolve_inside(self.directory, name, f"{MANIFEST} files")
                if not os.path.isfile(path):
                    raise ModelFolderError(f"{path}: listed in {MANIFEST} but missing")
                if hashes.sha256(path, remembered) != expected:
                    raise ModelFolderError(f"{path}: sha256 does not match {MANIFEST}; the file changed after "
                                           "export (re-export the model)")
        finally:
            hashes.save()


def write_manifest(directory: str, data: dict) -> None:
    with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


MAX_CONTEXT_LIMIT = 1 << 20  # far past any HoVLE's positions; a larger number is a damaged manifest


def check_manifest(data: dict, path: str) -> None:
    """The parts of a manifest that the runtime reads are there and of the right kind, so that a
    damaged or hand-edited manifest is one sentence here, not a KeyError in the middle of a run."""

    def fail(what: str):
        raise ModelFolderError(f"{path}: {what}; re-export the model")

    def whole(value, high=None) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1 and (high is None or value <= high)

    for key in ("graphs", "model", "files", "tokens", "chat", "kv"):
        if not isinstance(data.get(key), dict):
            fail(f"{key!r} is missing or not an object")
    files = data["files"]
    if not all(isinstance(name, str) and isinstance(digest, str) for name, digest in files.items()):
        fail("'files' must map file names to sha256 strings")
    for name in GRAPHS:
        graph = data["graphs"].get(name)
        if not isinstance(graph, dict) or not isinstance(graph.get("inputs"), list) or \
                not isinstance(graph.get("outputs"), list):
            fail(f"graphs.{name} is missing or has no inputs and outputs")
        for part in [graph.get("file")] + list(graph.get("files", [])):
            if part not in files:  # a graph that is never hashed must never be loaded
                fail(f"graphs.{name} names {part!r}, which is not among the files it hashes")
    model = data["model"]
    for key in ("hidden", "vocab", "image_size", "patch_size", "tokens_per_tile", "min_tiles", "max_tiles"):
        if not whole(model.get(key)):
            fail(f"model.{key} is {model.get(key)!r}, not a whole number >= 1")
    stacks = model.get("stacks") if isinstance(model.get("stacks"), dict) else {}
    fields = sorted(Stack.__dataclass_fields__)
    for name in ("embedding", "llm"):
        numbers = stacks.get(name)
        if not isinstance(numbers, dict) or sorted(numbers) != fields or not all(map(whole, numbers.values())):
            fail(f"model.stacks.{name} is missing or not {', '.join(fields)} as whole numbers >= 1")
    if not whole(data.get("max_context"), MAX_CONTEXT_LIMIT):
        fail(f"max_context {data.get('max_context')!r} is not a whole number from 1 to {MAX_CONTEXT_LIMIT}")
    stop_ids = data["tokens"].get("stop_ids")
    if not isinstance(stop_ids, list) or not all(isinstance(i, int) and 0 <= i < model["vocab"] for i in stop_ids):
        fail(f"tokens.stop_ids {stop_ids!r} are not ids of the vocabulary")
    if data["kv"].get("present") not in KV_PRESENT_MODES:
        fail(f"kv.present {data['kv'].get('present')!r} is not one of {', '.join(KV_PRESENT_MODES)}")


def load_manifest(directory: str, verify: bool = True) -> Manifest:
    """The manifest of a model folder, checked; with `verify`, every file re-hashed from disk."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise ModelFolderError(f"{directory}: no such model folder")
    if not os.path.isfile(path):
        raise ModelFolderError(f"{directory}: no {MANIFEST}; is this a folder made by `hovle-edge export`?")
    data = read_json(path, ModelFolderError)
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ModelFolderError(f"{path}: not a hovle-edge manifest (format {data.get('format') if isinstance(data, dict) else None!r})")
    if data.get("manifest_version") != MANIFEST_VERSION:
        raise ModelFolderError(f"{path}: manifest version {data.get('manifest_version')} was written by hovle-edge "
                               f"{data.get('exporter_version')}; this is {__version__}, which reads version "
                               f"{MANIFEST_VERSION}: re-export the model")
    check_manifest(data, path)
    manifest = Manifest(directory, data)
    if verify:
        manifest.verify_files(remembered=False)
    return manifest
