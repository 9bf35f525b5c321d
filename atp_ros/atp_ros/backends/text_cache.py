"""A bounded LRU of text embeddings: the text tower runs once per distinct question."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

from torch import Tensor

# --------------------------------------------------------------------------- text cache


class TextEmbeddingCache:
    """Bounded LRU of text embeddings keyed by query string (thread-safe).

    Queries change far less often than frames, so the text tower runs once per
    distinct question instead of once per frame.
    """

    def __init__(self, encode: Callable[[str], Tensor], maxsize: int = 64) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self._encode = encode
        self._maxsize = maxsize
        self._items: OrderedDict[Hashable, Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, text: str) -> Tensor:
        """Embedding of ``text``, computed on first use."""
        with self._lock:
            if text in self._items:
                self._items.move_to_end(text)
                self.hits += 1
                return self._items[text]
        value = self._encode(text)  # outside the lock: the text tower can be slow
        with self._lock:
            self.misses += 1
            self._items[text] = value
            self._items.move_to_end(text)
            while len(self._items) > self._maxsize:
                self._items.popitem(last=False)
        return value
