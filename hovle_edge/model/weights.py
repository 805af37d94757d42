"""Weights as data: read the official safetensors layout (sharded with an index, or one file), check
every name and shape against the model built on the meta device, assign. Write the same layout."""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import re
import struct
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from hovle_edge.config import HoVLEConfig
from hovle_edge.errors import CheckpointError, ModelFolderError
from hovle_edge.files import current_umask, resolve_inside

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# Hugging Face's default max_shard_size "5GB" is decimal: the official 2.6B fp32 checkpoint is 3 shards.
OFFICIAL_SHARD_BYTES = 5_000_000_000


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


# safetensors dtype names -> torch dtypes (the ones checkpoints of this model use).
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
                      "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


@dataclass
class StoredTensor:
    path: str
    shape: tuple
    dtype: torch.dtype
    start: int  # absolute byte offsets in the file
    end: int


def tensor_index(directory: str) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint by name, from the shard headers alone (no data read)."""
    index = {}
    for path in checkpoint_files(directory):
        try:
            index.update(read_header(path))
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    return index


def read_header(path: str) -> dict[str, StoredTensor]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        (header_bytes,) = struct.unpack("<Q", f.read(8))
        if header_bytes > min(size - 8, 100 * 2**20):
            raise ValueError(f"header of {header_bytes} bytes in a file of {size}")
        header = json.loads(f.read(header_bytes))
    base, tensors = 8 + header_bytes, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name} has dtype {info['dtype']}, which this loader does not read")
        dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"])
        start, end = (base + o for o in info["data_offsets"])
        if end - start != math.prod(shape) * dtype.itemsize or end > size:
            raise ValueError(f"{name}: bytes {start}..{end} do not hold {list(shape)} {info['dtype']} "
                             f"in a file of {size} bytes (truncated?)")
        tensors[name] = StoredTensor(path, shape, dtype, start, end)
    return tensors


def read_tensors(index: dict[str, StoredTensor], dtype: torch.dtype | None = None, progress: bool = False):
    """Yield (name, tensor) one at a time, read with plain file reads straight into the tensor's memory
    and cast to `dtype` (None: as stored), so the checkpoint is never held twice or mapped whole."""
    total = sum(t.end - t.start for t in index.values())
    bar = tqdm(total=total, desc="loading weights", unit="B", unit_scale=True, unit_divisor=1024,
               disable=not progress)
    files = {}
    try:
        for name, stored in sorted(index.items(), key=lambda item: (item[1].path, item[1].start)):
            if stored.path not in files:
                files[stored.path] = open(stored.path, "rb")
            f = files[stored.path]
            tensor = torch.empty(stored.shape, dtype=stored.dtype)
            f.seek(stored.start)
            if f.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != stored.end - stored.start:
                raise CheckpointError(f"{stored.path}: {name} ends past the end of the file (truncated?)")
            bar.update(stored.end - stored.start)
            yield name, tensor if dtype is None or dtype == tensor.dtype else tensor.to(dtype)
    finally:
        for f in files.values():
            f.close()
        bar.close()


def read_state_dict(directory: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    return dict(read_tensors(tensor_index(directory), dtype))


def check_state_dict(expected: dict[str, tuple], found: dict[str, torch.Tensor], where: str) -> None:
    """One error naming every missing, unexpected and mis-shaped tensor."""
    problems = [f"missing: {k} {list(s)}" for k, s in expected.items() if k not in found]
    problems += [f"unexpected: {k} {list(t.shape)}" for k, t in found.items() if k not in expected]
    problems += [f"wrong shape: {k} is {list(found[k].shape)}, expected {list(s)}"
                 for k, s in expected.items() if k in found and tuple(found[k].shape) != tuple(s)]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointError(f"{where}: weights do not match config.json ({len(problems)} problem(s)):\n  {shown}")


def load_model(directory: str, dtype: torch.dtype | None = torch.float32, device="cpu", progress: bool = False):
    """The model built on the meta device, every name and shape checked from the shard headers before a
    byte of data is read, then each tensor read, cast to `dtype` (None: as stored, e.g. bf16) and
    assigned: the weights are in memory once, in the dtype asked for."""
    from hovle_edge.model.hovle import HoVLE

    config = HoVLEConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = HoVLE(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    index = tensor_index(directory)
    check_state_dict(expected, {k: torch.empty(t.shape, device="meta") for k, t in index.items()}, directory)
    state = {name: tensor.to(device) for name, tensor in read_tensors(index, dtype, progress)}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def release_weights(module: torch.nn.Module, keep=()) -> int:
    """Free the memory of `module`'s parameters and buffers except those also held by a module in
    `keep` (the module is unusable afterwards); returns the bytes freed. For an exporter done with a
    submodule: its graph is written, and ONNX Runtime is about to open it."""
    kept = {id(t) for m in keep for t in (*m.parameters(), *m.buffers())}
    freed = 0
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in kept and t.numel():
            freed += t.numel() * t.element_size()
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    gc.collect()  # the exporter's programs hold the tensors in reference cycles
    give_back_freed_memory()
    return freed


def give_back_freed_memory() -> None:
    """Return freed heap pages to the system (glibc keeps them otherwise, and the next big allocation,
    an ONNX Runtime session, would come on top of them in the peak)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


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


def save_model(model, directory: str, max_shard_bytes: int = OFFICIAL_SHARD_BYTES, extra_files: dict[str, str] | None = None,
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
        for name in os.listdir(tmp):  # safetensors makes its files 0600: give them the umask's mode, as open() does
            os.chmod(os.path.join(tmp, name), 0o666 & ~current_umask())
        for name in os.listdir(directory):
            if name in (SINGLE_FILE, INDEX_FILE) or SHARD_NAME.fullmatch(name):
                os.remove(os.path.join(directory, name))
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
