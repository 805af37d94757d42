"""File helpers shared by every stage: a folder that appears whole or not at all and replaces only
what hovle-edge made, names that stay inside their folder, JSON side files, and hashes. Torch-free."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
from typing import Callable, Sequence

from hovle_edge.errors import ModelFolderError, OutputFolderError


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


# Written inside a temporary folder while a command fills it: which process owns it, so that a later
# run removes it only once that process is gone (kill -9 leaves it behind).
TEMPORARY_MARKER = ".hovle-edge-temporary.json"
# Written into a folder a command fills in place (a training run that resumes, the demo that reuses
# its steps): the folder is ours to write into again.
OUTPUT_MARKER = ".hovle-edge-output.json"


def folder_with(name: str, **fields) -> Callable[[str], bool]:
    """A test for "a folder hovle-edge made": it holds `name`, a JSON object with these fields
    (e.g. manifest.json with our format)."""

    def test(directory: str) -> bool:
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and all(data.get(k) == v for k, v in fields.items())

    return test


def relation(output: str, given: str) -> str | None:
    """How `output` and an input overlap after symlinks ("is", "holds", "sits inside"), or None."""
    output, given = os.path.realpath(output), os.path.realpath(given)
    common = os.path.commonpath([output, given])
    return "is" if output == given else "holds" if common == output else "sits inside" if common == given else None


def check_replaceable(path: str, overwrite: bool, owned_by: Callable[[str], bool] | None = None,
                      inputs: Sequence[str | None] = (), what: str = "output folder") -> None:
    """Refuse, before any work, to write `path` when it exists, unless `overwrite` is set and it is a
    folder hovle-edge made (`owned_by`; an empty folder too) that neither is, holds nor sits inside an input."""
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise OutputFolderError(f"{what} {path} exists; choose another folder, or allow overwriting it "
                                "(only a folder hovle-edge made is replaced)", setting="overwrite")
    refuse_unless_ours(path, owned_by, inputs, what)


def refuse_unless_ours(path: str, owned_by: Callable[[str], bool] | None, inputs: Sequence[str | None], what: str) -> None:
    if not os.path.isdir(path):
        raise OutputFolderError(f"{what} {path} exists and is not a folder; it is left alone")
    for given in inputs:
        overlap = relation(path, given) if given and os.path.exists(given) else None
        if overlap:
            raise OutputFolderError(f"{what} {path} {overlap} the input {given}; it is left alone "
                                    "(write the output to a folder of its own)")
    if os.listdir(path) and not (owned_by and owned_by(path)):
        raise OutputFolderError(f"{what} {path} holds files that hovle-edge did not write there; "
                                "it is left alone (remove it yourself, or choose another folder)")


def claim_directory(path: str, kind: str, owned_by: Callable[[str], bool] | None = None,
                    inputs: Sequence[str | None] = (), what: str = "output folder") -> None:
    """Make `path` a folder this command fills in place (a training run that resumes, the demo):
    created, or accepted when empty or made by an earlier run of the same kind; then marked as ours."""
    marked = folder_with(OUTPUT_MARKER, made_by="hovle-edge", kind=kind)
    if os.path.lexists(path):
        refuse_unless_ours(path, lambda p: marked(p) or bool(owned_by and owned_by(p)), inputs, what)
    os.makedirs(path, exist_ok=True)
    if not marked(path):
        write_json(os.path.join(path, OUTPUT_MARKER), {"made_by": "hovle-edge", "kind": kind})


@contextlib.contextmanager
def atomic_directory(path: str, overwrite: bool = False, owned_by: Callable[[str], bool] | None = None,
                     inputs: Sequence[str | None] = (), what: str = "output folder"):
    """Yield a temporary folder beside `path`; on success it replaces `path`, on failure it is removed,
    so a reader never sees a half-written folder. An existing `path` is replaced only as
    check_replaceable allows (checked again at the swap: it may have appeared meanwhile)."""
    path = os.path.realpath(path)  # an output reached through a symlink: replace the folder it names
    check_replaceable(path, overwrite, owned_by, inputs, what)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(parent, name)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide the output from other users
    mark_temporary(tmp)
    try:
        yield tmp
        os.remove(os.path.join(tmp, TEMPORARY_MARKER))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    check_replaceable(path, overwrite, owned_by, inputs, what)
    old = None
    if os.path.lexists(path):
        old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
        os.rmdir(old)
        with contextlib.suppress(OSError):
            mark_temporary(path)  # goes aside with it: a kill before the removal below leaves it cleanable
        os.replace(path, old)
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def mark_temporary(directory: str) -> None:
    with open(os.path.join(directory, TEMPORARY_MARKER), "w", encoding="utf-8") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)


def remove_stale_temporaries(parent: str, name: str) -> None:
    """Remove the `.NAME.tmp-*` and `.NAME.old-*` folders beside `name` that a killed run of ours left:
    only those holding our marker, written on this machine by a process that is gone."""
    for entry in os.listdir(parent):
        if not (entry.startswith(f".{name}.tmp-") or entry.startswith(f".{name}.old-")):
            continue
        folder = os.path.join(parent, entry)
        if os.path.islink(folder) or not os.path.isdir(folder):
            continue
        try:
            with open(os.path.join(folder, TEMPORARY_MARKER), encoding="utf-8") as f:
                owner = json.load(f)
            pid, host = int(owner["pid"]), owner["host"]
        except (OSError, ValueError, TypeError, KeyError):
            continue  # not ours, or not ours to judge
        if host == socket.gethostname() and not process_alive(pid):
            shutil.rmtree(folder, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


@contextlib.contextmanager
def atomic_file(path: str):
    """Yield a temporary path beside `path`; it becomes `path` only when the block succeeds."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # as open() would make it, not mkstemp's 0600
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
