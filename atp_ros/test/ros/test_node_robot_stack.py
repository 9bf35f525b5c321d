"""The node inside a robot stack, over real Fast DDS: managed lifecycle, the ~/ask action, several
cameras on one model, SIGINT/SIGTERM during a long decode, and faults while it answers.

The node runs as the installed executable in its own process (as ``ros2 run`` starts it).
"""

from __future__ import annotations

import math
import re
import signal
import subprocess
import threading
import time

import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("atp_ros_msgs.msg")

from action_msgs.msg import GoalStatus  # noqa: E402
from atp_ros.testing.tiny.llava import save_tiny_llava  # noqa: E402
from atp_ros.warehouse.scenes import render_scene  # noqa: E402
from node_harness import (  # noqa: E402
    Probe,
    image_msg,
    new_namespace,
    publish_until_answer,
    stamp_ns,
    start_node,
    stop_node,
)
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from atp_ros_msgs.action import Ask as AskAction  # noqa: E402
from atp_ros_msgs.msg import VlmAnswer  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.dds]
N_TOKENS = 64  # tiny LLaVA: 8x8 grid
LONG = 1024  # max_new_tokens of the talker: a full answer takes tens of seconds on 2 cores


@pytest.fixture(scope="module")
def talker(tmp_path_factory):
    """A random LLaVA with a wider, deeper LLM that never says EOS: every answer runs to max_new_tokens."""
    return save_tiny_llava(tmp_path_factory.mktemp("talker") / "ckpt", text_hidden=256, text_layers=6)


def frame(seed: int, stamp: int, frame_id: str = "camera") -> Image:
    return image_msg(render_scene(seed, 120, 160).rgb, stamp, frame_id)


def answers_after(probe: Probe, stamp: int) -> list[VlmAnswer]:
    return [a for a in probe.snapshot(probe.answers) if stamp_ns(a.header) >= stamp]


def test_lifecycle_transitions_gate_answering(tiny_llava, ros_ctx, tmp_path) -> None:
    """autostart:=false waits unconfigured; configure loads, activate answers, deactivate stops,
    cleanup releases, and it comes back; transitions while frames stream never break it."""
    ns = new_namespace()
    log = tmp_path / "node.log"
    proc = start_node(tiny_llava, ns, log, autostart=False, max_new_tokens=2)
    probe = Probe(ros_ctx, ns)
    try:
        probe.wait_for(probe.get_state_client.service_is_ready, 60, "lifecycle services")
        assert probe.lifecycle_state() == "unconfigured"
        assert probe.node.count_publishers(f"{ns}/atp_vlm/answer") == 0
        assert probe.transition("configure") and probe.lifecycle_state() == "inactive"
        probe.wait_for(lambda: probe.node.count_publishers(f"{ns}/atp_vlm/answer") > 0, 10, "answer publisher")
        assert probe.node.count_subscribers(f"{ns}/image") == 0  # inactive: no frame is queued
        probe.wait_for(lambda: probe.ask_action.wait_for_server(timeout_sec=0.1), 10, "ask action server")
        result = send_goal(probe, "what color is the box?").get_result().result
        assert not result.success and "inactive" in result.message

        assert probe.transition("activate") and probe.lifecycle_state() == "active"
        probe.pub_query.publish(String(data="what color is the box?"))
        publish_until_answer(probe, frame(1, 1_000_000_000))

        # transitions while frames stream: each one completes, the node keeps answering after activate
        stop = threading.Event()
        streamer = threading.Thread(target=stream, args=(probe, stop, 2_000_000_000), daemon=True)
        streamer.start()
        try:
            for _ in range(3):
                assert probe.transition("deactivate") and probe.lifecycle_state() == "inactive"
                assert probe.transition("activate")
        finally:
            stop.set()
            streamer.join()
        assert probe.transition("deactivate")
        idle = frame(2, 3_000_000_000)
        for _ in range(10):
            probe.pub_image.publish(idle)
            time.sleep(0.1)
        assert probe.transition("cleanup") and probe.lifecycle_state() == "unconfigured"
        probe.wait_for(lambda: probe.status_values().get("lifecycle_state") == "unconfigured", 10, "diagnostics")
        assert stamp_ns(idle.header) not in {stamp_ns(a.header) for a in probe.snapshot(probe.answers)}

        assert probe.transition("configure") and probe.transition("activate")  # the model loads again
        answer = publish_until_answer(probe, frame(3, 4_000_000_000))
        assert answer.query == "what color is the box?"  # the latched question reaches the new subscription
        assert probe.transition("shutdown") and probe.lifecycle_state() == "finalized"
        assert proc.poll() is None  # finalized, still spinning until the process is told to end
    finally:
        stop_node(proc)
        probe.close()
    assert proc.returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def stream(probe: Probe, stop: threading.Event, first_stamp: int, period: float = 0.05) -> None:
    i = 0
    while not stop.is_set():
        probe.pub_image.publish(frame(i % 5, first_stamp + i))
        i += 1
        time.sleep(period)


