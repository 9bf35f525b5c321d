"""Frames that arrive (issue 23, section 2), over real Fast DDS between processes.

A camera in its own process streams 640x480 rgb8 frames at 30 Hz into the installed node: with
the shipped profile on both sides every frame arrives; with Fast DDS's defaults on the camera's
side frames are lost in transport, and the node counts them in /diagnostics (the subscription's
message-lost event) and says once what to set.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("atp_ros_msgs.msg")

from node_harness import Probe, running_node  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.dds]
FRAMES = 90

CAMERA = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image
    topic, frames = sys.argv[1], int(sys.argv[2])
    rclpy.init()
    node = rclpy.create_node("camera")
    pub = node.create_publisher(Image, topic, qos_profile_sensor_data)
    deadline = time.monotonic() + 30
    while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    data = np.random.default_rng(0).integers(0, 255, 480 * 640 * 3, dtype=np.uint8).tobytes()
    msg = Image(height=480, width=640, encoding="rgb8", step=640 * 3, data=data)
    start = time.monotonic()
    for i in range(frames):
        msg.header.stamp.sec, msg.header.stamp.nanosec = 1 + i, 0
        pub.publish(msg)
        time.sleep(max(0.0, start + (i + 1) / 30 - time.monotonic()))
    time.sleep(1.0)
    rclpy.shutdown()
    """
)


def _camera(topic: str, profile: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if "PROFILES_FILE" not in k and k != "RMW_FASTRTPS_USE_QOS_FROM_XML"}
    env["ATP_ROS_DDS_PROFILE"] = "1" if profile else "0"
    if profile:
        from atp_ros.ros.process import dds_profile_env

        env |= dds_profile_env(env)
    return subprocess.run([sys.executable, "-c", CAMERA, topic, str(FRAMES)], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


@pytest.fixture
def node(tiny_llava, ros_ctx, tmp_path):
    log = tmp_path / "node.log"
    with running_node(tiny_llava, ros_ctx, log, max_new_tokens=2) as (probe, proc):  # with the shipped profile
        yield probe, proc, log


def _settled(probe: Probe, key: str) -> int:
    time.sleep(2.5)  # two diagnostics periods after the last frame
    return int(probe.status_values().get(key, 0))


def test_with_the_profile_on_both_sides_every_frame_arrives(node) -> None:
    probe, proc, log = node
    result = _camera(f"{probe.ns}/image", profile=True)
    assert result.returncode == 0, result.stderr
    received = _settled(probe, "frames_received")
    assert received >= 0.95 * FRAMES, (received, probe.status_values())
    assert int(probe.status_values().get("frames_lost", 0)) == 0


def test_frames_lost_in_transport_are_counted_and_explained(node) -> None:
    probe, proc, log = node
    result = _camera(f"{probe.ns}/image", profile=False)  # a driver left on Fast DDS's defaults
    assert result.returncode == 0, result.stderr
    lost, received = _settled(probe, "frames_lost"), int(probe.status_values().get("frames_received", 0))
    assert received < FRAMES, "the defaults carried every frame: nothing to report here"
    if lost == 0:
        pytest.skip(f"no sample reached the node at all ({received} received): no gap to report")
    assert "frames_lost" in probe.status_values() and proc.poll() is None
    text = log.read_text()
    assert "frame(s) lost in transport" in text and "fastdds_large_frames.xml" in text
    assert text.count("[frames_lost]") <= 3  # once, then at the 10th, 100th... occurrence
