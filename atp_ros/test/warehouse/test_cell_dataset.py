"""`warehouse generate/bag --world cell` through the installed CLI; bags read back with rosbags."""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from ament_index_python.packages import get_package_prefix

pytest.importorskip("atp_ros.warehouse.cell.scene")  # sets MUJOCO_GL (egl) before MuJoCo loads
from atp_ros.warehouse.cell.grammar import phrasings
from atp_ros.warehouse.cell.questions import ANSWERS
from atp_ros.warehouse.scenes import SPLITS
from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_typestore

WAREHOUSE = Path(get_package_prefix("atp_ros")) / "lib" / "atp_ros" / "warehouse"  # the installed CLI
CONTRACT = {"image", "question", "answer", "answers", "kind", "evidence", "seed", "slots"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(WAREHOUSE), *args], capture_output=True, text=True, timeout=300)


def test_generate_writes_the_data_contract_and_is_deterministic(tmp_path) -> None:
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        # The contract's command as written (the cell is the default world).
        proc = _run("generate", "--split", "test", "--count", "3", "--seed", "5", "--out", str(out),
                    "--size", "336", "--held-out-only")  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (outs[0] / "samples.jsonl").read_text().splitlines()]
    assert rows and (outs[0] / "samples.jsonl").read_text() == (outs[1] / "samples.jsonl").read_text()
    held_out = {k: set(phrasings(k, "test", held_out_only=True)) for k in {r["kind"] for r in rows}}
    for row in rows:
        assert set(row) == CONTRACT and row["answer"] in ANSWERS and row["answer"] == row["answers"][0]
        assert (outs[0] / row["image"]).is_file() and json.loads(json.dumps(row["slots"])) == row["slots"]
        assert held_out[row["kind"]], row["kind"]
        for x0, y0, x1, y1 in row["evidence"]:
            assert 0 <= x0 < x1 <= 336 and 0 <= y0 < y1 <= 336


def test_bag_records_an_episode_with_standing_questions_and_truth_per_frame(tmp_path) -> None:
    bag = tmp_path / "bag"
    proc = _run("bag", "--world", "cell", "--count", "25", "--rate", "10", "--size", "320x240", "--question-every",
                "10", "--out", str(bag))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    truth = [json.loads(line) for line in (bag / "ground_truth.jsonl").read_text().splitlines()]
    assert [t["frame"] for t in truth] == list(range(25))
    images, queries = [], []
    with AnyReader([bag], default_typestore=get_typestore(Stores.ROS2_HUMBLE)) as reader:
        for conn, _, raw in reader.messages():
            msg = reader.deserialize(raw, conn.msgtype)
            if conn.topic == "/camera/image_raw":
                rgb = np.frombuffer(msg.data, np.uint8).reshape(msg.height, msg.width, 3)
                images.append((msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec, rgb))
            else:
                queries.append(msg.data)
    assert [s for s, _ in images] == [t["stamp"] for t in truth]
    assert images[0][1].shape == (240, 320, 3)
    assert 1 <= len(queries) <= 3 and {t["question"] for t in truth} <= set(queries)
    answered = [t for t in truth if t["answer"]]
    assert answered and all(t["answer"] in ANSWERS for t in answered)
    # a continuous episode: consecutive frames differ a little, not like independent stills
    diffs = [np.abs(a[1].astype(int) - b[1].astype(int)).mean() for a, b in itertools.pairwise(images)]
    assert max(diffs) < 20, diffs


def test_bad_arguments_are_one_line(tmp_path) -> None:
    proc = _run("generate", "--world", "flat", "--held-out-only", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "--held-out-only goes with --world cell" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_split_the_cli_offers_generates(tmp_path) -> None:
    # --split validation is offered by the CLI; the cell's questions must accept it too (not only "val").
    out = tmp_path / "val"
    proc = _run(
        "generate", "--split", "validation", "--count", "1", "--seed", "3", "--size", "160x120", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert rows and all(row["seed"] == SPLITS["validation"] + 3 for row in rows)


def test_jpeg_bag_holds_compressed_frames_close_to_the_raw_ones(tmp_path) -> None:
    from atp_ros.evaluation.sources import read_bag

    raw, jpeg = tmp_path / "raw", tmp_path / "jpeg"
    common = ("--count", "6", "--rate", "10", "--size", "320x240", "--question-every", "3")
    assert _run("bag", *common, "--out", str(raw)).returncode == 0
    proc = _run("bag", *common, "--jpeg", "90", "--out", str(jpeg))
    assert proc.returncode == 0, proc.stderr
    with AnyReader([jpeg], default_typestore=get_typestore(Stores.ROS2_HUMBLE)) as reader:
        topics = {c.topic: c.msgtype for c in reader.connections}
    assert topics["/camera/image_raw/compressed"] == "sensor_msgs/msg/CompressedImage"
    assert "/camera/image_raw" not in topics
    a = read_bag(raw, "/camera/image_raw", "/atp_vlm/query").samples
    b = read_bag(jpeg, "/camera/image_raw/compressed", "/atp_vlm/query").samples
    assert [s.key for s in a] == [s.key for s in b] and [s.answers for s in a] == [s.answers for s in b]
    for x, y in zip(a, b, strict=True):  # same pixels up to JPEG loss, colors in the same channel order
        assert x.image.shape == y.image.shape == (240, 320, 3)
        loss = np.abs(x.image.astype(int) - y.image.astype(int)).mean()
        swapped = np.abs(x.image[..., ::-1].astype(int) - y.image.astype(int)).mean()
        assert loss < 8 and loss < swapped / 2, (loss, swapped)
    bad = _run("bag", *common, "--jpeg", "101", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "--jpeg must be" in bad.stderr and "Traceback" not in bad.stderr
