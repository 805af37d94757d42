"""The KV caches of both stacks for one conversation: buffers of a fixed capacity, allocated once by
the backend in its own memory (numpy arrays on CPU, device buffers on a GPU), filled slot by slot as
tokens run, plus the attention mask and positions that go with them. Nothing is allocated or copied
per token beyond the new rows; a snapshot copies the slots in use so that a prefix can be resumed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hovle_edge.errors import InputError

STACK_GRAPHS = ("embedding", "decoder")  # the graphs that carry a KV cache, each its own


@dataclass
class CacheSnapshot:
    """The first `length` slots of every buffer of both stacks, on the host."""

    length: int
    rows: dict  # graph -> {past name: np.ndarray [B, kvh, length, d]}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for stack in self.rows.values() for a in stack.values())

    def prefix(self, length: int) -> "CacheSnapshot":
        """The first `length` slots only (views, no copy): a shorter prefix shared with another prompt."""
        if length >= self.length:
            return self
        rows = {graph: {name: rows[:, :, :length] for name, rows in stack.items()} for graph, stack in self.rows.items()}
        return CacheSnapshot(length, rows)


class ConversationCache:
    """Both stacks' buffers plus the number of slots in use, within a fixed capacity."""

    def __init__(self, backend, capacity: int, batch: int = 1):
        self.backend = backend
        self.capacity = capacity
        self.length = 0
        self.buffers = {graph: backend.kv_buffers(graph, batch, capacity) for graph in STACK_GRAPHS}

    def room(self) -> int:
        return self.capacity - self.length

    def check_room(self, new_tokens: int, what: str = "the prompt") -> None:
        if new_tokens > self.room():
            raise InputError(f"{what} needs {new_tokens} tokens but only {self.room()} of the context of "
                             f"{self.capacity} are left (already used: {self.length}); shorten it, use fewer "
                             "image tiles, or start a new conversation")

    def step_inputs(self, new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """position_ids [1, S] and attention_mask [1, T] for `new_tokens` after what is cached."""
        positions = np.arange(self.length, self.length + new_tokens, dtype=np.int64)[None]
        mask = np.ones((1, self.length + new_tokens), dtype=np.int64)
        return positions, mask

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens

    def snapshot(self) -> CacheSnapshot:
        rows = {graph: {name: self.backend.read_kv(buffer, self.length) for name, buffer in buffers.items()}
                for graph, buffers in self.buffers.items()}
        return CacheSnapshot(self.length, rows)

    def restore(self, snapshot: CacheSnapshot) -> None:
        """Continue from `snapshot`: its slots written back, everything after them free again."""
        if snapshot.length > self.capacity:
            raise InputError(f"a snapshot of {snapshot.length} tokens does not fit a cache of {self.capacity}")
        for graph, buffers in self.buffers.items():
            for name, buffer in buffers.items():
                self.backend.write_kv(buffer, snapshot.rows[graph][name], 0)
        self.length = snapshot.length
