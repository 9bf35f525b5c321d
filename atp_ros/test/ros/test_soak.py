"""Soak, short version (#12): 60 s of 30 Hz 640x480 frames through ``vlm_node`` by ``atp_ros.ros.soak``.

The same code path as ``make soak`` (``python -m atp_ros.ros.soak`` in its own process, the node in another),
asserting behaviour only: the node stays up and exits 0 on SIGINT, answers keep coming, the
frame counters add up, resident memory does not grow after warm-up. No timed assertion: the
script's rate figure is reported, not asserted here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.dds

MAX_GROWTH = 0.05


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGINT the script's process group (the script and the node it started), SIGKILL what is left."""
    pgid = proc.pid  # its own session: the group id is its pid
    for sig, grace in ((signal.SIGINT, 20.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the script: a zombie still counts as a member of the group
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


@pytest.mark.ros
@pytest.mark.slow
def test_soak_one_minute(tmp_path: Path) -> None:
    pytest.importorskip("rclpy")
    log = tmp_path / "node.log"
    cmd = [sys.executable, "-m", "atp_ros.ros.soak", "--minutes", "1", "--warmup-s", "20", "--window-s", "20"]
    cmd += ["--out", str(tmp_path), "--log", str(log)]
    # Its own session: the finally below can end the script and the node it started, and nothing else.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=os.environ.copy()
    )
    try:
        output, _ = proc.communicate(timeout=420)
        result = tmp_path / "soak.json"
        assert result.is_file(), f"the soak wrote no soak.json (exit {proc.returncode}):\n{output[-3000:]}"
        fig = json.loads(result.read_text())
        node_log = log.read_text()[-2000:] if log.is_file() else "(no node log)"
        context = f"\n{(tmp_path / 'soak.md').read_text()}\nnode log tail:\n{node_log}"

        node = fig["node"]
        assert node["died_at_s"] is None, f"the node died {node['died_at_s']} s into the stream{context}"
        assert node["alive_before_sigint"], f"the node was not alive at the end{context}"
        assert node["exit_code"] == 0, f"exit code {node['exit_code']} after SIGINT{context}"

        per_window = fig["answers_per_window"]
        assert len(per_window) == 3 and min(per_window) > 0, f"answers per 20-s window: {per_window}{context}"

        # Every received frame is processed, dropped (replaced in the slot), skipped (no query) or
        # failed, once the worker is idle; while streaming, only the few frames between counters differ.
        assert node["idle"]["reached"], f"the worker did not go idle after the stream{context}"
        errors = sum(fig["errors"].values())
        accounted = fig["frames_processed"] + fig["frames_dropped"] + fig["frames_skipped_no_query"] + errors
        assert fig["frames_received"] > 0 and fig["frames_processed"] > 0, context
        assert fig["frames_received"] == accounted, f"received {fig['frames_received']} != {accounted}{context}"
        assert fig["targets"]["counters"]["pass"], fig["targets"]["counters"]["why"] + context

        for source, memory in fig["memory"].items():
            assert memory["growth"] is not None, f"no {source} RSS samples{context}"
            assert memory["growth"] <= MAX_GROWTH, (
                f"{source} RSS grew {memory['growth']:.1%} after warm-up "
                f"({memory['warmup_mb']} -> {memory['end_mb']} MB){context}"
            )
    finally:
        _stop_group(proc)
