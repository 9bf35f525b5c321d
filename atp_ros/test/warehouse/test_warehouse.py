"""The synthetic warehouse: scenes, questions, evidence, and the `warehouse` CLI (installed console script)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from ament_index_python.packages import get_package_prefix
from atp_ros.warehouse.scenes import (
    COUNT_WORDS,
    KINDS,
    SPLIT_SIZE,
    SPLITS,
    STANDING_KINDS,
    answer_vocabulary,
    captions_for_scene,
    evidence_mask,
    question_words,
    questions_for_scene,
    render_scene,
    split_seed,
    standing_question,
)
from hypothesis import given, settings
from hypothesis import strategies as st

WAREHOUSE = Path(get_package_prefix("atp_ros")) / "lib" / "atp_ros" / "warehouse"


def test_scene_is_deterministic_per_seed_and_varies_across_seeds() -> None:
    a, b, c = render_scene(7, 192, 256), render_scene(7, 192, 256), render_scene(8, 192, 256)
    assert a.rgb.dtype == np.uint8 and a.rgb.shape == (192, 256, 3)
    assert np.array_equal(a.rgb, b.rgb) and a.objects == b.objects
    assert not np.array_equal(a.rgb, c.rgb)


def test_same_scene_at_any_size() -> None:
    small, large = render_scene(3, 120, 160), render_scene(3, 480, 640)
    assert small.objects == large.objects  # normalized layout: the annotations do not depend on size
    assert small.holding == large.holding and small.aisle_clear == large.aisle_clear


def test_splits_are_disjoint_seed_ranges() -> None:
    ranges = sorted((start, start + SPLIT_SIZE) for start in SPLITS.values())
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(ranges))
    assert split_seed("test", 0) == SPLITS["test"]
    with pytest.raises(ValueError, match="unknown split"):
        split_seed("holdout", 0)
    with pytest.raises(ValueError, match="offset"):
        split_seed("train", SPLIT_SIZE)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), size=st.sampled_from([(96, 128), (192, 192), (336, 336)]))
def test_questions_have_closed_answers_and_evidence_inside_the_frame(seed: int, size: tuple[int, int]) -> None:
    scene = render_scene(seed, *size)
    qs = questions_for_scene(scene, np.random.default_rng(seed), count=12)
    assert qs, "every scene has something to ask (gripper, aisle)"
    vocab, words = set(answer_vocabulary()), set(question_words())
    for q in qs:
        assert q.kind in KINDS and q.answer in vocab
        assert set(q.question.replace("?", " ").split()) <= words
        for x0, y0, x1, y1 in q.evidence:
            assert 0 <= x0 < x1 <= size[1] and 0 <= y0 < y1 <= size[0]
    for sentence, boxes in captions_for_scene(scene, np.random.default_rng(seed), facts=4):
        assert set(sentence.split()) <= words and boxes


def test_answers_match_what_is_drawn() -> None:
    """Ground truth is tied to the pixels: the evidence box of a color question has that color."""
    from atp_ros.warehouse.scenes import COLORS

    checked = 0
    for seed in range(20):
        scene = render_scene(seed, 240, 320)
        for q in questions_for_scene(scene, np.random.default_rng(seed), count=8, kinds=("color_at",)):
            x0, y0, x1, y1 = q.evidence[0]
            patch = scene.rgb[(y0 + y1) // 2 + 2 : y1 - 2, x0 + 2 : x1 - 2].reshape(-1, 3).astype(float)
            median = np.median(patch, axis=0)
            nearest = min(COLORS, key=lambda c: np.linalg.norm(np.array(COLORS[c]) / 255 - median / median.max()))
            checked += nearest == q.answer
    assert checked >= 15


def test_standing_questions_answer_every_scene() -> None:
    vocabulary = set(answer_vocabulary())
    for seed in range(10):
        scene = render_scene(seed, 96, 128)
        reds = [o for o in scene.shelf_objects if o.color == "red"]
        for kind in STANDING_KINDS:
            q = standing_question(scene, kind, color="red", object_kind="box")
            if q is None:  # only a count past the answer words ("five") has no answer
                assert kind == "count" and len(reds) >= len(COUNT_WORDS), (seed, kind)
                continue
            assert q.kind == kind and q.answer in vocabulary, (seed, q)
            red_boxes = [o for o in reds if o.kind == "box"]
            if kind == "count":
                assert q.answer == COUNT_WORDS[len(reds)] and len(q.evidence) == len(reds)
            elif kind == "exists":
                assert q.answer == ("yes" if red_boxes else "no") and len(q.evidence) == len(red_boxes)
            else:  # gripper, aisle: the evidence is where to look
                assert len(q.evidence) >= 1
    gripper = standing_question(render_scene(1, 96, 128), "gripper")
    assert gripper.answer == render_scene(1, 96, 128).holding
    with pytest.raises(ValueError):
        standing_question(render_scene(1, 96, 128), "color_at")


def test_evidence_mask() -> None:
    m = evidence_mask([(0, 0, 32, 16)], (192, 192), (12, 12))  # two full patches
    assert m.sum() == 2 and m[0, 0] and m[0, 1]
    tiny = evidence_mask([(20, 20, 22, 22)], (192, 192), (12, 12))  # too small to cover 25%: its best patch
    assert tiny.sum() == 1 and tiny[1, 1]
    assert not evidence_mask([], (192, 192), (12, 12)).any()


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(WAREHOUSE), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_generate_cli_writes_images_and_samples(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    flat = ("--world", "flat", "--size", "96")
    proc = _run("generate", *flat, "--split", "test", "--count", "3", "--seed", "5", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6  # 2 questions per image by default
    for r in rows:
        assert set(r) == {"image", "question", "answer", "answers", "kind", "evidence", "seed"}
        assert (out / r["image"]).is_file() and r["answer"] in r["answers"]
        assert SPLITS["test"] + 5 <= r["seed"] < SPLITS["test"] + 8
    again = tmp_path / "again"
    assert _run("generate", *flat, "--count", "3", "--seed", "5", "--out", str(again), cwd=tmp_path).returncode == 0
    assert (again / "samples.jsonl").read_text() == (out / "samples.jsonl").read_text()


def test_bag_cli_writes_a_readable_rosbag_with_truth_keyed_by_stamp(tmp_path: Path) -> None:
    from rosbags.highlevel import AnyReader

    bag = tmp_path / "bag"
    proc = _run(
        "bag",
        "--world",
        "flat",
        "--count",
        "7",
        "--rate",
        "10",
        "--out",
        str(bag),
        "--size",
        "64x48",
        "--question-every",
        "3",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    truth = {
        json.loads(line)["stamp"]: json.loads(line) for line in (bag / "ground_truth.jsonl").read_text().splitlines()
    }
    images, queries = [], []
    with AnyReader([bag]) as reader:
        assert {c.topic: c.msgtype for c in reader.connections} == {
            "/camera/image_raw": "sensor_msgs/msg/Image",
            "/atp_vlm/query": "std_msgs/msg/String",
        }
        for conn, t, raw in reader.messages():
            msg = reader.deserialize(raw, conn.msgtype)
            (images if conn.topic == "/camera/image_raw" else queries).append((t, msg))
    assert len(images) == 7 and len(queries) == 3  # frames 0, 3, 6 start a new question
    for t, msg in images:
        stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        assert stamp == t and stamp in truth
        assert (msg.encoding, msg.height, msg.width, msg.step) == ("rgb8", 48, 64, 192)
    assert [t for t, _ in images] == sorted(truth)
    assert np.diff([t for t, _ in images]).tolist() == [100_000_000] * 6
    # The question in force for a frame is the latest one published before it.
    for t, _ in images:
        latest = max((q for q in queries if q[0] < t), key=lambda q: q[0])[1].data
        assert truth[t]["question"] == latest


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--out", "x", "--size", "big"], "size must be N or WIDTHxHEIGHT"),
        (["generate", "--out", "x", "--count", "0"], "--count must be at least 1"),
        (["bag", "--out", "x", "--rate", "0"], "--rate"),
        (["generate", "--out", "x", "--split", "holdout"], "invalid choice"),
    ],
)
def test_cli_errors_are_one_message(tmp_path: Path, args: list[str], message: str) -> None:
    proc = _run(*args, cwd=tmp_path)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


def test_bag_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "bag").mkdir()
    proc = _run("bag", "--world", "flat", "--count", "1", "--out", str(tmp_path / "bag"), cwd=tmp_path)
    assert proc.returncode == 1 and "exists" in proc.stderr and "Traceback" not in proc.stderr
