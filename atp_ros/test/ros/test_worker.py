"""The node's inference worker without ROS: slots per camera, asks first, stop mid-decode, problems.

Real backends throughout (the bundled warehouse-tiny, a tiny random LLaVA that talks for 1024
tokens); the tests supply the worker's ``decode`` callable, and a gate inside it holds the
worker on one frame so that what waits meanwhile is known exactly.
"""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest
from atp_ros.backends import GenerationStopped, load_backend
from atp_ros.method import AtpConfig
from atp_ros.ros.worker import ERROR, OK, WARN, BadInput, InferenceWorker, Problems, RuntimeConfig, check_question
from atp_ros.testing.tiny.llava import save_tiny_llava
from atp_ros.warehouse.scenes import render_scene


@pytest.fixture(scope="module")
def tiny():
    return load_backend("warehouse-tiny")


@pytest.fixture(scope="module")
def talker(tmp_path_factory):
    """A random LLaVA with a wider, deeper LLM that never says EOS: 1024 tokens take tens of seconds on 2 cores."""
    return load_backend(
        str(save_tiny_llava(tmp_path_factory.mktemp("talker") / "ckpt", text_hidden=256, text_layers=6))
    )


class Harness:
    """Frames are ``(name, rgb)``; decode waits at the gate for frames named in ``hold``."""

    def __init__(self, backend, cameras=("",), hold=(), **kwargs) -> None:
        self.answers: list = []
        self.logs: list[tuple[int, str]] = []
        self.gate = threading.Event()
        self.at_gate = threading.Event()
        self.hold = set(hold)
        log = lambda lvl, line: self.logs.append((lvl, line))  # noqa: E731
        self.worker = InferenceWorker(backend, cameras, self.decode, self.answers.append, log, **kwargs)

    def decode(self, payload):
        name, rgb = payload
        if name == "bad":
            raise BadInput("encoding", "unsupported encoding 'yuv9'")
        if name in self.hold:
            self.at_gate.set()
            assert self.gate.wait(30), "gate never opened"
        return rgb

    def feed(self, name: str, rgb: np.ndarray):
        """Put frame ``name`` on the default camera and return the worker's answer to it."""
        n = len(self.answers)
        self.worker.put_frame("", (name, rgb))
        self.wait(lambda: len(self.answers) > n, f"the answer to {name}")
        return self.answers[-1]

    def wait(self, predicate, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)


def scene(seed: int) -> np.ndarray:
    return render_scene(seed, 192, 256).rgb


def test_cameras_take_turns_and_the_newest_frame_wins(tiny) -> None:
    h = Harness(tiny, cameras=("front", "wrist"), hold={"f1"}, max_new_tokens=4)
    try:
        h.worker.start()
        h.worker.set_query("what color is the box?")
        assert h.worker.set_query("is the aisle clear?", "wrist")
        assert not h.worker.set_query("is the aisle clear?", "wrist")  # same question: no change
        h.worker.put_frame("front", ("f1", scene(1)))
        assert h.at_gate.wait(30)
        h.worker.put_frame("front", ("f2", scene(2)))  # replaced by f3 before the worker is free
        h.worker.put_frame("front", ("f3", scene(3)))
        h.worker.put_frame("wrist", ("w1", scene(4)))
        h.gate.set()
        h.wait(lambda: len(h.answers) == 3, "three answers")
        served = [(o.frame.camera, o.frame.payload[0], o.question) for o in h.answers]
        assert served == [
            ("front", "f1", "what color is the box?"),
            ("wrist", "w1", "is the aisle clear?"),  # the other camera's turn comes before front's newer frame
            ("front", "f3", "what color is the box?"),
        ]
        stats = h.worker.stats()
        assert stats["frames_received"] == 4 and stats["frames_processed"] == 3
        assert stats["frames_dropped"] == 1
        assert stats["front.frames_dropped"] == 1 and stats["wrist.frames_dropped"] == 0
    finally:
        h.gate.set()
        assert h.worker.stop()