def send_goal(probe: Probe, question: str, camera: str = "", feedback: list | None = None):
    """Send an Ask goal; returns the accepted goal handle."""
    future = probe.ask_action.send_goal_async(
        AskAction.Goal(question=question, camera=camera),
        feedback_callback=(lambda msg: feedback.append(msg.feedback)) if feedback is not None else None,
    )
    probe.wait_for(future.done, 30, "goal response")
    handle = future.result()
    assert handle.accepted
    return _Goal(probe, handle)


class _Goal:
    def __init__(self, probe: Probe, handle) -> None:
        self.probe, self.handle = probe, handle

    def get_result(self, timeout: float = 120.0):
        future = self.handle.get_result_async()
        self.probe.wait_for(future.done, timeout, "action result")
        return future.result()


def test_ask_action_answers_and_cancel_ends_a_long_decode(talker, ros_ctx, tmp_path) -> None:
    ns = new_namespace()
    log = tmp_path / "node.log"
    proc = start_node(talker, ns, log, max_new_tokens=LONG)
    probe = Probe(ros_ctx, ns)
    try:
        probe.wait_ready(proc, log)
        probe.wait_for(lambda: probe.ask_action.wait_for_server(timeout_sec=0.1), 10, "ask action server")
        for i in range(5):  # a frame for the ask; no standing question, so the stream stays idle
            probe.pub_image.publish(frame(4, 5_000_000_000 + i))
            time.sleep(0.1)
        probe.wait_for(lambda: int(probe.status_values().get("frames_received", 0)) > 0, 10, "a frame received")
        feedback: list = []
        goal = send_goal(probe, "describe the shelf in detail", feedback=feedback)
        probe.wait_for(lambda: any(f.stage == "running" for f in feedback), 30, "feedback: running")
        cancel = goal.handle.cancel_goal_async()
        probe.wait_for(cancel.done, 30, "cancel response")
        result = goal.get_result()
        assert result.status == GoalStatus.STATUS_CANCELED and result.result.message == "cancelled"
        assert not result.result.success and result.result.answer.answer == ""
    finally:
        stop_node(proc)
        probe.close()
    assert proc.returncode == 0, log.read_text()


