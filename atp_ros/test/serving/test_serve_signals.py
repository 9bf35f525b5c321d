"""``atp-serve`` stopped by SIGTERM (systemd, docker stop, a launch file) ends as cleanly as Ctrl-C:
exit 0, no stack dump, no Ray process of its instance left behind; and that instance listens on
loopback only."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
from test_serve import _atp_serve, _ready_line  # the Ctrl-C test's helpers


def _descendants(pid: int) -> dict[int, str]:
    """Every live process below ``pid``: ``{pid: command line}`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while we looked
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = {}, [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out[child] = _cmdline(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent has not collected it yet


def _listening(pids: set[int]) -> list[str]:
    """The local addresses ``pids`` listen on (TCP), from ``ss``."""
    table = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    return [
        line.split()[3] for line in table.splitlines() if any(int(p) in pids for p in re.findall(r"pid=(\d+)", line))
    ]


def test_atp_serve_on_sigterm_exits_0_and_leaves_no_ray_process(tmp_path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("app: atp_sigterm_test\nray:\n  num_cpus: 1\nmodel:\n  device: cpu\n")
    with open(tmp_path / "stderr.txt", "w") as err:
        server = subprocess.Popen(
            [str(_atp_serve()), "--config", str(config)], stdout=subprocess.PIPE, stderr=err, text=True
        )
    started: dict[int, str] = {}
    try:
        ready = _ready_line(server, 240)
        assert ready, (tmp_path / "stderr.txt").read_text()[-2000:]
        assert "ray.address:=127.0.0.1:" in ready  # a local instance binds to loopback
        started = _descendants(server.pid)
        assert any("raylet" in cmd for cmd in started.values()), started
        listening = _listening(set(started) | {server.pid})
        outside = [addr for addr in listening if not re.match(r"(\[::ffff:)?127\.0\.0\.1\]?:", addr)]
        assert listening and not outside, " ".join(listening)
        server.send_signal(signal.SIGTERM)
        rc = server.wait(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        left = _left_behind(started or _descendants(server.pid))
    stderr = (tmp_path / "stderr.txt").read_text()
    assert rc == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "SIGTERM received" not in stderr, stderr[-3000:]
    assert not left, left


def _left_behind(started: dict[int, str]) -> dict[int, str]:
    """Those of ``started`` still alive after a grace period; they are killed (the machine stays clean)."""
    deadline = time.monotonic() + 30  # Ray's agents may take a moment after the driver ended
    while (left := {pid: cmd for pid, cmd in started.items() if _alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left