def test_an_ask_goes_before_waiting_frames_and_reports_why_it_fails(tiny) -> None:
    h = Harness(tiny, hold={"a"}, max_new_tokens=4)
    try:
        early = h.worker.ask("what color is the box?")
        assert isinstance(early.future.exception(), BadInput) and "not active" in str(early.future.exception())
        h.worker.start()
        no_frame = h.worker.ask("what color is the box?")
        assert "no frame received yet" in str(no_frame.future.exception(timeout=30))
        h.worker.set_query("how many boxes are on the floor?")
        h.worker.put_frame("", ("a", scene(5)))
        assert h.at_gate.wait(30)
        h.worker.put_frame("", ("b", scene(6)))  # waits in the slot
        ticket = h.worker.ask("  what color is the box?  ")
        h.gate.set()
        outcome = ticket.future.result(timeout=60)
        h.wait(lambda: len(h.answers) == 2, "the streamed frames")
        assert outcome.question == "what color is the box?" and outcome.frame.payload[0] == "b"  # newest frame
        assert [o.frame.payload[0] for o in h.answers] == ["a", "b"]
        assert outcome.started < h.answers[1].started  # the ask ran before the waiting frame
        assert outcome.result.answers == tiny.answer([scene(6)], "what color is the box?", max_new_tokens=4).answers
        for question, camera, age, words in (
            ("", "", 0.0, "empty question"),
            ("x" * 600, "", 0.0, "limits.max_query_chars=512"),
            ("anything?", "left", 0.0, "unknown camera 'left'"),
            ("anything?", "", 1e-6, "max_age_s"),
        ):
            err = h.worker.ask(question, camera, age).future.exception(timeout=30)
            assert isinstance(err, BadInput) and words in str(err), (question, err)
        assert h.worker.stats()["asks_answered"] == 1
    finally:
        h.gate.set()
        assert h.worker.stop()


def test_stop_and_cancel_end_a_long_decode_within_tokens(talker) -> None:
    h = Harness(talker, max_new_tokens=1024)
    try:
        h.worker.start()
        h.worker.put_frame("", ("a", np.zeros((64, 64, 3), np.uint8)))  # no query yet: skipped, kept for asks
        h.wait(lambda: h.worker.stats().get("frames_skipped_no_query") == 1, "the frame skipped")
        # Cancel once the ask has run a while; on a loaded machine the tower alone may take that
        # long, and the cancel then lands before the decode: wait longer and ask again.
        for wait_ms in (500, 2000, 8000):
            ticket = h.worker.ask("say something long")
            h.wait(lambda w=wait_ms: h.worker.stats()["in_flight_ms"] > w, "the ask well under way")
            ticket.cancel()
            err = ticket.future.exception(timeout=120)
            assert isinstance(err, GenerationStopped)
            tokens = re.search(r"mid-decode after (\d+) new tokens", str(err))
            if tokens:
                break
        assert tokens and int(tokens.group(1)) < 1024, err  # the stopping criterion ended generate early

        h.worker.set_query("say something long")
        h.worker.put_frame("", ("b", np.zeros((64, 64, 3), np.uint8)))
        h.wait(lambda: h.worker.stats()["in_flight_ms"] > 500, "the frame well under way")
        assert h.worker.stop(timeout=60)
        stopped = [line for _lvl, line in h.logs if "inference stopped" in line]
        assert len(stopped) == 1, h.logs  # mid-decode, or before it on a machine slow enough
        assert h.answers == [] and not h.worker.running
        assert "not active" in str(h.worker.ask("anything?").future.exception())
    finally:
        h.worker.stop()


def test_bad_frames_and_a_failing_model_step_are_counted_and_logged_once_per_cause(tiny) -> None:
    h = Harness(tiny, max_new_tokens=2)
    real = tiny.answer
    calls: list[int] = []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    try:
        h.worker.start()
        h.worker.set_query("what color is the box?")
        for i in range(12):
            h.worker.put_frame("", ("bad", None))
            h.wait(lambda i=i: h.worker.stats().get("errors.encoding") == i + 1, "the bad frame counted")
        tiny.answer = failing_once
        h.worker.put_frame("", ("oom", scene(7)))
        h.wait(lambda: h.worker.stats().get("errors.model") == 1, "the model error counted")
        h.worker.put_frame("", ("ok", scene(8)))
        h.wait(lambda: len(h.answers) == 1, "the next frame answered")
    finally:
        del tiny.answer  # back to the class's method: the backend is shared by the module's tests
        h.worker.stop()
    assert h.answers[0].frame.payload[0] == "ok"
    lines = [line for _lvl, line in h.logs if line.startswith("[encoding]")]
    assert lines == ["[encoding] frame skipped: unsupported encoding 'yuv9'", "[encoding] 10 times so far, latest: "
                     "frame skipped: unsupported encoding 'yuv9'"]  # fmt: skip
    assert [lvl for lvl, line in h.logs if line.startswith("[model]")] == [ERROR]
    assert set(h.worker.problems.recent(60)) == {"encoding", "model"}


