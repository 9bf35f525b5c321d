"""`make demo`'s camera: what it streams (flat stills, a live cell episode) and the pictures it saves."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from atp_ros.apps import demo
from atp_ros.ros.messages import image_msg

from atp_ros_msgs.msg import VlmAnswer


def test_flat_stream_rotates_standing_questions_with_truth() -> None:
    items = list(demo.flat_items(frames=6, question_every=2))
    assert len(items) == 6 and all(i.rgb.shape == (*demo.FRAME_SIZE, 3) for i in items)
    questions = [i.question for i in items]
    assert questions[0] == questions[1] != questions[2] == questions[3] != questions[4]
    assert all(i.answers for i in items)


def test_cell_stream_is_one_episode_with_a_truth_per_frame() -> None:
    pytest.importorskip("atp_ros.warehouse.cell.scene")  # MuJoCo (sim requirements)
    items = list(demo.live_items(episode=0, frames=8, rate=10.0, question_every=4))
    assert len(items) == 8 and all(i.rgb.shape == (*demo.FRAME_SIZE, 3) for i in items)
    assert all(i.question for i in items) and len({i.question for i in items[:4]}) == 1
    assert sum(bool(i.answers) for i in items) >= 6  # a standing question is determined on most frames
    # Continuous: consecutive frames differ a little, not like independent stills.
    diffs = [np.abs(a.rgb.astype(int) - b.rgb.astype(int)).mean() for a, b in itertools.pairwise(items)]
    assert max(diffs) < 20


def test_saved_pictures_show_each_answer(tmp_path) -> None:
    shots = []
    for i, ok in enumerate((True, False, True)):
        rgb = np.full((48, 64, 3), 40 * i, np.uint8)
        answer = VlmAnswer(query="is the aisle clear?", answer="yes", visual_tokens_kept=4, visual_tokens_total=16)
        shots.append(demo.Shot(answer, image_msg(rgb, 1_000 + i, "cam"), ("yes",) if ok else ("no",)))
    assert [s.verdict for s in shots] == ["ok", "truth: no", "ok"]
    files = demo.save_overlays(tmp_path, shots)
    assert [f.name for f in files] == ["overlays.png", "frame_strip.png", "stream.gif"]
    assert all(f.stat().st_size > 0 for f in files) and len(list(tmp_path.glob("overlay_*.png"))) == 3
    from PIL import Image

    with Image.open(tmp_path / "stream.gif") as gif:
        assert gif.n_frames == 3


def test_defaults_stream_the_cell_to_its_model() -> None:
    args = demo.parse_args([])
    assert (args.world, args.model) == ("cell", "warehouse-cell")
    assert demo.parse_args(["--world", "flat"]).model == "warehouse-tiny"
    assert demo.parse_args(["--world", "flat", "--model", "/ckpt"]).model == "/ckpt"


def test_recorded_episode_ships_with_truth_on_most_frames() -> None:
    items = list(demo.bag_items(demo.RECORDED_EPISODE, 60))
    assert len(items) == 60 and all(i.rgb.shape == (*demo.FRAME_SIZE, 3) for i in items)
    assert len({i.question for i in items}) >= 4 and all(i.question for i in items)  # standing questions change
    assert sum(bool(i.answers) for i in items) >= 50


def test_demo_replays_the_recorded_episode_where_the_cell_cannot_render(tmp_path) -> None:
    """`make demo`'s command on a machine where MuJoCo cannot render: the shipped episode into the node over DDS."""
    env = {**os.environ, "MUJOCO_GL": "nope"}  # an invalid GL backend fails like a machine without EGL/OSMesa
    cmd = [sys.executable, "-m", "atp_ros.apps.demo", "--frames", "10", "--rate", "5", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out = re.sub(r"\s+", " ", proc.stdout)  # rich wraps long lines
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "replaying the recorded test episode" in out and "model: warehouse-cell" in out
    answered = re.search(r"(\d+)/10 frames answered", out)
    assert answered and int(answered.group(1)) >= 1, out
    assert (tmp_path / "overlays.png").is_file() and "Traceback" not in proc.stderr
