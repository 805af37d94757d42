"""engines.json and the engine cache: what was built, for which GPU architectures (compute
capabilities) and TensorRT, with which profiles; a cache key over all of that so an unchanged model is
never rebuilt, and a clear error when engines meet a GPU they were not built for or another TensorRT
version. No TensorRT import here."""

from __future__ import annotations

import hashlib
import json
import os

from hovle_edge.errors import ModelFolderError
from hovle_edge.files import resolve_inside

ENGINES = "engines.json"
ENGINES_FORMAT = "hovle-edge/engines"
ENGINES_VERSION = 2  # 2: a list of compute capabilities (ahead-of-time builds), gpu null without one


def cache_key(flavour: str, tensorrt_version: str, compute_capabilities: list[str], graph_sha256: str,
              profiles: list[dict], precision: str) -> str:
    """Everything that changes an engine, hashed."""
    blob = json.dumps({"flavour": flavour, "tensorrt": tensorrt_version, "sm": compute_capabilities,
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
    """Engines run only with the flavour and TensorRT version that built them, on a GPU whose
    architecture is among those they were built for."""
    built_for = data["compute_capabilities"]
    if (data["flavour"], data["tensorrt_version"]) == (flavour, tensorrt_version) and compute_capability in built_for:
        return
    built_on = f"on {data['gpu']}" if data.get("gpu") else "ahead of time, without a GPU"
    raise ModelFolderError(
        f"{where}: engines were built with {data['flavour']} {data['tensorrt_version']} for compute capability "
        f"{', '.join(built_for)} ({built_on}); this machine has {flavour} {tensorrt_version} and a GPU of compute "
        f"capability {compute_capability}: rebuild them for it with `hovle-edge build`")
