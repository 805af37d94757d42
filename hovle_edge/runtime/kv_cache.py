"""The KV caches of both stacks for one conversation: the graphs' presents handed back as the next
step's past without a copy, a capacity fixed when the conversation starts, and the attention mask
and positions that go with them."""

from __future__ import annotations

import numpy as np

from hovle_edge.errors import InputError
from hovle_edge.spec import Stack, past_names, present_names


class StackCache:
    """One stack's past: backend values (numpy arrays on CPU, device buffers elsewhere) by name."""

    def __init__(self, stack: Stack, dtype: str, batch: int = 1):
        self.stack = stack
        empty = np.zeros((batch, stack.kv_heads, 0, stack.head_dim), dtype=dtype)
        self.values = {name: empty for name in past_names(stack.layers)}
        self.presents = present_names(stack.layers)

    def feeds(self) -> dict:
        return dict(self.values)

    def update(self, outputs: dict) -> None:
        for past, present in zip(self.values, self.presents):
            self.values[past] = outputs[present]


class ConversationCache:
    """Both stacks' caches plus the length they hold, within a fixed capacity."""

    def __init__(self, embedding: Stack, llm: Stack, dtype: str, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.embedding = StackCache(embedding, dtype)
        self.llm = StackCache(llm, dtype)

    def room(self) -> int:
        return self.capacity - self.length

    def check_room(self, new_tokens: int, what: str = "the prompt") -> None:
        if new_tokens > self.room():
            raise InputError(f"{what} needs {new_tokens} tokens but only {self.room()} of the context of "
                             f"{self.capacity} are left (already used: {self.length}); shorten it, use fewer "
                             "image tiles, or start a new conversation")

    def step_inputs(self, new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """position_ids [1, S] and attention_mask [1, P+S] for `new_tokens` after what is cached."""
        positions = np.arange(self.length, self.length + new_tokens, dtype=np.int64)[None]
        mask = np.ones((1, self.length + new_tokens), dtype=np.int64)
        return positions, mask

    def advance(self, new_tokens: int, embedding_outputs: dict, llm_outputs: dict) -> None:
        self.embedding.update(embedding_outputs)
        self.llm.update(llm_outputs)
        self.length += new_tokens
