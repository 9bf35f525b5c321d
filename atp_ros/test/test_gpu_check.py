"""`make gpu-check` on a machine without CUDA: the skip path, and the stages' plumbing on tiny shapes on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path is for machines without CUDA")
def test_without_cuda_it_says_so_and_exits_0(tmp_path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device here" in proc.stdout and not list(tmp_path.iterdir())


def test_stages_run_on_tiny_shapes_and_write_results(tmp_path) -> None:
    """The realistic and memory stages end to end on the CPU: one line per stage, JSON per stage, summary."""
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--dtypes", "float32", "--rounds", "1",
           "--skip", "tests,node", "--out", str(out), "--work", str(work)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[gpu-check]")]
    assert [line.split(":")[0] for line in lines[1:]] == ["[gpu-check] realistic", "[gpu-check] memory"]
    realistic = json.loads((out / "realistic.json").read_text())["result"]
    assert set(realistic) == {"llava-1.5-7b float32", "qwen2-0.5b float32"}
    for row in realistic.values():
        assert set(row["variants"]) == {f"{v}, {n} new" for v in ("full", "atp 0.25", "atp 0.11") for n in (1, 16)}
        assert row["variants"]["full, 1 new"]["speedup_vs_full"] == 1.0
    assert "realistic: ok" in (out / "summary.md").read_text()


def test_a_bad_stage_name_is_one_line() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--skip", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown stage(s) nope" in proc.stderr and "Traceback" not in proc.stderr
