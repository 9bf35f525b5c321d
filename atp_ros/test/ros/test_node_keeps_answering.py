"""The node never stops answering (issue 23, section 0), over real Fast DDS.

Each everyday order of events runs on a fresh installed node: frames before any question
then a bad frame; frames before any question then an empty question; odd-size YUV frames
(OpenCV's own errors) followed by other bad frames. After each, the node must still answer
frames and asks, exit 0 on Ctrl-C and never print a traceback. In-process tests cover
every log severity in every order, the ask timeout and diagnostics of a stopped worker.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("atp_ros_msgs.msg")

from atp_ros.warehouse.scenes import render_scene  # noqa: E402
from node_harness import (  # noqa: E402
    Probe,
    image_msg,
    new_namespace,
    publish_until_answer,
    start_node,
    stop_node,
)
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.dds]


def frame(seed: int, stamp: int) -> Image:
    return image_msg(render_scene(seed, 120, 160).rgb, stamp)


def raw(encoding: str, width: int, height: int, step: int, rows: int | None = None) -> Image:
    msg = Image(height=height, width=width, encoding=encoding, step=step)
    msg.data = bytes(step * (rows or height))
    return msg


BAD_FRAMES = {
    "encoding": raw("32FC7", 8, 8, 8 * 28),  # unknown encoding
    "too_large": raw("mono8", 300, 300, 300),  # over limits.max_image_pixels (200 x 200 below)
    "layout_yuv422": raw("yuv422", 161, 120, 322),  # odd width: OpenCV raises cv2.error
    "layout_uyvy": raw("uyvy", 161, 120, 322),
    "layout_yuyv": raw("yuyv", 161, 120, 322),
    "layout_nv12": raw("nv12", 161, 120, 161, rows=180),
}
SEQUENCES = {
    "frames_then_bad_frame": ["encoding", "too_large"],
    "frames_then_empty_question": ["empty_question"],
    "odd_yuv_then_bad_frames": ["layout_yuv422", "encoding", "layout_uyvy", "layout_yuyv", "layout_nv12", "too_large"],
}


def _counted(probe: Probe, key: str) -> bool:
    return key in probe.status_values()


def _publish_bad(probe: Probe, name: str) -> None:
    """Publish one bad input until the node has counted it (the newest frame wins the slot)."""
    if name == "empty_question":
        probe.pub_query.publish(String())  # the default payload of `ros2 topic pub .../query std_msgs/String`
        probe.wait_for(lambda: _counted(probe, "errors.query_empty"), 10, "empty question counted")
        return
    cause = name.split("_")[0] if name.startswith("layout") else name
    deadline = time.monotonic() + 15
    while not _counted(probe, f"errors.{cause}") and time.monotonic() < deadline:
        probe.pub_image.publish(BAD_FRAMES[name])
        time.sleep(0.2)
    assert _counted(probe, f"errors.{cause}"), (name, probe.status_values())


@pytest.mark.parametrize("sequence", list(SEQUENCES))
def test_the_node_keeps_answering_after_everyday_orders_of_events(tiny_llava, ros_ctx, tmp_path, sequence) -> None:
    ns = new_namespace()
    log = tmp_path / "node.log"
    proc = start_node(tiny_llava, ns, log, max_new_tokens=2, limits__max_image_pixels=200 * 200)
    probe = Probe(ros_ctx, ns)
    try:
        probe.wait_ready(proc, log)
        # Cameras start before planners ask: frames with no question yet (INFO, once).
        deadline = time.monotonic() + 15
        while int(probe.status_values().get("frames_skipped_no_query", 0)) == 0 and time.monotonic() < deadline:
            probe.pub_image.publish(frame(1, 1_000_000_000))
            time.sleep(0.1)
        assert int(probe.status_values().get("frames_skipped_no_query", 0)) > 0
        if sequence != "frames_then_empty_question":  # a frame is decoded only once there is a question
            probe.pub_query.publish(String(data="is there a pallet?"))
        for step in SEQUENCES[sequence]:
            _publish_bad(probe, step)  # WARN, after the INFO
            assert proc.poll() is None, log.read_text()
        if sequence == "odd_yuv_then_bad_frames":  # OpenCV's errors are bad input, not model failures
            assert "errors.model" not in probe.status_values()
        probe.pub_query.publish(String(data="is there a pallet?"))
        for i in range(3):
            answer = publish_until_answer(probe, frame(10 + i, 2_000_000_000 + i))
            assert answer.query == "is there a pallet?"
        for _ in range(6):  # more asks than the executor has threads: none may hang
            response = probe.ask_question("what color is the box?", timeout=60)
            assert response.success, response.message
        assert probe.lifecycle_state() == "active"
        probe.wait_for(lambda: probe.status_values().get("worker_running") == "true", 5, "worker running")
    finally:
        seconds = stop_node(proc)
        probe.close()
    text = log.read_text()
    assert proc.returncode == 0, (proc.returncode, seconds, text)  # by itself: stop_node kills after 10 s
    assert "Traceback" not in text and "severity cannot be changed" not in text, text
    assert f"no query yet: publish a question on {ns}/atp_vlm/query" in text


class SlowFirstCall:
    """A real backend whose first ``answer`` blocks until released (a hung device or service)."""

    def __init__(self, backend) -> None:
        self.backend, self.release, self.calls = backend, threading.Event(), 0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def answer(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            self.release.wait(30)
        return self.backend.answer(*args, **kwargs)


@pytest.fixture
def in_process(tiny_llava, ros_ctx):
    """The node in this process (its backend can be wrapped), spun by a MultiThreadedExecutor."""
    from atp_ros.ros.node import VlmNode
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter

    ns = new_namespace()
    node = VlmNode(
        context=ros_ctx,
        namespace=ns,
        parameter_overrides=[
            Parameter("model_id", value=str(tiny_llava)),
            Parameter("max_new_tokens", value=2),
            Parameter("limits.ask_timeout_s", value=1.0),
        ],
    )
    executor = MultiThreadedExecutor(num_threads=4, context=ros_ctx)
    probe = None
    try:
        assert node.bring_up() == ""
        executor.add_node(node)
        threading.Thread(target=executor.spin, daemon=True).start()
        probe = Probe(ros_ctx, ns)
        yield node, probe
    finally:
        node.stop()
        executor.shutdown()
        node.destroy_node()
        if probe is not None:
            probe.close()


def test_every_severity_in_every_order_is_logged_and_the_worker_answers(in_process) -> None:
    from atp_ros.ros.worker import ERROR, OK, WARN

    node, probe = in_process
    for n, order in enumerate(itertools.permutations((OK, WARN, ERROR))):
        for level in order * 2:
            node.worker.problem(f"order{n}_{level}", level, f"severity {level} in order {order}")
    assert node.worker.running
    probe.pub_query.publish(String(data="is the aisle clear?"))
    probe.wait_for(lambda: node.count_subscribers(f"{probe.ns}/image") > 0, 5, "subscription")
    assert publish_until_answer(probe, frame(3, 3_000_000_000)).query == "is the aisle clear?"


def test_asks_time_out_and_a_stopped_worker_is_an_error(in_process) -> None:
    node, probe = in_process
    probe.wait_for(lambda: node.count_subscribers(f"{probe.ns}/image") > 0, 5, "subscription")
    deadline = time.monotonic() + 15
    while not node.worker.stats().get("frames_received") and time.monotonic() < deadline:
        probe.pub_image.publish(frame(4, 4_000_000_000))  # best effort: repeat until one arrives
        time.sleep(0.1)
    slow = SlowFirstCall(node.backend)
    node.worker.backend = slow
    try:
        response = probe.ask_question("what color is the box?", timeout=30)
        assert not response.success and "timed out after 1 s" in response.message
    finally:
        slow.release.set()
    assert probe.ask_question("what color is the box?", timeout=30).success  # the next ask runs
    node.worker.stop()  # the thread is gone while the node still says active
    response = probe.ask_question("what color is the box?", timeout=10)
    assert not response.success and "not answering" in response.message
    probe.wait_for(
        lambda: probe.status_values().get("worker_running") == "false" and probe.status_values()["_level"] == "2",
        5,
        "diagnostics at ERROR",
    )
    assert "inference thread is not running" in probe.status_values()["_message"]
