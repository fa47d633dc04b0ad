"""A bounded, thread-safe LRU cache of image embeddings, keyed by image content.

Chat front ends re-send every earlier image on every turn; the cache makes a turn that reuses them run
the vision tower only for new images. Entries are evicted oldest-first once their total size exceeds
``max_bytes``; an entry larger than the whole budget is not stored.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Hashable

import torch


class EmbeddingCache:
    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def size_of(tensor: torch.Tensor) -> int:
        return tensor.numel() * tensor.element_size()

    def get(self, key: Hashable) -> torch.Tensor | None:
        with self._lock:
            tensor = self._entries.get(key)
            if tensor is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return tensor

    def put(self, key: Hashable, tensor: torch.Tensor) -> None:
        size = self.size_of(tensor)
        with self._lock:
            if key in self._entries:
                self._bytes -= self.size_of(self._entries.pop(key))
            if size > self.max_bytes:
                return
            self._entries[key] = tensor
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= self.size_of(evicted)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    @property
    def bytes_used(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
