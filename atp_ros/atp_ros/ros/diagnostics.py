"""The node's ``/diagnostics`` status as a pure function of the worker's statistics (no ROS imports).

:func:`snapshot` reads what the status needs from a running :class:`~atp_ros.ros.worker.InferenceWorker`;
:func:`status` turns it, the lifecycle state and the backend's facts into ``(level, message, values)``,
which the node wraps in a ``DiagnosticStatus``. Levels are :mod:`atp_ros.problems`' ``OK``/``WARN``/``ERROR``,
numerically equal to ``DiagnosticStatus``'s.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from atp_ros.problems import ERROR, OK, WARN, Problem

RECENT_PROBLEM_S = 10.0  # a problem keeps /diagnostics at WARN/ERROR this long


@dataclass(frozen=True)
class WorkerSnapshot:
    """What the status shows of the worker, read once per status."""

    running: bool
    recent: Mapping[str, Problem] = field(default_factory=dict)  # problems of the last RECENT_PROBLEM_S
    notes: Sequence[str] = ()  # of the latest answer
    queries: Mapping[str, str | None] = field(default_factory=dict)  # camera -> standing question
    last_kept: tuple[int, int] = (0, 0)  # visual tokens kept / total of the latest answer
    stats: Mapping[str, Any] = field(default_factory=dict)  # InferenceWorker.stats()
    latency: Mapping[str, tuple[float, float, int]] = field(default_factory=dict)  # stage -> (p50, p95, count)


def snapshot(worker: Any, cameras: Sequence[str]) -> WorkerSnapshot:
    """Read ``worker`` (an :class:`~atp_ros.ros.worker.InferenceWorker`) for one status."""
    return WorkerSnapshot(
        running=worker.running,
        recent=worker.problems.recent(RECENT_PROBLEM_S),
        notes=list(worker.notes),
        queries={c: worker.query(c) for c in cameras},
        last_kept=worker.last_kept,
        stats=worker.stats(),
        latency=worker.latency.summary(),
    )


def status(
    state: str,
    worker: WorkerSnapshot | None,
    start_error: str = "",
    facts: Mapping[str, Any] | None = None,
    base: Mapping[str, str] | None = None,
) -> tuple[int, str, dict[str, str]]:
    """``(level, message, values)`` of the node in lifecycle ``state``.

    ``worker`` is None while the node has no worker (unconfigured, or configure failed with
    ``start_error``); ``facts`` are the backend's ``device``, ``dtype``, ``load_notes``; ``base``
    values come first (model, version, memory...).
    """
    facts = facts or {}
    values = dict(base or {})
    if worker is None:
        level = ERROR if start_error else OK
        return level, (f"configure failed: {start_error}" if start_error else state), values
    level, message = _level(state, worker)
    values |= {
        "device": str(facts.get("device", "")),
        "dtype": str(facts.get("dtype", "")).removeprefix("torch."),
        "query": " | ".join(f"{c}: {q}" if c else q for c, q in worker.queries.items() if q),
        "visual_tokens_kept": str(worker.last_kept[0]),
        "visual_tokens_total": str(worker.last_kept[1]),
        "load_notes": " | ".join(facts.get("load_notes", [])),
        "notes": " | ".join(worker.notes),
        "worker_running": str(worker.running).lower(),
    }
    values |= {k: f"{v:.0f}" if isinstance(v, float) else str(v) for k, v in worker.stats.items()}
    for stage, (p50, p95, _count) in sorted(worker.latency.items()):
        values[f"{stage}_ms_p50"] = f"{p50:.2f}"
        values[f"{stage}_ms_p95"] = f"{p95:.2f}"
    values |= cuda_memory(facts.get("device"))
    return level, message, values


def _level(state: str, worker: WorkerSnapshot) -> tuple[int, str]:
    """The most urgent thing to say: a dead thread, a recent problem, a note, else what it is doing."""
    if state == "active" and not worker.running:
        return ERROR, "the inference thread is not running: no frame or ask is answered"
    if worker.recent:
        worst = max(worker.recent.values(), key=lambda p: p.level)
        return worst.level, worst.message
    if worker.notes:  # answering, but not the way the parameters asked (e.g. CLS-only without text tower)
        return WARN, worker.notes[0]
    if state != "active":
        return OK, state
    if not any(worker.queries.values()):
        return OK, "waiting for a query"
    return OK, "answering"


def rss_mb() -> float:
    """Resident memory of this process in MB (2**20 bytes)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: peak RSS is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cuda_memory(device: Any) -> dict[str, str]:
    """Allocated and reserved CUDA memory of ``device`` in MB; empty unless it is a CUDA device."""
    if getattr(device, "type", "") != "cuda":
        return {}
    import torch

    return {
        "cuda_allocated_mb": f"{torch.cuda.memory_allocated(device) / 2**20:.0f}",
        "cuda_reserved_mb": f"{torch.cuda.memory_reserved(device) / 2**20:.0f}",
    }
