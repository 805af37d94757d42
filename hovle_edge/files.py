"""File helpers shared by every stage: a folder that appears whole or not at all, and hashes. Torch-free."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile

from hovle_edge.errors import ModelFolderError


def resolve_inside(directory: str, name: str, what: str) -> str:
    """The absolute path of `name` inside `directory`; a name that is absolute or leads outside it
    (through `..` or a symlink) is refused, so a manifest or index cannot make us read elsewhere."""
    if not isinstance(name, str) or not name or os.path.isabs(name):
        raise ModelFolderError(f"{what} names {name!r}: expected a relative path inside {directory}")
    root = os.path.realpath(directory)
    target = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, target]) != root:
        raise ModelFolderError(f"{what} names {name!r}, which resolves to {target}, outside {root}")
    return target


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = True):
    """Yield a temporary folder beside `path`; on success it replaces `path`, on failure it is removed,
    so a reader never sees a half-written folder."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; choose another folder or remove it")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
        os.rmdir(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str):
    """Yield a temporary path beside `path`; it becomes `path` only when the block succeeds."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: list[str]) -> str:
    """One hash over several files, in the order given (names and contents)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.basename(path).encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def write_json(path: str, data) -> None:
    """Write `data` as indented JSON; the file appears whole or not at all."""
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")


def read_json(path: str, error) -> dict | list:
    """A JSON file's contents; an unreadable or malformed file raises `error` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise error(f"{path}: not readable JSON ({e})") from e
