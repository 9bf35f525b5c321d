"""The middleware works: a String published here is received by an rclpy node in another process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

rclpy = pytest.importorskip("rclpy")
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from std_msgs.msg import String  # noqa: E402

pytestmark = pytest.mark.dds

LISTENER = textwrap.dedent(
    """
    import sys
    import rclpy
    from std_msgs.msg import String

    rclpy.init()
    node = rclpy.create_node("smoke_listener")
    got = []
    node.create_subscription(String, "atp_smoke", lambda m: got.append(m.data), 10)
    print("ready", flush=True)
    deadline = node.get_clock().now().nanoseconds + 20_000_000_000
    while not got and node.get_clock().now().nanoseconds < deadline:
        rclpy.spin_once(node, timeout_sec=0.1)
    print("received:" + (got[0] if got else "<nothing>"), flush=True)
    node.destroy_node()
    rclpy.shutdown()
    sys.exit(0 if got else 1)
    """
)


def test_string_crosses_processes_over_dds(rclpy_context) -> None:
    listener = subprocess.Popen(
        [sys.executable, "-c", LISTENER], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert listener.stdout.readline().strip() == "ready"
        node = rclpy.create_node("smoke_talker", context=rclpy_context)
        executor = SingleThreadedExecutor(context=rclpy_context)
        executor.add_node(node)
        pub = node.create_publisher(String, "atp_smoke", 10)
        deadline = time.monotonic() + 20.0
        # Publish until the listener has matched and exited (discovery takes a moment).
        while listener.poll() is None and time.monotonic() < deadline:
            pub.publish(String(data="hello from atp_ros"))
            executor.spin_once(timeout_sec=0.1)
        out = listener.communicate(timeout=5)[0]
        assert listener.returncode == 0, out
        assert "received:hello from atp_ros" in out
        node.destroy_node()
    finally:
        if listener.poll() is None:
            listener.kill()
