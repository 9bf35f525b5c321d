"""The atp_vlm node over real Fast DDS, one installed node process per test: compressed transport
and corrupt data, backend notes in the log and diagnostics, no query and a clean Ctrl-C, and the
one-line exit when the model or a parameter is unusable."""

from __future__ import annotations

import subprocess
import time

import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("atp_ros_msgs.msg")

from atp_ros.testing.tiny.llava import save_tiny_llava  # noqa: E402
from atp_ros.warehouse.scenes import render_scene  # noqa: E402
from node_harness import (  # noqa: E402
    Probe,
    image_msg,
    new_namespace,
    node_executable,
    publish_until_answer,
    start_node,
    stop_node,
)
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.dds]


def frame(seed: int, stamp: int, h: int = 120, w: int = 160) -> Image:
    return image_msg(render_scene(seed, h, w).rgb, stamp)


def test_compressed_transport_and_corrupt_data(tiny_llava, ros_ctx, tmp_path) -> None:
    ns = new_namespace()
    log = tmp_path / "node.log"
    proc = start_node(tiny_llava, ns, log, image_transport="compressed", max_new_tokens=2)
    probe = Probe(ros_ctx, ns)
    try:
        probe.wait_ready(proc, log)
        probe.pub_query.publish(String(data="what is on the shelf?"))
        import cv2

        ok, jpeg = cv2.imencode(".jpg", render_scene(50, 120, 160).rgb[:, :, ::-1])
        assert ok
        good = CompressedImage(format="jpeg", data=jpeg.tobytes())
        good.header.stamp.sec = 9
        corrupt = CompressedImage(format="jpeg", data=b"\xff\xd8 definitely not a jpeg")
        corrupt.header.stamp.sec = 8
        # Until counted: a few fixed sends could all arrive before the query (skipped, never decoded).
        probe.wait_for(lambda: probe.node.count_subscribers(f"{ns}/image/compressed") > 0, 10, "node subscribed")
        deadline = time.monotonic() + 15
        while "errors.corrupt" not in probe.status_values() and time.monotonic() < deadline:
            probe.pub_compressed.publish(corrupt)
            time.sleep(0.2)
        assert "errors.corrupt" in probe.status_values()
        deadline = time.monotonic() + 30
        while not probe.snapshot(probe.answers) and time.monotonic() < deadline:
            probe.pub_compressed.publish(good)
            time.sleep(0.2)
        answers = probe.snapshot(probe.answers)
        assert answers and all(a.header.stamp.sec == 9 for a in answers)
        assert "cannot decode compressed image" in log.read_text()
    finally:
        assert stop_node(proc) < 5
        probe.close()


def test_backend_notes_reach_the_node_log_once_and_diagnostics(ros_ctx, tmp_path) -> None:
    """A checkpoint without a text tower runs CLS-only: the node says so once in its log (/rosout),
    and /diagnostics carries the note (WARN while answering that way) until alpha is set to 0."""
    ckpt = save_tiny_llava(tmp_path / "no_tower", with_text_tower=False)
    ns = new_namespace()
    log = tmp_path / "node.log"
    proc = start_node(ckpt, ns, log, max_new_tokens=2, atp__alpha=0.5)
    probe = Probe(ros_ctx, ns)
    try:
        probe.wait_ready(proc, log)
        probe.pub_query.publish(String(data="is the aisle empty?"))
        for i in range(3):
            publish_until_answer(probe, frame(i, 2_000_000_000 + i))
        probe.wait_for(lambda: "running CLS-only" in probe.status_values().get("notes", ""), 10, "notes in diagnostics")
        values = probe.status_values()
        assert "no text tower" in values["load_notes"] and values["_level"] == "1"  # WARN
        assert "running CLS-only" in values["_message"]
        text = log.read_text()
        assert text.count("backend: no text tower") == 2  # the load note and the per-frame note, once each
        assert text.count("instead of selector 'atp'") == 1  # the per-frame note: once for three frames
        assert probe.set_parameter("atp.alpha", 0.0)[0]
        publish_until_answer(probe, frame(9, 2_000_000_009))
        probe.wait_for(lambda: probe.status_values().get("notes", "x") == "", 10, "notes cleared")
        assert probe.status_values()["_level"] == "0"
    finally:
        stop_node(proc)
        probe.close()


def test_no_query_no_inference_and_clean_ctrl_c(tiny_llava, ros_ctx, tmp_path) -> None:
    ns = new_namespace()
    log = tmp_path / "node.log"
    proc = start_node(tiny_llava, ns, log)
    probe = Probe(ros_ctx, ns)
    try:
        probe.wait_ready(proc, log)
        for i in range(10):
            probe.pub_image.publish(frame(60, 10_000_000_000 + i))
            time.sleep(0.05)
        probe.wait_for(
            lambda: int(probe.status_values().get("frames_skipped_no_query", 0)) > 0, 5, "skipped frames counted"
        )
        assert probe.snapshot(probe.answers) == []
        assert probe.status_values()["_message"] == "waiting for a query"
    finally:
        seconds = stop_node(proc)
        probe.close()
    assert proc.returncode == 0, log.read_text()
    assert seconds < 2.0, f"Ctrl-C took {seconds:.2f} s"
    assert log.read_text().count("no query yet") == 1


def test_unloadable_model_exits_nonzero_with_one_line(tmp_path) -> None:
    missing = tmp_path / "no_such_model"
    missing.mkdir()
    result = subprocess.run(
        [str(node_executable()), "--ros-args", "-p", f"model_id:={missing}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and str(missing) in lines[0] and "config.json" in lines[0], lines


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("atp.alpha:=2.0", ("atp.alpha", "range")),  # outside the descriptor range: rclpy raises
        ("processing.max_rate_hz:=4", ("processing.max_rate_hz", "DOUBLE")),  # integer for a double
        ("atp.keep_ratio:=0.0", ("keep_ratio",)),  # our own check (open low end)
    ],
)
def test_bad_parameter_at_startup_exits_nonzero_with_one_line(tmp_path, override, words) -> None:
    result = subprocess.run(
        [str(node_executable()), "--ros-args", "-p", f"model_id:={tmp_path}", "-p", override],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, lines
    assert all(word in lines[0] for word in words), lines