def test_ask_action_succeeds_with_the_answer(tiny_llava, ros_ctx, tmp_path) -> None:
    ns = new_namespace()
    log = tmp_path / "node.log"
    proc = start_node(tiny_llava, ns, log, max_new_tokens=3)
    probe = Probe(ros_ctx, ns)
    try:
        probe.wait_ready(proc, log)
        probe.wait_for(lambda: probe.ask_action.wait_for_server(timeout_sec=0.1), 10, "ask action server")
        sent = frame(5, 6_000_000_000)
        for _ in range(5):
            probe.pub_image.publish(sent)
            time.sleep(0.1)
        probe.wait_for(lambda: int(probe.status_values().get("frames_received", 0)) > 0, 10, "a frame received")
        feedback: list = []
        result = send_goal(probe, "where is the red box?", feedback=feedback).get_result()
        assert result.status == GoalStatus.STATUS_SUCCEEDED and result.result.success, result.result.message
        answer = result.result.answer
        assert answer.query == "where is the red box?" and stamp_ns(answer.header) == stamp_ns(sent.header)
        assert sum(answer.keep_mask) == answer.visual_tokens_kept == math.ceil(0.25 * N_TOKENS)
        bad = send_goal(probe, "anything?", camera="left").get_result()
        assert bad.status == GoalStatus.STATUS_ABORTED and "unknown camera 'left'" in bad.result.message
    finally:
        stop_node(proc)
        probe.close()


def test_several_cameras_share_one_model(tiny_llava, ros_ctx, tmp_path) -> None:
    """cameras:=[front, wrist]: one model, a slot and a question per camera, answers on each camera's topic."""
    ns = new_namespace()
    log = tmp_path / "node.log"
    proc = start_node(tiny_llava, ns, log, cameras="[front, wrist]", max_new_tokens=2)
    probe = Probe(ros_ctx, ns)
    node = probe.node
    got: dict[str, list[VlmAnswer]] = {"front": [], "wrist": []}
    reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
    standing = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    pubs = {c: node.create_publisher(Image, f"{c}/image", qos_profile_sensor_data) for c in got}
    for cam, store in got.items():
        node.create_subscription(VlmAnswer, f"atp_vlm/{cam}/answer", store.append, reliable)
    wrist_query = node.create_publisher(String, "atp_vlm/wrist/query", standing)
    try:
        probe.wait_for(lambda: all(node.count_publishers(f"{ns}/atp_vlm/{c}/answer") for c in got), 90, "answers")
        assert node.count_publishers(f"{ns}/atp_vlm/answer") == 0  # named cameras: no unnamed outputs
        probe.pub_query.publish(String(data="how many boxes are on the floor?"))  # every camera
        wrist_query.publish(String(data="is the gripper holding a box?"))  # the wrist camera only
        deadline = time.monotonic() + 60
        i = 0
        while not (got["front"] and got["wrist"]) and time.monotonic() < deadline:
            pubs["front"].publish(frame(i, 7_000_000_000 + i, "front_camera"))
            pubs["wrist"].publish(frame(i + 50, 8_000_000_000 + i, "wrist_camera"))
            i += 1
            time.sleep(0.1)
        front, wrist = got["front"][-1], got["wrist"][-1]
        assert (front.camera, front.header.frame_id) == ("front", "front_camera")
        assert (wrist.camera, wrist.header.frame_id) == ("wrist", "wrist_camera")
        assert front.query == "how many boxes are on the floor?" and wrist.query == "is the gripper holding a box?"
        assert stamp_ns(front.header) // 1_000_000_000 == 7 and stamp_ns(wrist.header) // 1_000_000_000 == 8
        probe.wait_for(lambda: "front.frames_dropped" in probe.status_values(), 10, "per-camera diagnostics")
        assert "Loading weights" not in log.read_text().split("loaded", 1)[1]  # the model was loaded once
    finally:
        stop_node(proc)
        probe.close()
    assert proc.returncode == 0, log.read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_a_long_decode_ends_it_and_exits_cleanly(talker, ros_ctx, tmp_path, sig) -> None:
    ns = new_namespace()
    log = tmp_path / "node.log"
    proc = start_node(talker, ns, log, max_new_tokens=LONG)
    probe = Probe(ros_ctx, ns)
    try:
        probe.wait_ready(proc, log)
        probe.pub_query.publish(String(data="describe everything you see"))
        deadline = time.monotonic() + 60
        while float(probe.status_values().get("in_flight_ms", 0)) < 1500:  # well into the decode
            assert time.monotonic() < deadline, "no decode under way"
            probe.pub_image.publish(frame(6, 9_000_000_000))
            time.sleep(0.2)
        start = time.monotonic()
        proc.send_signal(sig)
        proc.wait(timeout=60)  # a full decode would take far longer than this on 2 cores
        seconds = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        probe.close()
    text = log.read_text()
    assert proc.returncode == 0, text
    stopped = re.search(r"inference stopped (mid-decode after (\d+) new tokens)?", text)
    assert stopped, text  # the stop hook ended the answer: mid-decode (or, very loaded, just before it)
    assert stopped.group(2) is None or int(stopped.group(2)) < LONG
    assert probe.snapshot(probe.answers) == [] and "Traceback" not in text
    print(f"{sig.name}: exit {seconds:.2f} s after the signal; {stopped.group(0)}")


