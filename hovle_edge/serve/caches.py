"""The server's two memories, each least-recently-used under a byte budget: KV snapshots of earlier
conversations (a new request resumes from the longest prefix it shares with one, images compared by
hash), and the vision graph's output by image hash. Thread-safe: the HTTP side reads the image
cache while the model thread fills both."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


class LruBudget:
    """key -> (value, nbytes); the least recently used entries go first when the total passes the budget."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: OrderedDict = OrderedDict()
        self.used = 0
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            if key not in self.entries:
                return None
            self.entries.move_to_end(key)
            return self.entries[key][0]

    def put(self, key, value, nbytes: int) -> None:
        with self.lock:
            if key in self.entries:
                self.used -= self.entries.pop(key)[1]
            if nbytes > self.budget:
                return  # larger than the whole budget: never kept
            self.entries[key] = (value, nbytes)
            self.used += nbytes
            while self.used > self.budget:
                self.used -= self.entries.popitem(last=False)[1][1]

    def drop(self, key) -> None:
        with self.lock:
            if key in self.entries:
                self.used -= self.entries.pop(key)[1]

    def values(self) -> list:
        with self.lock:
            return [value for value, _ in self.entries.values()]

    def touch(self, key) -> None:
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)


class ImageCache(LruBudget):
    """sha256 of the encoded image -> image_embeds [rows, hidden]."""

    def add(self, digest: str, embeds: np.ndarray) -> None:
        self.put(digest, embeds, embeds.nbytes)


@dataclass
class PrefixEntry:
    ids: tuple  # the token ids the snapshot holds
    images: tuple  # the hashes of the images whose blocks lie in them, in order
    image_starts: tuple  # where each of those blocks starts
    snapshot: object  # the runtime's snapshot of both stacks' caches


@dataclass
class PrefixMatch:
    entry: PrefixEntry
    length: int  # how many leading ids of the request the snapshot can stand for


class PrefixCache(LruBudget):
    """KV snapshots keyed by their token ids (and image hashes)."""

    def add(self, entry: PrefixEntry, nbytes: int) -> None:
        for held in self.values():  # a snapshot that is a prefix of another adds nothing (see longest)
            if _holds(entry, held):
                self.drop((held.ids, held.images))
            elif _holds(held, entry):
                self.touch((held.ids, held.images))
                return
        self.put((entry.ids, entry.images), entry, nbytes)

    def longest(self, ids: list[int], images: list[str], limit: int) -> PrefixMatch | None:
        """The entry sharing the most leading ids with a request (at most `limit`), an image counting
        as shared only when its bytes hash the same."""
        best = None
        for entry in self.values():
            length = min(_common_prefix(entry.ids, ids), limit)
            for k, start in enumerate(entry.image_starts):
                if start >= length:
                    break
                if k >= len(images) or images[k] != entry.images[k]:
                    length = start  # resume before the first image that differs
                    break
            if length > 0 and (best is None or length > best.length):
                best = PrefixMatch(entry, length)
        if best is not None:
            self.touch((best.entry.ids, best.entry.images))
        return best


def _holds(longer: PrefixEntry, shorter: PrefixEntry) -> bool:
    return (longer.ids[:len(shorter.ids)] == shorter.ids
            and longer.images[:len(shorter.images)] == shorter.images)


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):
        return n
    return int(np.argmax(np.asarray(a[:n]) != np.asarray(b[:n])))
