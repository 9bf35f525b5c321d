"""The closed-loop evaluation's scoring without ROS: task choice from a frame's truth, ground-truth causes,
the per-setting summary (success, Wilson interval, perception accuracy) and its table and plot."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

pytest.importorskip("atp_ros.warehouse.cell.scene")  # sets MUJOCO_GL (egl) before MuJoCo loads

from atp_ros.cell_loop import evaluate, picking
from atp_ros.cell_loop.sim import CellSim

TARGET = {"id": 7, "where": "top-two", "color": "red"}
META = {"model": "m", "tasks": 5, "seeds": "0..4", "camera": "c", "time_scale": 4, "machine": "2 CPUs"}


def report(**kw) -> dict:
    if kw.get("answer_slot") and "target" not in kw:  # the planner acts on the answered slot (target_from answer)
        kw["target"] = kw["answer_slot"]
    return {"timings": {"ask_s": 0.5, "total_s": 9.0, "inference_ms": 40.0}, "tokens": [64, 256]} | kw


def test_choose_task_names_a_unique_visible_item() -> None:
    sim = CellSim(320, 240, seed=1000)
    try:
        truth = sim.truth().to_json()
    finally:
        sim.close()
    task, target = evaluate.choose_task(truth, 1000)
    parsed = picking.Task.parse(task)
    same = [o for o in truth["objects"] if (o["color"], o["kind"]) == (parsed.color, parsed.kind)]
    assert len(same) == 1 and same[0]["id"] == target["id"]
    assert target["where"] == f"{same[0]['level']}-{same[0]['slot']}"
    assert evaluate.choose_task(truth, 1000) == (task, target)  # seeded
    other = {"box": "tote", "tote": "box"}[parsed.kind]
    twin = [o for o in truth["objects"] if o["place"] == "shelf" and (o["color"], o["kind"]) == (parsed.color, other)]
    assert target["contrast"] == bool(twin)
    contrasts = {evaluate.choose_task(truth, s)[1]["contrast"] for s in range(1000, 1040)}
    assert contrasts == {True, False}, "this frame has items with and without a same-color twin of the other kind"
    assert evaluate.choose_task({**truth, "objects": []}, 1) is None


@pytest.mark.parametrize(
    ("rep", "grasped", "cause"),
    [
        (report(delivered=True, answer_slot="top-two", confirm_answer="red"), [7], None),
        (report(cause="answer_not_understood", answer_slot=None), [], "wrong_answer"),
        (report(cause="wrong_box_grasped", answer_slot="top-three", confirm_answer="blue"), [3], "wrong_answer"),
        (report(cause="wrong_box_grasped", answer_slot="top-two", confirm_answer="blue"), [3], "wrong_box_grasped"),
        (
            report(cause="grasp_not_confirmed", answer_slot="top-two", confirm_answer="nothing"),
            [7],
            "wrong_confirmation",
        ),
        (report(cause="ik_failure", answer_slot="top-two"), [], "ik_failure"),
        (report(cause="timeout", answer_slot="top-two"), [7], "timeout"),
        (report(cause="no_answer"), [], "no_answer"),
        # target_from relevant_box: the evidence named the right slot though the answer did not
        (
            report(cause="grasp_not_confirmed", answer_slot=None, target="top-two", confirm_answer=""),
            [7],
            "wrong_confirmation",
        ),
        (report(cause="no_evidence", answer_slot=None), [], "wrong_answer"),
    ],
)
def test_ground_truth_names_the_cause(rep, grasped, cause) -> None:
    scored = evaluate.score("atp_0.25", 1, "bring the red box to the conveyor", TARGET, rep, grasped)
    assert scored.cause == cause and scored.success == (cause is None)


def test_holding_accuracy_only_where_the_truth_is_known() -> None:
    right = evaluate.score("s", 1, "t", TARGET, report(answer_slot="top-two", confirm_answer="red"), [7])
    wrong = evaluate.score("s", 1, "t", TARGET, report(answer_slot="top-two", confirm_answer="nothing"), [7])
    other = evaluate.score("s", 1, "t", TARGET, report(answer_slot="top-two", confirm_answer="red"), [3])
    assert (right.holding_correct, wrong.holding_correct, other.holding_correct) == (True, False, None)


def test_summary_table_and_plot(tmp_path) -> None:
    rows = [
        evaluate.score("full", s, "t", TARGET, report(delivered=s < 3, answer_slot="top-two" if s < 4 else "x"), [7])
        for s in range(5)
    ]
    summary = evaluate.summarize(rows, ["full", "random_0.25"])
    full = summary["full"]
    assert (full["tasks"], full["success"], full["success_rate"]) == (5, 3, 0.6)
    assert full["success_ci95"][0] < 0.6 < full["success_ci95"][1]
    assert full["causes"] == {"wrong_answer": 1, "other": 1} and full["where_accuracy"] == 0.8
    assert summary["random_0.25"]["tasks"] == 0
    assert full["contrast_tasks"] == 0 and full["where_accuracy_contrast"] is None
    table = evaluate.markdown(summary, META)
    assert "other kind" not in table
    # Tasks whose item's color the other kind shares are counted apart: seeds 3 and 4 here (one right, one not).
    twin = TARGET | {"contrast": True}
    mixed = rows[:3] + [evaluate.score("full", s, "t", twin, rows[s].report, [7]) for s in (3, 4)]
    split = evaluate.summarize(mixed, ["full"])["full"]
    assert (split["contrast_tasks"], split["where_accuracy_contrast"], split["where_accuracy_otherwise"]) == (
        2,
        0.5,
        1.0,
    )
    assert "on the 2 tasks whose item's color an item of the other kind shares" in evaluate.markdown(
        {"full": split}, META
    )
    assert "| full | 64 of 256 | 3/5 (" in table and "Interrupted" not in table
    assert "Interrupted: the table covers the tasks done" in evaluate.markdown(summary, META | {"interrupted": True})
    evaluate.plot(summary, tmp_path / "success.png")
    assert (tmp_path / "success.png").stat().st_size > 0
    assert evaluate.wilson(0, 0) == (0.0, 1.0)


def test_paired_difference_on_common_seeds() -> None:
    full = {s: True for s in range(20)}
    random = {s: s % 4 != 0 for s in range(20)} | {99: False}  # 5 of the 20 common seeds fail
    d = evaluate.paired_difference(full, random)
    assert d["n"] == 20 and d["points"] == -25.0 and d["ci95"][0] < -25.0 < d["ci95"][1] < 0
    assert evaluate.paired_difference(full, full)["ci95"] == [0.0, 0.0]
    assert evaluate.paired_difference(full, {}) is None
    rows = [evaluate.score("full", s, "t", TARGET, report(delivered=True, answer_slot="top-two"), [7]) for s in (1, 2)]
    rows += [evaluate.score("random_0.25", 1, "t", TARGET, report(answer_slot="x"), [])]
    summary = evaluate.summarize(rows, ["full", "random_0.25"])
    assert summary["full"]["vs_first"] is None and summary["random_0.25"]["vs_first"]["points"] == -100.0
    assert "| random_0.25 | 64 of 256 | 0/1 (" in evaluate.markdown(summary, META) and "-100.0 (" in evaluate.markdown(
        summary, META
    )


def test_frame_strip_and_clip(tmp_path) -> None:
    from PIL import Image

    frames = [np.full((24, 32, 3), 10 * i, np.uint8) for i in range(9)]
    evaluate.frame_strip(frames, ["a task", "its answers"], tmp_path / "strip.png", count=3)
    evaluate.task_clip(frames, tmp_path / "clip.gif", fps=4.0, max_frames=5)
    assert Image.open(tmp_path / "strip.png").size == (3 * 32, 24 + 18 * 2 + 8)
    clip = Image.open(tmp_path / "clip.gif")
    assert clip.n_frames == 5 and clip.info["duration"] == round(250 * 9 / 5)
    evaluate.frame_strip([], ["nothing"], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_sigterm_and_an_ignored_sigint_stop_the_run_like_ctrl_c() -> None:
    # A background shell starts the evaluation with SIGINT ignored; SIGTERM is what process managers send.
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        evaluate.interrupt_on_signals()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signum)
                time.sleep(5)  # the handler raises at once, ending the sleep
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
