"""The loop's executables as child processes (``cell_sim``, ``pick_planner``, ``vlm_node``), as the evaluation, the
demo and the tests start them: the command line, the Fast DDS profile on the sender's side, logs, Ctrl-C to stop.
No rclpy import here (see :mod:`atp_ros.ros.process` for the perception node's own helpers, reused here)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from atp_ros.ros import process

CAMERA_TOPIC = "camera/image_raw"  # the simulator's camera, remapped onto the perception node's 'image'


def command(executable: str, namespace: str, params: Mapping[str, Any], remaps: Sequence[str] = ()) -> list[str]:
    """``<executable> --ros-args`` in ``namespace`` with ``-r`` remaps and ``-p name:=value`` per parameter (lists
    as ``[a, b]``, booleans as ``true``/``false``; empty strings left out)."""
    exe = process.node_executable().with_name(executable)
    cmd = [str(exe), "--ros-args", "-r", f"__ns:={namespace}"]
    for remap in remaps:
        cmd += ["-r", remap]
    for name, value in params.items():
        if isinstance(value, str) and value == "":
            continue
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, list | tuple):
            floats = any(isinstance(v, float) for v in value)  # one type per ROS array: [0, 1.5] -> [0.0, 1.5]
            text = "[" + ", ".join(repr(float(v)) if floats else str(v) for v in value) + "]"
        else:
            text = str(value)
        cmd += ["-p", f"{name}:={text}"]
    return cmd


def start(
    executable: str, namespace: str, params: Mapping[str, Any], log: Path, remaps: Sequence[str] = ()
) -> subprocess.Popen:
    """Start one of the package's executables, its output to ``log``; stop it with :func:`stop`."""
    environment = dict(os.environ)
    environment |= process.dds_profile_env(environment)  # the simulator sends camera frames
    environment.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        return subprocess.Popen(
            command(executable, namespace, params, remaps),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environment,
            preexec_fn=process._default_sigint,
        )


def start_sim(namespace: str, log: Path, **params: Any) -> subprocess.Popen:
    """``cell_sim`` in ``namespace`` (``camera.position`` style names as ``camera__position``)."""
    return start("cell_sim", namespace, {k.replace("__", "."): v for k, v in params.items()}, log)


def start_perception(namespace: str, model: str, log: Path, **params: Any) -> subprocess.Popen:
    """``vlm_node`` on the simulator's camera in ``namespace`` (``atp.keep_ratio`` as ``atp__keep_ratio``)."""
    values = {"model_id": model} | {k.replace("__", "."): v for k, v in params.items()}
    return start("vlm_node", namespace, values, log, remaps=[f"image:={CAMERA_TOPIC}"])


def start_planner(namespace: str, log: Path, **params: Any) -> subprocess.Popen:
    """``pick_planner`` in ``namespace`` (its ``task`` parameter runs once at start)."""
    return start("pick_planner", namespace, {k.replace("__", "."): v for k, v in params.items()}, log)


stop = process.stop_node
log_tail = process.log_tail
