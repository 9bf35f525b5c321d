"""Rolling latency statistics and counters for /diagnostics (no ROS imports)."""

from __future__ import annotations

import threading
from collections import defaultdict, deque

import numpy as np


class LatencyWindow:
    """p50/p95 of the last ``size`` samples per stage name (thread-safe)."""

    def __init__(self, size: int = 100) -> None:
        self._size = size
        self._samples: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=self._size))
        self._lock = threading.Lock()

    def add(self, values: dict[str, float]) -> None:
        with self._lock:
            for name, value in values.items():
                self._samples[name].append(float(value))

    def summary(self) -> dict[str, tuple[float, float, int]]:
        """``{stage: (p50, p95, count)}`` in the units the samples were given."""
        with self._lock:
            return {
                name: (float(np.percentile(s, 50)), float(np.percentile(s, 95)), len(s))
                for name, s in self._samples.items()
                if s
            }


class Counters:
    """Named integer counters (frames received/processed/dropped, bad input per cause)."""

    def __init__(self) -> None:
        self._values: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def inc(self, name: str, by: int = 1) -> None:
        with self._lock:
            self._values[name] += by

    def get(self, name: str) -> int:
        with self._lock:
            return self._values.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)
