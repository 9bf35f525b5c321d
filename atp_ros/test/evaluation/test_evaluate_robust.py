"""``evaluate`` never ends a run on bad input or Ctrl-C: malformed dataset records, decompression
bombs and unusable ground-truth lines are counted problems; runs sharing an ``--out`` write their
own temp files; Ctrl-C during the overlays or the report writing still leaves a whole report."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import threading
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from atp_ros.backends import STAGES
from atp_ros.evaluation import report
from atp_ros.evaluation.cli import main
from atp_ros.evaluation.files import write_atomic
from atp_ros.evaluation.sources import read_bag, read_dataset
from atp_ros.evaluation.sweep import Cache, Setting
from atp_ros.method import KEEP_ALL
from atp_ros.warehouse.cli import write_bag


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)


def _png_declaring(width: int, height: int) -> bytes:
    """A few dozen bytes of PNG whose header declares ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture
def gqa(tmp_path: Path) -> Path:
    """A GQA-style dataset: two good questions, malformed entries and a decompression bomb."""
    root = tmp_path / "gqa"
    (root / "images").mkdir(parents=True)
    for name, seed in (("a", 1), ("b", 2)):
        cv2.imwrite(str(root / "images" / f"{name}.png"), _rgb(seed))
    (root / "images" / "bomb.png").write_bytes(_png_declaring(30000, 30000))  # beyond Pillow's own limit
    questions = {
        "1": {"imageId": "a", "question": "Is it red?", "answer": "no"},
        "2": "what a string",  # an entry that is no map
        "3": {"imageId": "bomb", "question": "Is it big?", "answer": "yes"},
        "4": {"imageId": ["a"], "question": "Is it red?"},  # a list as image id: not found
        "5": {"imageId": "b", "question": ["not", "a", "string"]},
        "6": {"imageId": "b", "question": "Is it blue?", "answer": "yes"},
    }
    (root / "testdev_questions.json").write_text(json.dumps(questions))
    return root


def test_malformed_gqa_records_and_a_bomb_are_counted(gqa: Path) -> None:
    loaded = read_dataset(gqa)
    assert [s.key for s in loaded.samples] == ["1", "6"]
    counts = loaded.problems.counts()
    assert counts["record"] == 2 and counts["too_large"] == 1 and counts["image"] == 1, counts


def test_malformed_vqa_records_are_counted(tmp_path: Path) -> None:
    root = tmp_path / "vqa"
    (root / "images").mkdir(parents=True)
    for i in (1, 2, 3, 4):
        cv2.imwrite(str(root / "images" / f"COCO_val2014_{i:012d}.jpg"), _rgb(i))
    questions = [
        {"image_id": 1, "question": "What color?", "question_id": 10},
        "what color is the box?",  # a question as a string
        {"image_id": 2, "question": "Is it open?", "question_id": 20},  # its annotation: "answers": "yes"
        {"image_id": 3, "question": "How many?", "question_id": [30]},  # a list as question_id
        {"image_id": 4, "question": "Which side?", "question_id": 40},
    ]
    notes = [
        {"question_id": 10, "answers": [{"answer": "red"}]},
        {"question_id": 20, "answers": "yes"},
        {"question_id": [30], "answers": [{"answer": "3"}]},
        "not an annotation",
        {"question_id": 40, "answers": [{"answer": "left"}]},
    ]
    (root / "v2_questions_val.json").write_text(json.dumps({"questions": questions}))
    (root / "v2_annotations_val.json").write_text(json.dumps({"annotations": notes}))
    loaded = read_dataset(root)
    assert [(s.key, s.answers) for s in loaded.samples] == [("10", ("red",)), ("40", ("left",))]
    assert loaded.problems.counts()["record"] == 5  # 2 annotations + 3 questions


def test_an_infinite_stamp_in_the_ground_truth_is_counted(tmp_path: Path) -> None:
    bag = tmp_path / "bag"
    write_bag(bag, "test", 3, 0, 10.0, (48, 64), 2)
    truth = bag / "ground_truth.jsonl"
    truth.write_text(truth.read_text() + '{"stamp": Infinity, "answers": ["yes"]}\n{"stamp": [1]}\n"text"\n')
    loaded = read_bag(bag, "/camera/image_raw", "/atp_vlm/query")
    assert len(loaded.samples) == 3 and all(s.answers for s in loaded.samples)
    assert loaded.problems.counts()["truth"] == 3


def test_writers_sharing_a_cache_never_collide(tmp_path: Path) -> None:
    cache, setting, errors = Cache(tmp_path / "cache", {"model": "m"}), Setting(KEEP_ALL), []

    def put(n: int) -> None:
        try:
            for i in range(30):
                cache.put(setting, {"records": [{"i": i, "n": n, "ms": dict.fromkeys(STAGES, 1.0)}], "memory": {}})
        except Exception as err:  # the shared "<key>.tmp" of old: FileNotFoundError on the rename
            errors.append(err)

    threads = [threading.Thread(target=put, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert cache.get(setting) is not None and not list((tmp_path / "cache").glob("*.tmp"))


def test_an_interrupted_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "report.md"
    write_atomic(path, "old")

    def cut_short(tmp: Path) -> None:
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, cut_short)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


def _evaluate(gqa: Path, out: Path, capsys) -> tuple[int, str, str]:
    argv = ["--dataset", gqa, "--out", out, "--keep-ratios", "0.25", "--alphas", "1", "--selectors", "atp"]
    argv += ["--model", "warehouse-tiny"]  # the CLI's default is warehouse-cell
    code = main([str(a) for a in [*argv, "--bootstrap", "10"]])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _whole_report(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["settings"]] == ["full", "atp a=1 k=0.25"]
    assert "Recommended operating point" in (out / "report.md").read_text()
    assert len((out / "results.csv").read_text().splitlines()) == 3
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    return results


def test_bad_records_are_input_problems_of_a_run(gqa: Path, tmp_path: Path, capsys) -> None:
    code, stdout, err = _evaluate(gqa, tmp_path / "out", capsys)
    assert code == 0, stdout + err
    assert "2 samples" in stdout and "input problem" in stdout and "Traceback" not in err
    assert len(_whole_report(tmp_path / "out")["meta"]["input_problems"]) == 3


def test_ctrl_c_during_the_overlays_writes_the_report(gqa: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    def interrupted(*args, **kwargs) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "overlay_grid", interrupted)
    code, stdout, _ = _evaluate(gqa, tmp_path / "out", capsys)
    assert code == 130 and "interrupted" in stdout
    _whole_report(tmp_path / "out")


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_ctrl_c_during_the_report_writing_finishes_it(gqa: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    markdown = report._markdown

    def ctrl_c_midway(*args) -> str:  # Ctrl-C arrives while the report is being written
        os.kill(os.getpid(), signal.SIGINT)
        return markdown(*args)

    monkeypatch.setattr(report, "_markdown", ctrl_c_midway)
    out = tmp_path / "out"
    code, stdout, _ = _evaluate(gqa, out, capsys)
    assert code == 130 and "interrupted" in stdout
    _whole_report(out)
    shutil.rmtree(out / "cache")
