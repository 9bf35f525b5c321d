"""The installed ``vlm_node`` as a child process: its command line, starting it, stopping it like Ctrl-C,
and the Fast DDS profile that lets large frames through (both sides of a camera topic need it).

Used by the demos, the live replay of ``evaluate``, the soak and the tests; the rclpy side (publishing
frames, recording answers, readiness) is :mod:`atp_ros.ros.client`. No rclpy import here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PROFILE_FILE = "fastdds_large_frames.xml"  # in the package's share/config/
PROFILE_VARS = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE")  # Jazzy+ / Humble spelling
OPT_OUT = "ATP_ROS_DDS_PROFILE"  # "0": keep Fast DDS's defaults in the tools (demo, replay, soak, benches, tests)


def dds_profile() -> Path:
    """The shipped Fast DDS profile for large frames (shared memory sized for 1080p, large socket buffers)."""
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory("atp_ros")) / "config" / PROFILE_FILE


def dds_profile_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables that select :func:`dds_profile` for a process, or {} when the user chose their own
    profile (``FASTDDS_DEFAULT_PROFILES_FILE`` set) or opted out (``ATP_ROS_DDS_PROFILE=0``)."""
    environ = os.environ if environ is None else environ
    if environ.get(OPT_OUT, "1") == "0" or any(environ.get(v) for v in PROFILE_VARS):
        return {}
    return {profile_var(environ): str(dds_profile()), "RMW_FASTRTPS_USE_QOS_FROM_XML": "0"}


def profile_var(environ: Mapping[str, str] | None = None) -> str:
    """The variable this distro's Fast DDS reads: one only (both would load the profile twice, and
    Jazzy and later warn that the old spelling is deprecated)."""
    environ = os.environ if environ is None else environ
    return PROFILE_VARS[1] if environ.get("ROS_DISTRO", "").lower() == "humble" else PROFILE_VARS[0]


def use_dds_profile() -> None:
    """Select the large-frame profile for THIS process; call before its first rclpy context is initialized
    (Fast DDS reads profiles once, when the process creates its first participant)."""
    os.environ.update(dds_profile_env())


def node_executable() -> Path:
    """The ``vlm_node`` script colcon installed (``lib/atp_ros/vlm_node`` of the sourced install space)."""
    from ament_index_python.packages import get_package_prefix

    return Path(get_package_prefix("atp_ros")) / "lib" / "atp_ros" / "vlm_node"


def node_command(namespace: str, params: Mapping[str, Any], remaps: Sequence[str] = ()) -> list[str]:
    """``vlm_node --ros-args`` in ``namespace`` with ``-r`` ``remaps`` and ``-p name:=value`` per parameter.

    Booleans are written as ROS does (``true``/``false``); empty strings are left out (the node's default).
    """
    cmd = [str(node_executable()), "--ros-args", "-r", f"__ns:={namespace}"]
    for remap in remaps:
        cmd += ["-r", remap]
    for name, value in params.items():
        if isinstance(value, str) and value == "":
            continue
        cmd += ["-p", f"{name}:={str(value).lower() if isinstance(value, bool) else value}"]
    return cmd


def start_node(
    namespace: str,
    params: Mapping[str, Any],
    remaps: Sequence[str] = (),
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen:
    """Start ``vlm_node`` (see :func:`node_command`), its output to ``log`` (else inherited).

    Its SIGINT disposition is the default even when this process was started in the background
    (where children inherit SIGINT ignored): :func:`stop_node` sends it Ctrl-C.
    """
    cmd = node_command(namespace, params, remaps)
    environment = dict(os.environ if env is None else env)
    environment |= dds_profile_env(environment)  # the node sends overlays; frames need it on the sender's side
    if log is None:
        return subprocess.Popen(cmd, env=environment, preexec_fn=_default_sigint)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=environment, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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


def log_tail(log: Path | None, chars: int = 2000) -> str:
    """The end of a node's log, or why there is none."""
    if log is None:
        return "(output not captured)"
    try:
        return log.read_text()[-chars:]
    except OSError:
        return "(no log)"
