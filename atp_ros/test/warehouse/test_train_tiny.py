"""`train_tiny --quick`: the real training code end to end on tiny counts (CI never trains the real model)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
from ament_index_python.packages import get_package_prefix
from atp_ros.backends import AtpConfig, load_backend
from atp_ros.warehouse.scenes import render_scene

TRAIN = Path(get_package_prefix("atp_ros")) / "lib" / "atp_ros" / "train_tiny"


def test_quick_training_saves_a_loadable_llava_and_resumes(tmp_path: Path) -> None:
    out, work = tmp_path / "model", tmp_path / "work"
    cmd = [str(TRAIN), "--quick", "--out", str(out), "--work", str(work)]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]
    assert {e["phase"] for e in log} == {"clip", "llava"}
    assert (out / "learning_curve.png").stat().st_size > 0
    assert (out / "atp_text_tower" / "model.safetensors").is_file()
    # The same loading path as any LLaVA, with both ATP signals (its own text tower).
    be = load_backend(str(out), device="cpu")
    res = be.answer([render_scene(1, 240, 320).rgb], "what is the gripper holding?", AtpConfig(keep_ratio=0.25))
    assert be.grid == (12, 12) and res.visual_tokens_kept == [36] and res.alpha_used == 0.5
    assert res.selection.s_inter is not None and np.isfinite(res.selection.s_inter.numpy()).all()
    # A second run finds the finished state and does not train again.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len((work / "train_log.jsonl").read_text().splitlines()) == len(log)
