"""The node's /diagnostics status as a pure function of the worker's statistics (no ROS, no DDS)."""

from __future__ import annotations

import time

from atp_ros.problems import ERROR, OK, WARN, Problem
from atp_ros.ros.diagnostics import WorkerSnapshot, status


def _worker(**fields) -> WorkerSnapshot:
    return WorkerSnapshot(**({"running": True, "queries": {"": "is the aisle clear?"}} | fields))


def test_without_a_worker_the_state_or_the_configure_error_is_the_message() -> None:
    assert status("unconfigured", None, base={"model_id": "m"}) == (OK, "unconfigured", {"model_id": "m"})
    level, message, _ = status("unconfigured", None, start_error="no such model")
    assert (level, message) == (ERROR, "configure failed: no such model")


def test_the_most_urgent_condition_wins() -> None:
    problem = Problem(WARN, "frame skipped: bad encoding", time.monotonic(), 1, "frame skipped: bad encoding")
    assert status("active", _worker(running=False, recent={"encoding": problem}))[:2] == (
        ERROR,
        "the inference thread is not running: no frame or ask is answered",
    )
    assert status("active", _worker(recent={"encoding": problem}, notes=["CLS only"]))[:2] == (WARN, problem.message)
    assert status("active", _worker(notes=["CLS only"]))[:2] == (WARN, "CLS only")
    assert status("inactive", _worker())[:2] == (OK, "inactive")
    assert status("active", _worker(queries={"": None}))[:2] == (OK, "waiting for a query")
    assert status("active", _worker())[:2] == (OK, "answering")


def test_values_carry_counters_percentiles_and_queries_as_text() -> None:
    worker = _worker(
        queries={"front": "how many red boxes?", "wrist": None},
        last_kept=(36, 144),
        stats={"frames_received": 12, "in_flight_ms": 3.7},
        latency={"total": (101.234, 150.0, 10)},
    )
    _, _, values = status("active", worker, facts={"device": "cpu", "dtype": "torch.float32"}, base={"a": "b"})
    assert values["a"] == "b" and values["device"] == "cpu" and values["dtype"] == "float32"
    assert values["query"] == "front: how many red boxes?"
    assert (values["visual_tokens_kept"], values["visual_tokens_total"]) == ("36", "144")
    assert values["frames_received"] == "12" and values["in_flight_ms"] == "4"
    assert (values["total_ms_p50"], values["total_ms_p95"]) == ("101.23", "150.00")
    assert values["worker_running"] == "true" and "cuda_allocated_mb" not in values
