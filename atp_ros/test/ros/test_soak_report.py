"""The soak's figures and PASS/FAIL targets from a synthetic recording (no node, no DDS)."""

from __future__ import annotations

from pathlib import Path

import pytest
from atp_ros.ros.soak import Record, diag_sample, parse_args
from atp_ros.ros.soak_report import analyse, pending, write_markdown


def _recording(rss_end: float) -> tuple[Record, dict]:
    """60 s at 10 frames/s received, 2 processed per second (500 ms each), the rest dropped."""
    record = Record(sent=600)
    for t in range(61):
        values = {"frames_received": str(10 * t), "frames_processed": str(2 * t), "frames_dropped": str(8 * t)}
        values |= {"memory_rss_mb": str(100 + (rss_end - 100) * t / 60), "lifecycle_state": "active"}
        record.diagnostics.append(diag_sample(float(t), values, 0, "answering"))
        record.proc_rss.append((float(t), 100 + (rss_end - 100) * t / 60))
    record.answers = [(t / 2, 600.0, 500.0, "q") for t in range(120)]
    idle = dict(record.diagnostics[-1], pending=0, reached=True)
    ended = {"stream_s": 60.0, "died_at_s": None, "alive_before_sigint": True, "exit_code": 0, "aborted": ""}
    return record, ended | {"exit_s": 0.3, "idle": idle}


def test_a_steady_node_passes_every_target(tmp_path: Path) -> None:
    args = parse_args(["--minutes", "1", "--warmup-s", "20", "--window-s", "20"])
    record, ended = _recording(rss_end=101.0)
    fig = analyse(args, record, ended)
    assert fig["answers_per_window"] == [40, 40, 40]
    assert fig["processed_per_s_steady"] == pytest.approx(2.0) and fig["busy_mean"] == pytest.approx(1.0)
    assert {name: t["pass"] for name, t in fig["targets"].items()} == dict.fromkeys(fig["targets"], True)
    write_markdown(tmp_path / "soak.md", fig)
    assert "**PASS**" in (tmp_path / "soak.md").read_text()


def test_memory_growth_and_unaccounted_frames_fail() -> None:
    args = parse_args(["--minutes", "1", "--warmup-s", "20", "--window-s", "20"])
    record, ended = _recording(rss_end=130.0)
    ended["idle"]["pending"] = 5
    targets = analyse(args, record, ended)["targets"]
    assert not targets["memory"]["pass"] and not targets["counters"]["pass"] and targets["answers"]["pass"]
    assert pending({"frames_received": 10, "frames_processed": 4, "frames_dropped": 3, "errors.decode": 1}) == 2