def test_problems_log_the_first_then_each_power_of_ten() -> None:
    problems = Problems()
    logged = [n for n in range(1, 1201) if problems.report("crc", WARN, f"bad #{n}")]
    assert logged == [1, 10, 100, 1000]
    assert problems.counts() == {"crc": 1200} and problems.recent(60)["crc"].message == "bad #1200"


def test_config_is_replaced_whole_and_questions_are_checked(tiny) -> None:
    h = Harness(tiny)
    config = RuntimeConfig(AtpConfig(keep_ratio=0.5), max_rate_hz=2.0)
    h.worker.set_config(config)
    assert h.worker.config == config
    with pytest.raises(ValueError):
        h.worker.set_config(RuntimeConfig(AtpConfig(selector="magic")))
    assert h.worker.config == config
    assert check_question("  where?  ", 10) == "where?"
    for text, cause in (("   ", "query_empty"), ("x" * 11, "query_too_long")):
        with pytest.raises(BadInput) as err:
            check_question(text, 10)
        assert err.value.cause == cause
    h.worker.set_query("first?")
    with pytest.raises(BadInput):
        h.worker.set_query("")
    assert h.worker.query("") == "first?"  # a rejected question keeps the previous one
    with pytest.raises(ValueError, match="distinct"):
        InferenceWorker(tiny, ["a", "a"], h.decode, print, print)
    assert OK == 0 and WARN == 1 and ERROR == 2  # = diagnostic_msgs/DiagnosticStatus levels


def reuse_harness(backend, mode: str, refresh_frames: int) -> Harness:
    """A worker at keep 0.25 with ``reuse.mode`` ``mode`` (no refresh by time)."""
    from atp_ros.stream import ReuseConfig

    reuse = ReuseConfig(mode=mode, refresh_frames=refresh_frames, refresh_s=600.0)
    return Harness(backend, config=RuntimeConfig(atp=AtpConfig(keep_ratio=0.25), reuse=reuse), max_new_tokens=4)


def invert_first_kept_patch(rgb: np.ndarray, result) -> np.ndarray:
    """``rgb`` with the pixels of the first patch ``result`` kept inverted: something new where ATP looked."""
    kept = result.keep_mask(0).astype(bool)
    r, c = np.argwhere(kept)[0]
    x0, y0, x1, y1 = (int(v) for v in result.views[0].cell(int(r), int(c), kept.shape))
    out = rgb.copy()
    out[y0:y1, x0:x1] = 255 - out[y0:y1, x0:x1]
    return out


def test_answer_reuse_republishes_only_while_the_watched_patches_hold(tiny) -> None:
    h = reuse_harness(tiny, "answer", refresh_frames=3)
    still, feed = scene(7), h.feed
    try:
        h.worker.start()
        h.worker.set_query("what color is the box?")
        first = feed("a", still)
        assert first.reuse is None, "the first frame runs the model"
        again = [feed(f"b{i}", still) for i in range(3)]
        assert all(o.reuse is not None and o.result is first.result for o in again)
        assert [o.reuse.frames_since_full for o in again] == [1, 2, 3]
        assert feed("c", still).reuse is None, "after refresh_frames reused frames, a full run"
        h.worker.set_query("is the aisle clear?")
        assert feed("d", still).reuse is None, "a new question is never answered from the cache"
        changed = invert_first_kept_patch(still, h.answers[-1].result)
        assert feed("e", changed).reuse is None, "a change in a kept patch runs the model"
        assert h.worker.stats()["frames_reused"] == 3
        h.worker.set_config(RuntimeConfig(atp=AtpConfig(keep_ratio=0.25)))  # reuse off: every frame runs
        assert feed("f", changed).reuse is None and feed("g", changed).reuse is None
    finally:
        h.worker.stop()


def test_token_reuse_reruns_the_tower_on_changed_patches_only(tiny) -> None:
    h = reuse_harness(tiny, "tokens", refresh_frames=30)
    still, feed = scene(7), h.feed
    try:
        h.worker.start()
        h.worker.set_query("what color is the box?")
        first = feed("a", still)
        assert first.reuse is None and "frames_token_reuse" not in h.worker.stats(), "the first frame runs it all"
        changed = invert_first_kept_patch(still, first.result)
        second = feed("b", changed)
        assert second.reuse is None, "a kept patch changed: the model runs ..."
        assert h.worker.stats()["frames_token_reuse"] == 1, "... with the tower re-run on the changed patches"
        h.worker.set_query("is the aisle clear?")
        assert feed("c", changed).reuse is None, "a new question runs the model (its tower from the cache)"
        assert h.worker.stats()["frames_token_reuse"] == 2
        assert feed("d", changed).reuse is not None, "and answer reuse still applies on top"
    finally:
        h.worker.stop()