def test_faults_while_answering(tiny_llava, ros_ctx, tmp_path) -> None:
    """The image publisher vanishing and returning, query spam at 1 kHz, parameter changes during inference."""
    ns = new_namespace()
    log = tmp_path / "node.log"
    proc = start_node(tiny_llava, ns, log, max_new_tokens=2)
    probe = Probe(ros_ctx, ns)
    try:
        probe.wait_ready(proc, log)
        probe.pub_query.publish(String(data="what color is the box?"))
        publish_until_answer(probe, frame(1, 10_000_000_000))

        # the camera driver dies and comes back: a new publisher on the same topic is heard
        probe.node.destroy_publisher(probe.pub_image)
        probe.wait_for(lambda: probe.node.count_publishers(f"{ns}/image") == 0, 10, "publisher gone")
        probe.pub_image = probe.node.create_publisher(Image, "image", qos_profile_sensor_data)
        publish_until_answer(probe, frame(2, 11_000_000_000))

        # 1000 questions in about a second from a volatile publisher (`ros2 topic pub -r 1000`)
        spam = probe.node.create_publisher(String, "atp_vlm/query", 10)
        probe.wait_for(lambda: spam.get_subscription_count() > 0, 10, "spam publisher matched")
        start = time.monotonic()
        for i in range(1000):
            spam.publish(String(data=f"is box {i} on the shelf?"))
            time.sleep(max(0.0, start + (i + 1) / 1000 - time.monotonic()))
        last = "is box 999 on the shelf?"
        deadline = time.monotonic() + 30
        while not [a for a in probe.snapshot(probe.answers) if a.query == last] and time.monotonic() < deadline:
            spam.publish(String(data=last))  # best effort may lose the last one: say it again
            probe.pub_image.publish(frame(3, 12_000_000_000))
            time.sleep(0.2)
        assert [a for a in probe.snapshot(probe.answers) if a.query == last], "the newest question never applied"

        # parameters change while frames are being answered: every answer uses one whole snapshot
        stop = threading.Event()
        streamer = threading.Thread(target=stream, args=(probe, stop, 13_000_000_000), daemon=True)
        streamer.start()
        try:
            for i in range(10):
                ratio = (0.25, 0.5)[i % 2]
                assert probe.set_parameter("atp.keep_ratio", ratio)[0]
                time.sleep(0.2)
        finally:
            stop.set()
            streamer.join()
        kept = {a.visual_tokens_kept for a in answers_after(probe, 13_000_000_000)}
        assert kept and kept <= {math.ceil(0.25 * N_TOKENS), math.ceil(0.5 * N_TOKENS)}, kept
        assert proc.poll() is None
    finally:
        stop_node(proc)
        probe.close()
    assert proc.returncode == 0 and "Traceback" not in log.read_text(), log.read_text()


def test_unknown_backend_value_and_unconfigured_diagnostics(tiny_llava, tmp_path) -> None:
    result = subprocess.run(
        [str(_exe()), "--ros-args", "-p", f"model_id:={tiny_llava}", "-p", "backend:=grpc"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and "backend" in lines[0], lines


def _exe():
    from node_harness import node_executable

    return node_executable()
