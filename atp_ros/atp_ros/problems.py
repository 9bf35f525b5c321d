"""Problems counted per cause, shared by the node's worker and the evaluation's readers (no ROS).

Each cause keeps its count, its first and its latest message. :meth:`Problems.report` also says
which occurrences deserve a log line: the 1st, then the 10th, 100th, 1000th... never one per frame.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

# Severity of a problem, numerically equal to diagnostic_msgs/DiagnosticStatus levels.
OK, WARN, ERROR = 0, 1, 2


@dataclass(frozen=True)
class Problem:
    """The latest occurrence of one cause."""

    level: int
    message: str
    when: float  # time.monotonic()
    count: int  # occurrences of this cause so far
    first: str  # the message of the first occurrence


class Problems:
    """Per-cause count, first and latest occurrence (thread-safe)."""

    def __init__(self) -> None:
        self._latest: dict[str, Problem] = {}
        self._lock = threading.Lock()

    def report(self, cause: str, level: int, message: str) -> str | None:
        """Record one occurrence; the line to log when it is the 1st, 10th, 100th... of its cause, else None."""
        with self._lock:
            before = self._latest.get(cause)
            count = before.count + 1 if before else 1
            self._latest[cause] = Problem(level, message, time.monotonic(), count, before.first if before else message)
        if count == 1:
            return f"[{cause}] {message}"
        if _power_of_ten(count):
            return f"[{cause}] {count} times so far, latest: {message}"
        return None

    def add(self, cause: str, message: str, level: int = WARN) -> None:
        """Record one occurrence without asking for a log line (readers summarise with :meth:`lines`)."""
        self.report(cause, level, message)

    def recent(self, within_s: float) -> dict[str, Problem]:
        """The causes that occurred in the last ``within_s`` seconds."""
        now = time.monotonic()
        with self._lock:
            return {c: p for c, p in self._latest.items() if now - p.when < within_s}

    def counts(self) -> dict[str, int]:
        """Occurrences per cause."""
        with self._lock:
            return {c: p.count for c, p in self._latest.items()}

    def lines(self) -> list[str]:
        """One line per cause, sorted: ``cause: count (first: message)``."""
        with self._lock:
            return [f"{c}: {p.count} (first: {p.first})" for c, p in sorted(self._latest.items())]


def _power_of_ten(n: int) -> bool:
    while n % 10 == 0 and n > 1:
        n //= 10
    return n == 1
