"""The ``evaluate`` command: bag and dataset readers on files written by real tools (rosbags, the
warehouse writer), metrics on hand-checked cases, perturbations, the offline sweep with its report
and cache through ``main``, bad inputs, and one short live replay through the node over DDS."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from atp_ros.evaluation import metrics
from atp_ros.evaluation.cli import main
from atp_ros.evaluation.perturb import IMAGE_CORRUPTIONS, corrupt, perturb_question
from atp_ros.evaluation.sources import SourceError, read_bag, read_dataset
from atp_ros.warehouse.cli import generate, write_bag
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

TS = get_typestore(Stores.ROS2_HUMBLE)
Img, CImg, Str = (
    TS.types[t] for t in ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage", "std_msgs/msg/String")
)
Header, Time = TS.types["std_msgs/msg/Header"], TS.types["builtin_interfaces/msg/Time"]


def header(stamp_ns: int):
    return Header(stamp=Time(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9), frame_id="cam")


def raw_image(stamp_ns: int, rgb: np.ndarray, encoding: str = "rgb8"):
    h, w = rgb.shape[:2]
    return Img(
        header=header(stamp_ns), height=h, width=w, encoding=encoding, is_bigendian=0, step=w * 3, data=rgb.reshape(-1)
    )


def jpeg(stamp_ns: int, rgb: np.ndarray | None):
    data = (
        cv2.imencode(".jpg", rgb[:, :, ::-1])[1].reshape(-1)
        if rgb is not None
        else np.frombuffer(b"\xff\xd8junk", np.uint8)
    )
    return CImg(header=header(stamp_ns), format="jpeg", data=data)


def rgb(seed: int, h: int = 24, w: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def warehouse_bag(tmp_path_factory) -> Path:
    bag = tmp_path_factory.mktemp("bags") / "warehouse"
    write_bag(bag, "test", 8, 0, 10.0, (240, 320), 4)
    return bag


# ---------------------------------------------------------------- readers


def test_warehouse_bag_pairs_frames_with_questions_and_truth(warehouse_bag: Path) -> None:
    loaded = read_bag(warehouse_bag, "/camera/image_raw", "/atp_vlm/query")
    truth = [json.loads(line) for line in (warehouse_bag / "ground_truth.jsonl").read_text().splitlines()]
    assert [s.stamp_ns for s in loaded.samples] == [t["stamp"] for t in truth]
    for sample, t in zip(loaded.samples, truth, strict=True):
        assert sample.question == t["question"] and list(sample.answers) == t["answers"]
        assert sample.image.shape == (240, 320, 3) and sample.key == str(t["stamp"])
    assert not loaded.problems.counts()
    assert len(read_bag(warehouse_bag, "/camera/image_raw", "/atp_vlm/query", limit=3).samples) == 3


def test_sqlite3_compressed_bag_skips_bad_messages_with_one_cause_each(tmp_path: Path) -> None:
    bag = tmp_path / "sqlite"
    with Writer(bag, version=9, storage_plugin=StoragePlugin.SQLITE3) as w:
        img = w.add_connection("/cam/compressed", CImg.__msgtype__, typestore=TS)
        qc = w.add_connection("/ask", Str.__msgtype__, typestore=TS)
        w.write(img, 1, TS.serialize_cdr(jpeg(10, rgb(0)), CImg.__msgtype__))  # before any question
        w.write(qc, 2, TS.serialize_cdr(Str(data="is the aisle empty?"), Str.__msgtype__))
        w.write(img, 3, TS.serialize_cdr(jpeg(30, rgb(1)), CImg.__msgtype__))
        w.write(img, 4, TS.serialize_cdr(jpeg(40, None), CImg.__msgtype__))  # not a JPEG
        w.write(qc, 5, TS.serialize_cdr(Str(data="how many cones?"), Str.__msgtype__))
        w.write(img, 6, TS.serialize_cdr(jpeg(60, rgb(2)), CImg.__msgtype__))
        w.write(img, 7, b"\x00\x01\x00")  # truncated CDR
    loaded = read_bag(bag, "/cam/compressed", "/ask")
    assert [(s.stamp_ns, s.question) for s in loaded.samples] == [(30, "is the aisle empty?"), (60, "how many cones?")]
    assert loaded.samples[0].answers == ()  # no ground truth: fidelity only
    assert dict(loaded.problems.counts()) == {"no_question": 1, "corrupt": 2}
    assert "CompressedImage" in loaded.description


def test_repeated_stamps_and_malformed_truth_are_counted_not_fatal(tmp_path: Path) -> None:
    bag = tmp_path / "unset_clock"
    with Writer(bag, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        ic = w.add_connection("/image", Img.__msgtype__, typestore=TS)
        qc = w.add_connection("/q", Str.__msgtype__, typestore=TS)
        w.write(qc, 1, TS.serialize_cdr(Str(data="is the aisle empty?"), Str.__msgtype__))
        for i in range(3):  # a camera without a clock: every stamp 0
            w.write(ic, 2 + i, TS.serialize_cdr(raw_image(0, rgb(i)), Img.__msgtype__))
    truth = tmp_path / "truth.jsonl"
    truth.write_text(json.dumps({"stamp": 0, "answers": ["yes"], "evidence": [[1, 2, 3]]}) + "\n")
    loaded = read_bag(bag, "/image", "/q", truth)
    assert [s.key for s in loaded.samples] == ["0", "0#2", "0#3"]  # told apart by order
    assert all(s.answers == () for s in loaded.samples)  # a 3-number box: truth unusable, fidelity only
    assert loaded.problems.counts()["duplicate_stamp"] == 2 and loaded.problems.counts()["truth"] == 3
    assert metrics.accuracy("forklift", ["lift truck", "forklift"]) == 1.0  # synonyms: exact match, not 1/6


def test_ros1_bag_and_unknown_encoding(tmp_path: Path) -> None:
    from rosbags.rosbag1 import Writer as Writer1

    ts1 = get_typestore(Stores.ROS1_NOETIC)
    I1, S1, H1, T1 = (
        ts1.types[t]
        for t in ("sensor_msgs/msg/Image", "std_msgs/msg/String", "std_msgs/msg/Header", "builtin_interfaces/msg/Time")
    )
    bag = tmp_path / "old.bag"
    with Writer1(bag) as w:
        ic = w.add_connection("/image", I1.__msgtype__, typestore=ts1)
        qc = w.add_connection("/q", S1.__msgtype__, typestore=ts1)
        w.write(qc, 1, ts1.serialize_ros1(S1(data="is there a pallet?"), S1.__msgtype__))
        for i, enc in enumerate(("rgb8", "weird8", "bgr8")):
            pix = rgb(i)
            msg = I1(
                header=H1(seq=i, stamp=T1(sec=5, nanosec=i), frame_id="c"),
                height=24,
                width=32,
                encoding=enc,
                is_bigendian=0,
                step=96,
                data=pix.reshape(-1),
            )
            w.write(ic, 2 + i, ts1.serialize_ros1(msg, I1.__msgtype__))
    loaded = read_bag(bag, "/image", "/q")
    assert [s.key for s in loaded.samples] == [str(5 * 10**9), str(5 * 10**9 + 2)]
    assert np.array_equal(loaded.samples[0].image, rgb(0)) and np.array_equal(
        loaded.samples[1].image, rgb(2)[:, :, ::-1]
    )
    assert dict(loaded.problems.counts()) == {"encoding": 1}


def test_bag_errors_say_what_is_wrong(tmp_path: Path, warehouse_bag: Path) -> None:
    with pytest.raises(SourceError, match=r"no topic '/nope'.*/camera/image_raw"):
        read_bag(warehouse_bag, "/nope", "/atp_vlm/query")
    with pytest.raises(SourceError, match="not an Image"):
        read_bag(warehouse_bag, "/atp_vlm/query", "/atp_vlm/query")
    with pytest.raises(SourceError, match="no such bag"):
        read_bag(tmp_path / "missing", "/camera/image_raw", "/q")
    only_questions = tmp_path / "only_questions"
    with Writer(only_questions, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        w.add_connection("/image", Img.__msgtype__, typestore=TS)
        qc = w.add_connection("/q", Str.__msgtype__, typestore=TS)
        w.write(qc, 1, TS.serialize_cdr(Str(data="anyone?"), Str.__msgtype__))
    with pytest.raises(SourceError, match="1 questions but no frame"):
        read_bag(only_questions, "/image", "/q")
    empty = tmp_path / "empty"
    with Writer(empty, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        w.add_connection("/image", Img.__msgtype__, typestore=TS)
        w.add_connection("/q", Str.__msgtype__, typestore=TS)
    with pytest.raises(SourceError, match="nothing to evaluate"):
        read_bag(empty, "/image", "/q")


def test_dataset_modes(tmp_path: Path) -> None:
    wh = tmp_path / "wh"
    n = generate("test", 3, 0, wh, (64, 64), 2)
    loaded = read_dataset(wh)
    assert len(loaded.samples) == n == 6 and all(s.answers and s.question for s in loaded.samples)
    # VQAv2: 10 human answers per question, COCO file names
    vqa = tmp_path / "vqa"
    (vqa / "images").mkdir(parents=True)
    cv2.imwrite(str(vqa / "images" / "COCO_val2014_000000000042.jpg"), rgb(3))
    questions = {"questions": [{"image_id": 42, "question": "What color is the box?", "question_id": 420}]}
    answers = ["red"] * 2 + ["blue"] * 8
    notes = {"annotations": [{"question_id": 420, "answers": [{"answer": a} for a in answers]}]}
    (vqa / "v2_questions_val.json").write_text(json.dumps(questions))
    (vqa / "v2_annotations_val.json").write_text(json.dumps(notes))
    (sample,) = read_dataset(vqa).samples
    assert sample.key == "420" and len(sample.answers) == 10 and sample.image.shape == (24, 32, 3)
    # GQA: {question id: {imageId, question, answer}}; a missing image is skipped with a cause
    gqa = tmp_path / "gqa"
    (gqa / "images").mkdir(parents=True)
    cv2.imwrite(str(gqa / "images" / "n1.png"), rgb(4))
    qs = {"7": {"imageId": "n1", "question": "Is it red?", "answer": "no"}, "8": {"imageId": "gone", "question": "?"}}
    (gqa / "testdev_questions.json").write_text(json.dumps(qs))
    loaded = read_dataset(gqa)
    assert [(s.key, s.answers) for s in loaded.samples] == [("7", ("no",))] and loaded.problems.counts()["image"] == 1
    with pytest.raises(SourceError, match=r"no samples\.jsonl"):
        read_dataset(tmp_path / "wh" / "images")


# ---------------------------------------------------------------- metrics and perturbations


def test_metrics_on_hand_checked_cases() -> None:
    assert metrics.normalize_answer("Two.") == "2" and metrics.normalize_answer("The Red box!") == "red box"
    assert metrics.normalize_answer("dont know") == "don't know" and metrics.normalize_answer("3.5") == "3.5"
    assert metrics.exact_match("Yes", ["yes"]) == 1.0 and metrics.exact_match("no", ["yes"]) == 0.0
    ten = ["red"] * 2 + ["blue"] * 8
    # leave-one-out over 10: 2 subsets keep 1 "red" (1/3), 8 keep 2 (2/3) -> 0.6
    assert metrics.vqa_accuracy("red", ten) == pytest.approx(0.6)
    assert metrics.vqa_accuracy("blue", ten) == 1.0 and metrics.vqa_accuracy("green", ten) == 0.0
    # 3 matches: 3 subsets keep 2 (2/3), 7 keep 3 (1) -> 0.9
    assert metrics.vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    assert metrics.accuracy("Red.", ["red"]) == 1.0 and metrics.agrees("Two", "2") == 1.0
    # one verdict for every caller: the letter "a" is an answer, an empty answer is never right
    assert metrics.correct("A.", ["a"]) and not metrics.correct("", ["a"]) and not metrics.correct("the", ["a"])
    assert not metrics.correct("", [""]) and not metrics.correct("", ["?"]) and metrics.correct(" two ", ["2"])
    keep = np.array([[1, 0], [1, 1]], bool)
    assert metrics.evidence_recall(keep, np.array([[1, 1], [0, 0]], bool)) == 0.5
    assert metrics.evidence_recall(keep, np.zeros((2, 2), bool)) is None
    values = [1.0] * 30 + [0.0] * 10
    lo, hi = metrics.bootstrap_ci(values, seed=1)
    assert lo < 0.75 < hi and (lo, hi) == metrics.bootstrap_ci(values, seed=1)
    assert metrics.bootstrap_ci([1.0] * 5) == (1.0, 1.0)
    assert metrics.percentiles(list(range(101)))["p90"] == pytest.approx(90.0)


def test_recommendation_takes_the_fewest_tokens_then_the_more_accurate_then_the_faster() -> None:
    from atp_ros.evaluation.sweep import KEEP_ALL, recommend

    def row(selector: str, tokens: float, acc: float, p50: float) -> dict:
        summary = {
            "accuracy": {"mean": acc},
            "fidelity": {"mean": None},
            "tokens_kept": {"mean": tokens},
            "latency_ms": {"total": {"p50": p50}},
        }
        return {"setting": {"selector": selector, "perturbation": ""}, "summary": summary}

    full = row(KEEP_ALL, 256, 0.58, 37.0)
    atp, divprune = row("atp", 29, 0.570, 30.1), row("divprune", 29, 0.568, 28.3)
    # Same tokens, both within 2 points: the more accurate wins though the other was measured faster.
    assert recommend([full, atp, divprune, row("atp", 64, 0.582, 30.9)], 0.02) is atp
    # Quality tied: the faster.
    twin = row("uniform", 29, 0.570, 25.0)
    assert recommend([full, atp, twin], 0.02) is twin
    # Fewer tokens first, as long as they are within the tolerance; none within it: no recommendation.
    assert recommend([full, atp, row("random", 16, 0.561, 20.0)], 0.02)["setting"]["selector"] == "random"
    assert recommend([full, row("random", 16, 0.40, 20.0)], 0.02) is None


@pytest.mark.parametrize("name", IMAGE_CORRUPTIONS)
def test_corruptions_are_seeded_and_keep_the_frame_shape(name: str) -> None:
    img = rgb(5, 48, 64)
    a, b = corrupt(img, name, 3, seed=7), corrupt(img, name, 3, seed=7)
    assert a.shape == img.shape and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, img)
    mild = np.abs(corrupt(img, name, 1, seed=7).astype(int) - img).mean()
    assert mild <= np.abs(a.astype(int) - img).mean() + 1e-9  # severity 3 changes at least as much


def test_question_perturbations() -> None:
    assert (
        perturb_question("How many cones are on the floor?", "paraphrase", 0)
        == "what is the number of cones on the floor?"
    )
    assert perturb_question("is there a red box?", "paraphrase", 0) == "can you see a red box?"
    d = perturb_question("is the aisle empty?", "distractor", 3)
    assert d.endswith("is the aisle empty?") and d != "is the aisle empty?"
    assert d == perturb_question("is the aisle empty?", "distractor", 3)


# ---------------------------------------------------------------- the command


def _run(capsys, *argv) -> tuple[int, str, str]:
    # The flat world's bags answered by warehouse-tiny (the CLI's default model is warehouse-cell): the
    # evaluation's mechanics on the smallest bundled model.
    if "--model" not in argv:
        argv = (*argv, "--model", "warehouse-tiny")
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_offline_sweep_report_and_resume(warehouse_bag: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    args = ("--bag", warehouse_bag, "--out", out, "--keep-ratios", "0.25", "--alphas", "1", "--selectors", "atp,random")
    args += (
        "--corruptions",
        "jpeg",
        "--severities",
        "3",
        "--question-perturbations",
        "distractor",
        "--bootstrap",
        "100",
    )
    code, stdout, _ = _run(capsys, *args)
    assert code == 0, stdout
    assert "8 samples" in stdout and "(0 cached)" in stdout
    results = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in results["settings"]]
    assert names[0] == "full" and "atp a=1 k=0.25" in names and "random k=0.25" in names
    full = results["settings"][0]["summary"]
    assert full["tokens_kept"]["mean"] == 144 and full["fidelity"]["mean"] == 1.0 and full["n"] == 8
    atp = next(r for r in results["settings"] if r["name"] == "atp a=1 k=0.25")["summary"]
    assert atp["tokens_kept"]["mean"] == 36 and atp["flops_prefill"] < full["flops_prefill"]
    assert atp["accuracy"]["ci"][0] <= atp["accuracy"]["mean"] <= atp["accuracy"]["ci"][1]
    assert {r["perturbation"] for r in results["robustness"]} == {"image:jpeg:3", "question:distractor"}
    assert set(atp["latency_ms"]) >= {"vision", "prefill", "total"} and atp["latency_ms"]["total"]["p50"] > 0
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + len(names) and rows[0].startswith("setting,selector,keep_ratio")
    for png in ("quality_vs_keep.png", "pareto.png", "robustness.png", "overlays.png"):
        assert (out / png).stat().st_size > 1000, png
    md = (out / "report.md").read_text()
    assert "Recommended operating point" in md and "evaluate --bag" in md and "machine" in md
    # The same command again: everything from the cache; one setting lost: only it runs.
    code, stdout, _ = _run(capsys, *args)
    assert code == 0 and f"({len(names)} cached)" in stdout
    cached = sorted((out / "cache").glob("*.json"))
    cached[0].unlink()
    code, stdout, _ = _run(capsys, *args)
    assert code == 0 and f"({len(names) - 1} cached)" in stdout
    again = json.loads((out / "results.json").read_text())["settings"]
    assert [(r["name"], r["summary"]["accuracy"]["mean"]) for r in again] == [
        (r["name"], r["summary"]["accuracy"]["mean"]) for r in results["settings"]
    ]  # the recomputed setting answers exactly as before


def test_ctrl_c_writes_what_finished_and_the_same_command_resumes(warehouse_bag: Path, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "atp_ros.evaluation.cli", "--bag", str(warehouse_bag), "--out", str(out)]
    cmd += ["--keep-ratios", "0.6,0.4,0.25,0.11", "--alphas", "0,0.5,1", "--bootstrap", "100"]
    # A background job of a non-interactive shell starts with SIGINT ignored, and children inherit that:
    # restore the default so Python turns Ctrl-C into KeyboardInterrupt, as in a terminal.
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=restore)
    try:
        deadline = time.monotonic() + 120
        while len(list((out / "cache").glob("*.json"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stdout + stderr
    assert "interrupted" in stdout and "Traceback" not in stderr
    partial = json.loads((out / "results.json").read_text())
    assert partial["complete"] is False and len(partial["settings"]) >= 2
    assert "incomplete" in (out / "report.md").read_text()
    finished = len(list((out / "cache").glob("*.json")))
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"({finished} cached)" in rerun.stdout
    assert json.loads((out / "results.json").read_text())["complete"] is True


def test_dataset_mode_uses_vqa_soft_accuracy(tmp_path: Path, capsys) -> None:
    vqa = tmp_path / "vqa"
    (vqa / "images").mkdir(parents=True)
    for i in range(3):
        cv2.imwrite(str(vqa / "images" / f"{i}.png"), rgb(i, 96, 128))
    questions = {"questions": [{"image_id": i, "question": "is the aisle empty?", "question_id": i} for i in range(3)]}
    notes = {
        "annotations": [
            {"question_id": i, "answers": [{"answer": a} for a in ["yes"] * 5 + ["no"] * 5]} for i in range(3)
        ]
    }
    (vqa / "questions.json").write_text(json.dumps(questions))
    (vqa / "annotations.json").write_text(json.dumps(notes))
    code, stdout, _ = _run(
        capsys, "--dataset", vqa, "--out", tmp_path / "o", "--keep-ratios", "0.5", "--selectors", "atp"
    )
    assert code == 0, stdout
    full = json.loads((tmp_path / "o" / "results.json").read_text())["settings"][0]["summary"]
    records = [r for f in (tmp_path / "o" / "cache").glob("*.json") for r in json.loads(f.read_text())["records"]]
    humans = ["yes"] * 5 + ["no"] * 5
    # 5 of 10 humans gave each answer: "yes" and "no" both score 1.0 (min(1, 4/3) or min(1, 5/3)), others 0.
    assert all(
        r["accuracy"] == (1.0 if metrics.normalize_answer(r["answer"]) in ("yes", "no") else 0.0) for r in records
    )
    assert all(r["accuracy"] == metrics.vqa_accuracy(r["answer"], humans) for r in records)
    assert full["n"] == 3 and full["evidence_recall"] is None
    full_records = [
        r
        for f in (tmp_path / "o" / "cache").glob("*.json")
        for r in json.loads(f.read_text())["records"]
        if json.loads(f.read_text())["setting"]["selector"] == "keep_all"  # the unpruned reference
    ]
    assert full["accuracy"]["mean"] == pytest.approx(np.mean([r["accuracy"] for r in full_records]))


def test_bad_input_exits_nonzero_with_one_line(tmp_path: Path, warehouse_bag: Path, capsys) -> None:
    code, _, err = _run(capsys, "--bag", warehouse_bag, "--image-topic", "/nope", "--out", tmp_path / "o")
    assert code == 1 and err.count("\n") == 1 and "no topic '/nope'" in err and "Traceback" not in err
    code, _, err = _run(capsys, "--bag", warehouse_bag, "--model", str(tmp_path), "--out", tmp_path / "o")
    assert code == 1 and err.startswith("evaluate: error:") and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["--bag", str(warehouse_bag), "--out", str(tmp_path / "o"), "--keep-ratios", "1.5"])
    assert exit_info.value.code == 2


@pytest.mark.ros
def test_live_replay_through_the_node_over_dds(warehouse_bag: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("rclpy")
    pytest.importorskip("atp_ros_msgs.msg")
    from rosbags.highlevel import AnyReader

    out = tmp_path / "live"
    args = ("--bag", warehouse_bag, "--out", out, "--keep-ratios", "0.25", "--alphas", "1", "--selectors", "atp")
    code, stdout, err = _run(capsys, *args, "--live", "--rate", "0.5")
    assert code == 0, stdout + err
    live = json.loads((out / "results.json").read_text())["live"]
    assert "error" not in live, live
    assert live["frames_sent"] == 8 and 1 <= live["frames_answered"] <= 8
    assert live["answers_matched_by_stamp"] and live["agreement_with_offline"] == 1.0
    assert live["stamp_to_answer_ms_p50"] > 0 and live["frames_answered"] + live["frames_dropped"] == 8
    with AnyReader([out / "live" / "node_outputs"]) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
    answer_topic = next(t for t in counts if t.endswith("/answer"))
    assert counts[answer_topic] >= live["frames_answered"] and "/diagnostics" in counts
    assert any(t.endswith("/overlay") for t in counts)


@pytest.mark.ros
def test_live_replay_attaches_to_a_running_node(warehouse_bag: Path, tmp_path: Path, capsys) -> None:
    """--attach: the node is already running (here: started by the test in its own namespace); the
    replay publishes on its topics and records what it answers, without starting another one."""
    pytest.importorskip("rclpy")
    pytest.importorskip("atp_ros_msgs.msg")
    import os
    import subprocess

    from atp_ros.ros.process import node_executable, stop_node

    # A node listening on the bag's topics, the way a robot's launch file would remap them.
    ns = f"/attach_{os.getpid()}"
    cmd = [str(node_executable()), "--ros-args", "-r", f"__ns:={ns}", "-r", "image:=/camera/image_raw"]
    cmd += ["-r", "~/query:=/atp_vlm/query", "-p", "model_id:=warehouse-tiny", "-p", "atp.alpha:=1.0"]
    with (tmp_path / "node.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        out = tmp_path / "attached"
        args = ("--bag", warehouse_bag, "--out", out, "--keep-ratios", "0.25", "--alphas", "1", "--selectors", "atp")
        code, stdout, err = _run(capsys, *args, "--attach", f"{ns}/atp_vlm", "--live", "--rate", "0.5")
        assert code == 0, stdout + err
        live = json.loads((out / "results.json").read_text())["live"]
        assert "error" not in live, live
        assert live["frames_sent"] == 8 and live["frames_answered"] >= 1 and live["answers_matched_by_stamp"]
        assert not (out / "live" / "node.log").exists()  # no node of its own was started
        assert proc.poll() is None  # the attached node keeps running
    finally:
        stop_node(proc)


def test_reuse_axis_answers_the_bag_as_one_stream(tmp_path: Path, capsys) -> None:
    from atp_ros.warehouse.scenes import render_scene

    bag = tmp_path / "stream"
    still, other = render_scene(3, 240, 320).rgb, render_scene(4, 240, 320).rgb
    frames = [still] * 4 + [other] * 2  # a scene holding still, then a new one holding still
    with Writer(bag, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        ic = w.add_connection("/camera/image_raw", Img.__msgtype__, typestore=TS)
        qc = w.add_connection("/atp_vlm/query", Str.__msgtype__, typestore=TS)
        w.write(qc, 1, TS.serialize_cdr(Str(data="what color is the box?"), Str.__msgtype__))
        for i, f in enumerate(frames):  # 10 Hz
            stamp = 1_000_000_000 + i * 100_000_000
            w.write(ic, stamp, TS.serialize_cdr(raw_image(stamp, f), Img.__msgtype__))
    out = tmp_path / "report"
    args = ("--bag", bag, "--out", out, "--keep-ratios", "0.25", "--alphas", "1", "--selectors", "atp")
    code, stdout, _ = _run(capsys, *args, "--reuse", "none,answer,tokens", "--bootstrap", "100")
    assert code == 0, stdout
    results = {r["name"]: r["summary"] for r in json.loads((out / "results.json").read_text())["settings"]}
    per_frame, reused = results["atp a=1 k=0.25"], results["atp a=1 k=0.25 reuse=answer"]
    tokens = results["atp a=1 k=0.25 reuse=tokens"]
    assert per_frame["reuse_rate"] is None and per_frame["n"] == reused["n"] == tokens["n"] == 6
    assert reused["reuse_rate"] == pytest.approx(4 / 6), "frames 2-4 and 6 reuse; 1 and the new scene run"
    assert tokens["reuse_rate"] == pytest.approx(4 / 6), "token reuse keeps answer reuse on top"
    assert reused["fidelity"]["mean"] == per_frame["fidelity"]["mean"], "identical frames, identical answers"
    assert "reuse=answer (67% reused)" in (out / "report.md").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in (*args, "--reuse", "sparse")])
    assert exit_info.value.code == 2 and "unknown sparse" in capsys.readouterr().err
