"""Hashes remembered per file, so that a start does not re-read gigabytes of unchanged weights.

A file's sha256 is remembered with its size, mtime, ctime, inode and device. The kernel sets ctime
on every write and every utime, so a file changed in place and touched back to its old mtime still
gets a new ctime and is hashed again. The record is a small JSON file in the model folder when it is
writable, else in the user's cache (`~/.cache/hovle-edge/hashes/`); a record that cannot be read or
written only costs a fresh hash. This is a cache of work done, not a source of trust: the expected
hashes stay in manifest.json, and `hovle-edge verify` re-hashes everything. Torch-free."""

from __future__ import annotations

import hashlib
import json
import os

from hovle_edge.files import sha256_file, write_json

RECORD = ".hovle-edge-hashes.json"
RECORD_VERSION = 1


def cache_root() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "hovle-edge", "hashes")


def record_path(directory: str) -> str:
    """Beside the files when the folder is writable; else one record per folder in the user cache."""
    directory = os.path.realpath(directory)
    if os.access(directory, os.W_OK):
        return os.path.join(directory, RECORD)
    name = hashlib.sha256(directory.encode()).hexdigest()[:24]
    return os.path.join(cache_root(), f"{name}.json")


def fingerprint(path: str) -> list[int]:
    """What changes when the file's bytes can have changed (ctime cannot be set back by a user)."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class VerifiedHashes:
    """sha256 of files in one folder, from the record when the file is unchanged since it was hashed."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = record_path(directory)
        self.entries = self._read()
        self.changed = False

    def _read(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        ok = isinstance(data, dict) and data.get("version") == RECORD_VERSION and isinstance(data.get("files"), dict)
        return data["files"] if ok else {}

    def sha256(self, path: str, remembered: bool = True) -> str:
        """The file's sha256; read from disk unless `remembered` and the record holds it unchanged."""
        key = os.path.realpath(path)
        before = fingerprint(path)
        entry = self.entries.get(key)
        if remembered and isinstance(entry, dict) and entry.get("fingerprint") == before:
            return entry["sha256"]
        digest = sha256_file(path)
        if fingerprint(path) == before:  # remember only a hash of bytes that did not move while read
            self.entries[key] = {"fingerprint": before, "sha256": digest}
            self.changed = True
        return digest

    def save(self) -> None:
        if not self.changed:
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            write_json(self.path, {"version": RECORD_VERSION, "files": self.entries})
        except OSError:  # a read-only folder and cache: the next start hashes again, nothing worse
            pass
        self.changed = False
