"""The installed ``vlm_node`` as a child process: where it is and how to stop it like Ctrl-C.

Used by the demo, the live replay of ``evaluate`` and the tests; no rclpy import here.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def node_executable() -> Path:
    """The ``vlm_node`` script colcon installed (``lib/atp_ros/vlm_node`` of the sourced install space)."""
    from ament_index_python.packages import get_package_prefix

    return Path(get_package_prefix("atp_ros")) / "lib" / "atp_ros" / "vlm_node"


def stop_node(proc: subprocess.Popen, timeout: float = 10.0) -> float:
    """SIGINT the node like Ctrl-C; returns seconds until it exited (killed after ``timeout``)."""
    if proc.poll() is not None:
        return 0.0
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return time.monotonic() - start
