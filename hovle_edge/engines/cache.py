"""engines.json and the engine cache: what was built, for which GPU and TensorRT, with which
profiles; a cache key over all of that so an unchanged model is never rebuilt, and a clear error
when engines meet another GPU or TensorRT version. No TensorRT import here."""

from __future__ import annotations

import hashlib
import json
import os

from hovle_edge.errors import ModelFolderError
from hovle_edge.files import resolve_inside

ENGINES = "engines.json"
ENGINES_FORMAT = "hovle-edge/engines"
ENGINES_VERSION = 1


def cache_key(flavour: str, tensorrt_version: str, compute_capability: str, graph_sha256: str,
              profiles: list[dict], precision: str) -> str:
    """Everything that changes an engine, hashed."""
    blob = json.dumps({"flavour": flavour, "tensorrt": tensorrt_version, "sm": compute_capability,
                       "graph": graph_sha256, "profiles": profiles, "precision": precision}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "hovle-edge", "engines")


def read_engines(directory: str) -> dict:
    path = os.path.join(directory, ENGINES)
    if not os.path.isfile(path):
        raise ModelFolderError(f"{directory}: no {ENGINES}; build engines with `hovle-edge build --model ONNX_DIR --out DIR`")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("format") != ENGINES_FORMAT or data.get("version") != ENGINES_VERSION:
        raise ModelFolderError(f"{path}: engines of format {data.get('format')} v{data.get('version')}; this hovle-edge "
                               f"reads {ENGINES_FORMAT} v{ENGINES_VERSION}: rebuild them")
    engines = data.get("engines")
    if not isinstance(engines, dict) or not all(isinstance(entry, dict) for entry in engines.values()):
        raise ModelFolderError(f"{path}: no 'engines' object of graph entries; rebuild them")
    for graph, entry in engines.items():  # an engine named `../x` or `/x` would be read from elsewhere
        resolve_inside(directory, entry.get("file"), f"{path} engines.{graph}.file")
    return data


def check_compatible(data: dict, flavour: str, tensorrt_version: str, compute_capability: str, where: str) -> None:
    """Engines run only where they were built: same flavour, TensorRT version and GPU architecture."""
    built = (data["flavour"], data["tensorrt_version"], data["compute_capability"])
    here = (flavour, tensorrt_version, compute_capability)
    if built != here:
        raise ModelFolderError(
            f"{where}: engines were built with {built[0]} {built[1]} for compute capability {built[2]} "
            f"({data.get('gpu', '?')}); this machine has {here[0]} {here[1]} and compute capability {here[2]}: "
            "rebuild them here with `hovle-edge build`")
