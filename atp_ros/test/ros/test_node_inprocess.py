"""The atp_vlm node's lifecycle transitions and parameters, in this process: no second process, no DDS.

Each test creates a ``VlmNode`` with ``autostart`` off in an rclpy context of its own, triggers its
transitions directly (``trigger_configure`` ...) and changes parameters with ``set_parameters``,
then looks at what the node shows: its state, backend and worker, its parameters, and the topics it
publishes and subscribes in the ROS graph of this process. What crosses processes (answers on
topics, the lifecycle and parameter services, signals) is tested over DDS in the other modules.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("atp_ros_msgs.msg")

from atp_ros.ros.node import VlmNode  # noqa: E402
from rclpy.exceptions import ParameterException  # noqa: E402
from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

pytestmark = pytest.mark.ros
SUCCESS, FAILURE, ERROR = (
    TransitionCallbackReturn.SUCCESS,
    TransitionCallbackReturn.FAILURE,
    TransitionCallbackReturn.ERROR,
)
_namespaces = itertools.count()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def make_node(ros_ctx) -> Iterator[Callable[..., VlmNode]]:
    """``make_node(model_id, **params)``: a VlmNode in its own namespace, ``autostart`` off unless given
    (``a__b`` stands for ``a.b``); every node made is stopped and destroyed after the test."""
    nodes: list[VlmNode] = []

    def make(model_id: Path | str, **overrides) -> VlmNode:
        values = {"model_id": str(model_id), "autostart": False} | {
            k.replace("__", "."): v for k, v in overrides.items()
        }
        node = VlmNode(
            context=ros_ctx,
            namespace=f"/atp_inproc{os.getpid()}_{next(_namespaces)}",
            parameter_overrides=[Parameter(name, value=value) for name, value in values.items()],
        )
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()
        node.destroy_node()


def topic(node: VlmNode, name: str) -> str:
    return node.resolve_topic_name(name)


def frame(seed: int = 0, h: int = 48, w: int = 64) -> Image:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image(height=h, width=w, encoding="rgb8", step=3 * w, data=rgb.tobytes())


def ask_error(node: VlmNode) -> str:
    """Why the worker refuses an ask (it must refuse one)."""
    return str(node.worker.ask("what color is the box?").future.exception(timeout=10))


# ---------------------------------------------------------------- lifecycle


def test_transitions_load_answer_stop_and_release(make_node, tiny_llava) -> None:
    """unconfigured -> configure (model loaded, publishers, no subscriptions) -> activate (subscribed,
    answering) -> deactivate (kept loaded, not answering) -> activate -> cleanup (released) ->
    configure again (reloaded) -> shutdown (finalized)."""
    node = make_node(tiny_llava, max_new_tokens=2)
    answer_topic, image_topic = topic(node, "~/answer"), topic(node, "image")
    assert node.state == "unconfigured" and node.backend is None and node.worker is None
    assert node.trigger_activate() == ERROR and node.state == "unconfigured"  # not a transition from here

    assert node.trigger_configure() == SUCCESS
    assert node.state == "inactive" and node.start_error == ""
    assert node.backend.family == "llava" and node.backend.num_visual_tokens == 64
    assert not node.worker.running and "not active" in ask_error(node)
    wait_until(lambda: node.count_publishers(answer_topic) == 1, "the answer publisher")
    assert node.count_subscribers(image_topic) == 0  # inactive: no frame is taken in

    for _ in range(2):  # activate works again after a deactivate
        assert node.trigger_activate() == SUCCESS
        assert node.state == "active" and node.worker.running
        wait_until(lambda: node.count_subscribers(image_topic) == 1, "the image subscription")
        node.worker.put_frame("", frame())  # no question yet: kept for asks
        outcome = node.worker.ask("what color is the box?").future.result(timeout=120)
        assert len(outcome.result.answers) == 1 and outcome.result.visual_tokens_kept == [16]  # keep_ratio 0.25

        backend = node.backend
        assert node.trigger_deactivate() == SUCCESS
        assert node.state == "inactive" and not node.worker.running and node.backend is backend
        wait_until(lambda: node.count_subscribers(image_topic) == 0, "the image subscription gone")
        assert "not active" in ask_error(node)

    assert node.trigger_cleanup() == SUCCESS
    assert node.state == "unconfigured" and node.backend is None and node.worker is None
    wait_until(lambda: node.count_publishers(answer_topic) == 0, "the answer publisher gone")

    assert node.trigger_configure() == SUCCESS and node.backend is not None  # the model loads again
    assert node.trigger_shutdown() == SUCCESS
    assert node.state == "finalized" and node.backend is None and node.worker is None


@pytest.mark.parametrize(
    "steps", [(), ("configure",), ("configure", "activate")], ids=["unconfigured", "inactive", "active"]
)
def test_shutdown_from_every_state_stops_and_releases(make_node, tiny_llava, steps) -> None:
    node = make_node(tiny_llava)
    for step in steps:
        assert getattr(node, f"trigger_{step}")() == SUCCESS
    worker = node.worker
    assert node.trigger_shutdown() == SUCCESS
    assert node.state == "finalized" and node.backend is None and node.worker is None
    assert worker is None or not worker.running
    assert node.count_subscribers(topic(node, "image")) == 0
    assert node.trigger_configure() == ERROR and node.state == "finalized"  # nothing leaves finalized


@pytest.mark.parametrize(("model_id", "words"), [("", "model_id is empty"), ("missing", "missing")])
def test_failed_configure_stays_unconfigured_and_says_why(make_node, tmp_path, model_id, words) -> None:
    path = str(tmp_path / model_id) if model_id else ""
    node = make_node(path)
    assert node.trigger_configure() == FAILURE
    assert node.state == "unconfigured" and node.backend is None and node.worker is None
    assert words in node.start_error and "\n" not in node.start_error
    assert node.bring_up() == node.start_error  # what autostart reports before exiting
    assert node.trigger_shutdown() == SUCCESS and node.state == "finalized"


# ---------------------------------------------------------------- parameters


def values(node: VlmNode, *names: str) -> list:
    return [node.get_parameter(name).value for name in names]


def test_runtime_changes_apply_whole_in_every_state(make_node, tiny_llava) -> None:
    """A change before configure reaches the worker configure builds; one while active reaches it at once."""
    node = make_node(tiny_llava)
    assert all(r.successful for r in node.set_parameters([Parameter("atp.keep_ratio", value=0.5)]))
    assert node.trigger_configure() == SUCCESS
    assert node.worker.config.atp.keep_ratio == 0.5
    assert node.trigger_activate() == SUCCESS
    changes = {
        "atp.enabled": False,
        "atp.alpha": 0.25,
        "atp.keep_tokens": 9,
        "atp.mass": 0.3,
        "atp.intra_signal": "received",
        "atp.normalization": "zscore",
        "atp.selector": "uniform",
        "atp.positions": "compact",
        "atp.inter_readout": "maskclip",
        "processing.max_rate_hz": 2.0,
    }
    for name, value in changes.items():
        result = node.set_parameters([Parameter(name, value=value)])[0]
        assert result.successful, (name, result.reason)
        assert node.get_parameter(name).value == value
    config = node.worker.config
    atp = config.atp
    assert (atp.enabled, atp.alpha, atp.keep_tokens, atp.mass, atp.keep_ratio) == (False, 0.25, 9, 0.3, 0.5)
    assert (atp.intra_signal, atp.normalization, atp.selector) == ("received", "zscore", "uniform")
    assert (atp.positions, atp.inter_readout) == ("compact", "maskclip")
    assert config.max_rate_hz == 2.0
    assert node.set_parameters([Parameter("use_sim_time", value=True)])[0].successful  # not ours: passes


BAD = [
    ("atp.alpha", 2.0, "alpha"),  # descriptor range
    ("atp.keep_ratio", 0.0, "keep_ratio"),  # the low end itself is invalid
    ("atp.keep_tokens", -1, "keep_tokens"),
    ("atp.intra_signal", "bogus", "intra_signal"),
    ("atp.selector", "magic", "selector"),
    ("atp.positions", "sideways", "positions"),
    ("atp.inter_readout", "magic", "inter_readout"),
    ("atp.normalization", "none_such", "normalization"),
    ("processing.max_rate_hz", -1.0, "max_rate_hz"),
    ("atp.alpha", "high", "type"),
    ("model_id", "other", "read-only"),
    ("max_new_tokens", 3, "read-only"),
]


@pytest.mark.parametrize("configured", [False, True], ids=["unconfigured", "active"])
def test_invalid_changes_are_rejected_and_leave_nothing_behind(make_node, tiny_llava, configured) -> None:
    node = make_node(tiny_llava)
    if configured:
        assert node.bring_up() == ""
    names = [name for name, _bad, _words in BAD]
    before, config = values(node, *names), node.worker.config if configured else None
    for name, bad, words in BAD:
        result = node.set_parameters([Parameter(name, value=bad)])[0]
        assert not result.successful, (name, bad)
        assert words in result.reason, (name, result.reason)
    assert values(node, *names) == before
    if configured:
        assert node.worker.config == config


def test_multi_parameter_change_is_all_or_nothing(make_node, tiny_llava) -> None:
    """``set_parameters_atomically``: one bad value rejects the whole set, a good set lands whole.
    (``set_parameters`` sets each parameter on its own: the good ones of a list land.)"""
    node = make_node(tiny_llava)
    assert node.bring_up() == ""
    before = node.worker.config
    names = ("atp.keep_ratio", "atp.alpha", "atp.selector", "processing.max_rate_hz")
    mixed = [Parameter("atp.keep_ratio", value=0.5), Parameter("atp.alpha", value=0.9)]
    result = node.set_parameters_atomically([*mixed, Parameter("atp.selector", value="magic")])
    assert not result.successful and "selector" in result.reason
    assert node.worker.config == before and values(node, *names) == [0.25, 0.5, "atp", 0.0]
    result = node.set_parameters_atomically([*mixed, Parameter("processing.max_rate_hz", value=2.0)])
    assert result.successful, result.reason
    config = node.worker.config
    assert (config.atp.keep_ratio, config.atp.alpha, config.max_rate_hz) == (0.5, 0.9, 2.0)
    assert config.atp.selector == before.atp.selector and values(node, *names) == [0.5, 0.9, "atp", 2.0]
    one_by_one = node.set_parameters([Parameter("atp.keep_ratio", value=0.75), Parameter("atp.alpha", value=-1.0)])
    assert [r.successful for r in one_by_one] == [True, False]
    assert node.worker.config.atp.keep_ratio == 0.75 and node.worker.config.atp.alpha == 0.9


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("atp.intra_signal", "bogus", "intra_signal"),
        ("atp.keep_ratio", 0.0, "keep_ratio"),
        ("atp.alpha", 2.0, "out of range"),
    ],
)
def test_bad_values_at_construction_raise(make_node, tiny_llava, name, value, words) -> None:
    """What ``vlm_node`` turns into its one FATAL line: our checks raise ValueError, rclpy's ranges a
    ParameterException."""
    with pytest.raises((ValueError, ParameterException), match=words):
        make_node(tiny_llava, **{name.replace(".", "__"): value})
