"""A clean exit, every time (issue 23, section 1): signals in every lifecycle state, over DDS.

The installed node is signalled the way a terminal, ``ros2 launch`` and a supervisor do: one
SIGINT, two SIGINTs in quick succession (the terminal's Ctrl-C reaches the process group and
launch forwards another), and SIGTERM; in ``unconfigured``, ``inactive``, ``active`` while idle,
``active`` while a camera streams at 30 Hz, during a long decode, and during a transition (a
``configure`` that is loading the model). Every round must exit by itself with code 0 and
without a traceback. ``ATP_STRESS_REPEAT=N`` repeats every round N times.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("atp_ros_msgs.msg")

from atp_ros.testing.tiny.llava import save_tiny_llava  # noqa: E402
from atp_ros.warehouse.scenes import render_scene  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState  # noqa: E402
from node_harness import Probe, image_msg, new_namespace, start_node  # noqa: E402
from std_msgs.msg import String  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.dds]
STATES = ("unconfigured", "inactive", "active", "streaming", "decoding", "configuring")
SIGNALS = {"SIGINT": (signal.SIGINT,), "SIGINTx2": (signal.SIGINT, signal.SIGINT), "SIGTERM": (signal.SIGTERM,)}
REPEAT = int(os.environ.get("ATP_STRESS_REPEAT", "1"))
EXITS: list[tuple[str, float]] = []  # (round, seconds from the first signal to exit), printed at the end


@pytest.fixture(scope="module")
def talker(tmp_path_factory):
    """A random LLaVA that never says EOS: an answer runs to max_new_tokens (a long decode)."""
    return save_tiny_llava(tmp_path_factory.mktemp("talker") / "ckpt", text_hidden=256, text_layers=6)


def _stream(probe: Probe, stop: threading.Event) -> None:
    rgb = render_scene(5, 120, 160).rgb
    i = 0
    while not stop.is_set():
        probe.pub_image.publish(image_msg(rgb, 1_000_000_000 + i))
        i += 1
        time.sleep(1 / 30)


def _reach(state: str, probe: Probe, proc, log, stop: threading.Event) -> None:
    """Bring the node into ``state`` (it was started with autostart only for the active states)."""
    if state in ("unconfigured", "inactive", "configuring"):
        probe.wait_for(probe.get_state_client.service_is_ready, 60, "lifecycle services")
        if state == "inactive":
            assert probe.transition("configure")
        elif state == "configuring":  # signal while configure loads the model on an executor thread
            request = ChangeState.Request(transition=Transition(id=Transition.TRANSITION_CONFIGURE))
            probe.change_state_client.call_async(request)
            time.sleep(0.05)
        return
    probe.wait_ready(proc, log)
    if state == "streaming":
        probe.pub_query.publish(String(data="is the aisle clear?"))
        threading.Thread(target=_stream, args=(probe, stop), daemon=True).start()
        probe.wait_for(lambda: int(probe.status_values().get("frames_processed", 0)) > 0, 30, "answers")
    elif state == "decoding":
        probe.pub_query.publish(String(data="describe everything you see"))
        threading.Thread(target=_stream, args=(probe, stop), daemon=True).start()
        probe.wait_for(lambda: float(probe.status_values().get("in_flight_ms", 0)) > 500, 60, "a long decode")


@pytest.mark.parametrize("repeat", range(REPEAT))
@pytest.mark.parametrize("signals", list(SIGNALS))
@pytest.mark.parametrize("state", STATES)
def test_every_signal_in_every_state_exits_cleanly(state, signals, repeat, tiny_llava, talker, ros_ctx, tmp_path):
    ns = new_namespace()
    log = tmp_path / "node.log"
    model, overrides = (talker, {"max_new_tokens": 1024}) if state == "decoding" else (tiny_llava, {})
    autostart = state in ("active", "streaming", "decoding")
    proc = start_node(model, ns, log, autostart=autostart, **overrides)
    probe = Probe(ros_ctx, ns)
    stop = threading.Event()
    try:
        _reach(state, probe, proc, log, stop)
        start = time.monotonic()
        for sig in SIGNALS[signals]:
            proc.send_signal(sig)
            time.sleep(0.02)
        try:
            proc.wait(timeout=30)  # by itself: no kill in this test
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{state}/{signals}: still running 30 s after the signal") from None
        EXITS.append((f"{state}/{signals}", time.monotonic() - start))
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        probe.close()
    text = log.read_text()
    assert proc.returncode == 0, f"{state}/{signals}: exit {proc.returncode}\n{text[-3000:]}"
    assert "Traceback" not in text and "RCLError" not in text, text[-3000:]


def teardown_module() -> None:
    if EXITS:
        worst = max(EXITS, key=lambda e: e[1])
        print(f"\n{len(EXITS)} signalled exits, slowest {worst[1]:.2f} s ({worst[0]})")


SPIN_SCRIPT = """
import os, signal, sys, threading
import rclpy
from rclpy.executors import MultiThreadedExecutor
from atp_ros.ros.callbacks import install_signal_handlers, spin

install_signal_handlers()
try:
    os.kill(os.getpid(), signal.SIGINT)  # outside spin: a KeyboardInterrupt, so a long load is cut short
    raise SystemExit("no KeyboardInterrupt outside spin")
except KeyboardInterrupt:
    pass
rclpy.init()  # its handler chains to ours
node = rclpy.create_node("signal_probe")
node.create_timer(0.001, lambda: None)  # the executor builds a Task every millisecond
executor = MultiThreadedExecutor(num_threads=2)
executor.add_node(node)
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIG%s)).start()
spin(node, executor)  # returns: no KeyboardInterrupt raised wherever the main thread was
print("spin returned", rclpy.ok(), flush=True)
executor.shutdown()
node.destroy_node()
"""


@pytest.mark.parametrize("sig", ["INT", "TERM"])
def test_a_signal_ends_spin_without_an_exception(sig) -> None:
    """rclpy's handler chains to ours: the context shuts down and ``spin`` returns, no KeyboardInterrupt
    landing halfway through building an rclpy Task (whose ``__del__`` then printed a traceback on exit)."""
    env = {**os.environ, "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}
    proc = subprocess.run(
        [sys.executable, "-c", SPIN_SCRIPT % sig], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "spin returned False" in proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
