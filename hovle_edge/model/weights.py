"""Weights as data: read the official safetensors layout (sharded with an index, or one file), check
every name and shape against the model built on the meta device, assign. Write the same layout."""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hovle_edge.config import HoVLEConfig
from hovle_edge.errors import CheckpointError, ModelFolderError
from hovle_edge.files import resolve_inside

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def checkpoint_files(directory: str) -> list[str]:
    """The safetensors files of a checkpoint folder, from its index when there is one."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such checkpoint folder")
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard file names")
        names = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(directory, SINGLE_FILE)):
        names = [SINGLE_FILE]
    else:
        raise CheckpointError(f"{directory}: neither {INDEX_FILE} nor {SINGLE_FILE} is there "
                              f"(found: {', '.join(sorted(os.listdir(directory))) or 'nothing'})")
    try:  # a shard named `../x` or `/x` would be read from outside the checkpoint
        paths = [resolve_inside(directory, name, f"{index_path} weight_map") for name in names]
    except ModelFolderError as e:
        raise CheckpointError(str(e)) from e
    for path in paths:
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: shard named in {INDEX_FILE} is missing")
    return paths


def read_state_dict(directory: str) -> dict[str, torch.Tensor]:
    state = {}
    for path in checkpoint_files(directory):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    state[name] = f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for truncated or foreign files
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    return state


def check_state_dict(expected: dict[str, tuple], found: dict[str, torch.Tensor], where: str) -> None:
    """One error naming every missing, unexpected and mis-shaped tensor."""
    problems = [f"missing: {k} {list(s)}" for k, s in expected.items() if k not in found]
    problems += [f"unexpected: {k} {list(t.shape)}" for k, t in found.items() if k not in expected]
    problems += [f"wrong shape: {k} is {list(found[k].shape)}, expected {list(s)}"
                 for k, s in expected.items() if k in found and tuple(found[k].shape) != tuple(s)]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(f"{where}: weights do not match config.json ({len(problems)} problem(s)):\n  {shown}")


def load_model(directory: str, dtype=torch.float32, device="cpu"):
    from hovle_edge.model.hovle import HoVLE

    config = HoVLEConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = HoVLE(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = read_state_dict(directory)
    check_state_dict(expected, state, directory)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def shard(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    return shards + [current]


def save_state_dict(state: dict[str, torch.Tensor], directory: str, max_shard_bytes: int) -> None:
    """Write `state` as model.safetensors, or as model-0000N-of-0000M shards plus an index."""
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    shards = shard(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, part in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save_model(model, directory: str, max_shard_bytes: int = 5 * 2**30, extra_files: dict[str, str] | None = None,
               weights: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json and the weights (`weights`, or the model's own state dict) into `directory`
    (other files there are left alone). Each file is written in full beside it first and then moved
    in, so none is ever half-written; the weight files of an earlier save are removed. `extra_files`
    maps names to paths copied alongside."""
    import shutil
    import tempfile

    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".saving-", dir=directory) as tmp:
        model.config.save_pretrained(tmp)
        save_state_dict(model.state_dict() if weights is None else weights, tmp, max_shard_bytes)
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, os.path.join(tmp, name))
        for name in os.listdir(directory):
            if name in (SINGLE_FILE, INDEX_FILE) or SHARD_NAME.fullmatch(name):
                os.remove(os.path.join(directory, name))
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
