"""Bounded, thread-safe LRU maps: the image-embedding cache and the small tables beside it.

Chat front ends re-send every earlier image on every turn; the embedding cache makes a turn that reuses
them run the vision tower only for new images. Every map here is bounded by the total cost of its
values (bytes, characters, pixels, entries): the least recently used entries go first once the total
exceeds the budget, and a value costing more than the whole budget is not stored.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Generic, Hashable, TypeVar

if TYPE_CHECKING:
    import torch

Value = TypeVar("Value")


class BoundedLRU(Generic[Value]):
    def __init__(self, max_cost: int, cost: Callable[[Value], int]):
        if max_cost < 0:
            raise ValueError(f"budget must be >= 0, got {max_cost}")
        self.max_cost = int(max_cost)
        self._cost = cost
        self._entries: OrderedDict[Hashable, Value] = OrderedDict()
        self._total = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Value | None:
        """The value (now the most recently used), or None."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: Hashable, value: Value) -> None:
        """Store ``value`` under ``key`` (replacing any), then evict from the oldest end to fit."""
        cost = self._cost(value)
        with self._lock:
            self._pop(key)
            if cost > self.max_cost:
                return
            self._entries[key] = value
            self._total += cost
            while self._total > self.max_cost:
                self._pop(next(iter(self._entries)))

    def pop(self, key: Hashable) -> Value | None:
        """Remove and return the value, or None."""
        with self._lock:
            return self._pop(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._total = 0

    @property
    def total_cost(self) -> int:
        with self._lock:
            return self._total

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _pop(self, key: Hashable) -> Value | None:
        value = self._entries.pop(key, None)
        if value is not None:
            self._total -= self._cost(value)
        return value


class EmbeddingCache(BoundedLRU["torch.Tensor"]):
    """Image embeddings by content key, bounded in bytes; counts hits and misses."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"cache size must be >= 0 bytes, got {max_bytes}")
        super().__init__(max_bytes, self.size_of)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def size_of(tensor: torch.Tensor) -> int:
        return tensor.numel() * tensor.element_size()

    @property
    def max_bytes(self) -> int:
        return self.max_cost

    @property
    def bytes_used(self) -> int:
        return self.total_cost

    def get(self, key: Hashable) -> torch.Tensor | None:
        tensor = super().get(key)
        with self._lock:
            if tensor is None:
                self.misses += 1
            else:
                self.hits += 1
        return tensor
