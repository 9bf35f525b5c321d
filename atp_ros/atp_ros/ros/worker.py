"""The inference worker of the atp_vlm node, without ROS: frames in, answers out.

The node (``vlm_node``) is the ROS adapter around :class:`InferenceWorker`: its
subscription callbacks call :meth:`InferenceWorker.put_frame` / :meth:`set_query`, its
``~/ask`` action and service call :meth:`ask`, and the worker hands every answer to the
node's ``on_answer`` callback, which publishes it. Everything here is tested without DDS.

- One latest-frame slot per camera: a new frame replaces an unprocessed one (counted as
  dropped), so a slow model never builds a queue; cameras are served in turn.
- One thread runs the model. Asks go first (a priority queue), frames after them, at
  most ``RuntimeConfig.max_rate_hz`` frames per second.
- A stop hook reaches into the decode: :meth:`stop`, :meth:`pause` and a cancelled ask end
  a running ``generate`` within one token (``GenerationStopped``), not after
  ``max_new_tokens``.
- Problems (bad frames, a failing model step, an unreachable service) are counted per cause
  and logged at their 1st, 10th, 100th... occurrence (``atp_ros.problems``): never one per frame.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from atp_ros.backends.errors import BadInput, GenerationStopped
from atp_ros.backends.loading import release_cuda_cache
from atp_ros.backends.results import VlmResult
from atp_ros.backends.streaming import answer_on_stream
from atp_ros.method import AtpConfig
from atp_ros.problems import ERROR, OK, WARN, Problem, Problems  # noqa: F401  (re-exported for the node)
from atp_ros.ros.stats import Counters, LatencyWindow
from atp_ros.stream import ReuseConfig, ReuseDecision, StreamCache


class Answerer(Protocol):
    """What the worker needs of a backend: a local ``VlmBackend`` or a remote client."""

    num_visual_tokens: int

    def answer(
        self,
        images: Sequence[np.ndarray],
        questions: Sequence[str] | str,
        atp: AtpConfig = ...,
        max_new_tokens: int = ...,
        stop: Callable[[], bool] | None = ...,
    ) -> VlmResult: ...


@dataclass(frozen=True)
class RuntimeConfig:
    """The parameters that may change while the worker runs, replaced whole (never half-applied)."""

    atp: AtpConfig = field(default_factory=AtpConfig)
    max_rate_hz: float = 0.0  # frames per second at most; 0 = as fast as frames and the model allow
    reuse: ReuseConfig = field(default_factory=ReuseConfig)  # answer reuse across a camera's frames


@dataclass(frozen=True)
class Frame:
    """A received camera message (converted only when the worker takes it) and when it arrived."""

    camera: str
    payload: Any  # the camera message; ``decode`` turns it into HxWx3 uint8 RGB
    received: float  # time.monotonic() at receipt


@dataclass(frozen=True)
class Outcome:
    """One answered frame: what the node publishes."""

    frame: Frame
    question: str
    rgb: np.ndarray  # (H, W, 3) uint8, the decoded frame
    result: VlmResult  # of the full run whose answer this is (an earlier frame's when ``reuse`` says so)
    started: float  # time.monotonic() when inference began
    reuse: ReuseDecision | None = None  # set when the answer was reused without running the model


@dataclass
class AskTicket:
    """A queued ask: ``future`` gets an :class:`Outcome` or the exception that ended the ask."""

    camera: str
    question: str
    max_age_s: float
    future: Future = field(default_factory=Future)
    started: threading.Event = field(default_factory=threading.Event)  # the worker took it
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """End the ask: before it runs, or mid-decode (within one generated token)."""
        self.cancelled.set()


class LatestFrame:
    """One-slot holder: ``put`` replaces an unconsumed frame (counted as dropped)."""

    def __init__(self) -> None:
        self._frame: Frame | None = None
        self._lock = threading.Lock()
        self.dropped = 0

    def put(self, frame: Frame) -> None:
        with self._lock:
            if self._frame is not None:
                self.dropped += 1
            self._frame = frame

    def take(self) -> Frame | None:
        with self._lock:
            frame, self._frame = self._frame, None
            return frame

    def clear(self) -> None:
        self.take()


@dataclass
class _LoopState:
    """What the inference thread remembers between jobs."""

    last_start: float = -1e9  # time.monotonic() of the last frame inference (the rate cap)
    waiting_logged: bool = False  # "no query yet" is said once


def check_question(text: str, max_chars: int) -> str:
    """The question stripped, or :class:`BadInput` when it is empty or longer than ``max_chars``."""
    if not text.strip():
        raise BadInput("query_empty", "empty question")
    if len(text) > max_chars:
        raise BadInput(
            "query_too_long", f"question of {len(text)} characters exceeds limits.max_query_chars={max_chars}"
        )
    return text.strip()


class InferenceWorker:
    """Answers the standing question of each camera's newest frame on one thread; asks go first.

    ``decode(payload) -> rgb`` converts a frame (raising :class:`BadInput` for unusable
    ones); ``on_answer(outcome)`` publishes an answered frame (on the worker thread);
    ``log(level, line)`` reports problems and notes.
    """

    def __init__(
        self,
        backend: Answerer,
        cameras: Sequence[str],
        decode: Callable[[Any], np.ndarray],
        on_answer: Callable[[Outcome], None],
        log: Callable[[int, str], None],
        config: RuntimeConfig = RuntimeConfig(),
        max_new_tokens: int = 32,
        max_query_chars: int = 512,
        latency_window: int = 100,
        query_topic: str = "the query topic",
    ) -> None:
        if not cameras or len(set(cameras)) != len(cameras):
            raise ValueError(f"cameras must be distinct and at least one, got {list(cameras)}")
        self.backend = backend
        self.cameras = tuple(cameras)
        self._decode, self._on_answer, self._log = decode, on_answer, log
        self._config = config
        self.max_new_tokens = max_new_tokens
        self.max_query_chars = max_query_chars
        self.query_topic = query_topic  # named in the "no query yet" line
        self.counters = Counters()
        self.latency = LatencyWindow(latency_window)
        self.problems = Problems()
        self._slots = {c: LatestFrame() for c in self.cameras}
        self._latest: dict[str, Frame] = {}  # newest frame per camera, kept for asks
        self._queries: dict[str, str] = {}
        self._asks: deque[AskTicket] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._notes_logged: set[str] = set()
        self.notes: list[str] = []  # of the latest answer
        self.last_kept: tuple[int, int] = (0, 0)  # of the latest answer (a remote backend may be down now)
        self._busy_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_camera = 0
        self._caches = {c: StreamCache(config.reuse) for c in self.cameras}

    # ------------------------------------------------------------------ configuration and inputs

    @property
    def config(self) -> RuntimeConfig:
        return self._config

    def set_config(self, config: RuntimeConfig) -> None:
        """Replace the run-time configuration whole; the next inference uses it."""
        config.atp.check()
        config.reuse.check()
        with self._lock:  # an answer of the old settings is no answer of the new ones
            self._caches = {c: StreamCache(config.reuse) for c in self.cameras}
            self._config = config

    def set_query(self, text: str, camera: str | None = None) -> bool:
        """Set the standing question of ``camera`` (None: of every camera); True when it changed.

        An empty or too long question raises :class:`BadInput` and keeps the previous one.
        """
        question = check_question(text, self.max_query_chars)
        targets = self.cameras if camera is None else (self._known(camera),)
        with self._lock:
            changed = any(self._queries.get(c) != question for c in targets)
            self._queries.update(dict.fromkeys(targets, question))
        return changed

    def query(self, camera: str) -> str | None:
        with self._lock:
            return self._queries.get(camera)

    def put_frame(self, camera: str, payload: Any) -> None:
        """Store the newest frame of ``camera`` (replacing an unprocessed one); cheap, any thread."""
        frame = Frame(self._known(camera), payload, time.monotonic())
        self.counters.inc("frames_received")
        with self._lock:
            self._latest[camera] = frame
            if self._thread is not None:
                self._slots[camera].put(frame)
                self._wake.notify()

    def ask(self, question: str, camera: str = "", max_age_s: float = 0.0) -> AskTicket:
        """Queue a question about ``camera``'s newest frame ahead of the stream.

        The ticket's future gets an :class:`Outcome`, or :class:`BadInput` with the reason
        (bad question, unknown camera, no or stale frame, not running), or
        ``GenerationStopped`` when it was cancelled or processing stopped.
        """
        request = AskTicket(camera or self.cameras[0], question, max_age_s)
        try:
            request.question = check_question(question, self.max_query_chars)
            if not (max_age_s >= 0.0):  # NaN fails every comparison: without this it meant "any age"
                raise BadInput("max_age", f"max_age_s must be >= 0 (0 = any age), got {max_age_s}")
            self._known(request.camera)
        except (BadInput, ValueError) as err:
            request.future.set_exception(err if isinstance(err, BadInput) else BadInput("camera", str(err)))
            return request
        with self._lock:
            if not self.running:
                request.future.set_exception(BadInput("inactive", "not processing (the node is not active)"))
            else:
                self._asks.append(request)
                self._wake.notify()
        return request

    def _known(self, camera: str) -> str:
        if camera not in self._slots:
            raise ValueError(f"unknown camera {camera!r} (cameras: {', '.join(self.cameras)})")
        return camera

    # ------------------------------------------------------------------ start / stop

    @property
    def running(self) -> bool:
        """True while the inference thread is alive (not merely started: a dead thread answers nothing)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def start(self) -> None:
        """Start processing (a no-op when running)."""
        with self._lock:
            if self._thread is not None:
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="atp_vlm_inference", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop processing: end a running decode, fail queued asks, drop waiting frames, join.

        True when the thread ended within ``timeout`` seconds. ``start`` resumes.
        """
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop.set()
            self._wake.notify_all()
            asks = list(self._asks)
            self._asks.clear()
            for slot in self._slots.values():
                slot.clear()
            for cache in self._caches.values():  # a restarted stream starts with a full run
                cache.clear()
        for request in asks:
            if not request.future.done():
                request.future.set_exception(GenerationStopped("processing stopped before this ask ran"))
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def request_stop(self) -> None:
        """Tell a running decode to end now, without waiting (safe from a signal or shutdown hook)."""
        self._stop.set()
        with self._lock:
            self._wake.notify_all()

    # ------------------------------------------------------------------ statistics

    def stats(self) -> dict[str, Any]:
        """Counters, drops, problem counts and the age of the running inference, for diagnostics."""
        with self._lock:
            busy = self._busy_since
        values: dict[str, Any] = dict(self.counters.snapshot())
        values["frames_dropped"] = sum(s.dropped for s in self._slots.values())
        if len(self.cameras) > 1:
            values |= {f"{c}.frames_dropped": s.dropped for c, s in self._slots.items()}
        values |= {f"errors.{c}": n for c, n in self.problems.counts().items()}
        values["in_flight_ms"] = 0.0 if busy is None else (time.monotonic() - busy) * 1e3
        return values

    def problem(self, cause: str, level: int, message: str) -> None:
        """Count one problem and log it when it deserves a line (see :class:`Problems`).

        Never raises: a failing log sink must not end the caller (the inference thread or a
        ROS callback); the problem stays counted either way.
        """
        self.counters.inc(f"problems_{'error' if level >= ERROR else 'warn'}")
        line = self.problems.report(cause, level, message)
        if line:
            self._safe_log(level, line)

    def _safe_log(self, level: int, line: str) -> None:
        try:
            self._log(level, line)
        except Exception as err:  # the log sink itself failed: count it, keep going
            self.problems.report("log", ERROR, f"logging failed: {type(err).__name__}: {err}")

    # ------------------------------------------------------------------ the thread

    def _next(self) -> AskTicket | Frame | None:
        """The next job: an ask, else the next camera's waiting frame (in turn), else None."""
        if self._asks:
            return self._asks.popleft()
        for i in range(len(self.cameras)):
            camera = self.cameras[(self._next_camera + i) % len(self.cameras)]
            frame = self._slots[camera].take()
            if frame is not None:
                self._next_camera = (self._next_camera + i + 1) % len(self.cameras)
                return frame
        return None

    def _run(self) -> None:
        """The inference thread: one job at a time until stopped. Nothing a job raises ends it."""
        state = _LoopState()
        while not self._stop.is_set():
            try:
                if self._step(state):
                    break
            except Exception as err:  # a bug or an unforeseen failure: count it, skip the job, keep answering
                self.problem("worker", ERROR, f"job failed and was skipped: {type(err).__name__}: {err}")

    def _step(self, state: _LoopState) -> bool:
        """Take and run one job (or wait for one); True when the thread must end."""
        stop = self._stop
        with self._lock:
            job = self._asks.popleft() if self._asks else None
            if job is None:
                rate = self._config.max_rate_hz
                pause = state.last_start + 1.0 / rate - time.monotonic() if rate > 0 else 0.0
                if pause > 0:
                    self._wake.wait(pause)  # an ask or stop wakes it early
                    return False
                job = self._next()
                if job is None:
                    self._wake.wait(0.5)
                    return False
        if isinstance(job, AskTicket):
            self._run_ask(job)
            return False
        question = self.query(job.camera)
        if question is None:
            self.counters.inc("frames_skipped_no_query")
            if not state.waiting_logged:
                state.waiting_logged = True
                self._safe_log(OK, f"frames arriving but no query yet: publish a question on {self.query_topic}")
            return False
        state.last_start = time.monotonic()
        self.latency.add({"queue_age": (state.last_start - job.received) * 1e3})
        try:
            outcome = self._infer(job, question, stop.is_set, self._caches[job.camera])
        except GenerationStopped as err:
            self._safe_log(OK, f"inference {err} (stopping)")
            return True
        except BadInput as err:
            self.problem(err.cause, WARN, f"frame skipped: {err}")
            return False
        except Exception as err:  # a failing model step (CUDA OOM, a lost service) must not end the worker
            cause = getattr(err, "cause", "model")
            self.problem(cause, ERROR, f"inference failed, frame skipped: {type(err).__name__}: {err}")
            release_cuda_cache()
            return False
        try:
            self._on_answer(outcome)
        except Exception as err:
            if stop.is_set():
                return True
            self.problem("publish", ERROR, f"publishing failed: {type(err).__name__}: {err}")
            return False
        self.counters.inc("frames_processed")
        if len(self.cameras) > 1:
            self.counters.inc(f"{job.camera}.frames_processed")
        latency = {"latency": (time.monotonic() - job.received) * 1e3}
        if outcome.reuse is not None:  # no model stages ran: only the latency joins the window
            self.counters.inc("frames_reused")
            self.latency.add(latency)
        else:
            self.latency.add(outcome.result.timings.as_dict() | latency)
        return False

    def _run_ask(self, request: AskTicket) -> None:
        request.started.set()
        if request.cancelled.is_set():
            request.future.set_exception(GenerationStopped("cancelled before it ran"))
            return
        with self._lock:
            frame = self._latest.get(request.camera)
        try:
            if frame is None:
                raise BadInput("no_frame", f"no frame received yet from camera {request.camera or '(default)'}")
            age = time.monotonic() - frame.received
            if request.max_age_s > 0 and age > request.max_age_s:
                raise BadInput("stale", f"latest frame is {age:.2f} s old (max_age_s={request.max_age_s})")
            outcome = self._infer(frame, request.question, lambda: self._stop.is_set() or request.cancelled.is_set())
        except Exception as err:
            if not isinstance(err, (BadInput, GenerationStopped)):
                release_cuda_cache()
            request.future.set_exception(err)
            return
        self.counters.inc("asks_answered")
        request.future.set_result(outcome)

    def _infer(
        self, frame: Frame, question: str, stop: Callable[[], bool], cache: StreamCache | None = None
    ) -> Outcome:
        """Answer ``question`` about ``frame``: from ``cache`` when its reuse rules allow, else with the model
        (then stored in ``cache``)."""
        try:
            rgb = self._decode(frame.payload)
        except BadInput:
            raise
        except Exception as err:  # a decoder library's own error (cv2.error...) is still the frame's fault
            raise BadInput("decode", f"cannot decode the frame: {type(err).__name__}: {err}") from err
        started = time.monotonic()
        with self._lock:
            self._busy_since = started
        try:
            stream = cache if cache is not None else StreamCache()  # mode none: the model on every frame
            step = answer_on_stream(
                self.backend, stream, rgb, question, self._config.atp, self.max_new_tokens, frame.received, stop
            )  # stream time: when frames arrived
        finally:
            with self._lock:
                self._busy_since = None
        if step.reuse is not None:
            return Outcome(frame, question, rgb, step.result, started, reuse=step.reuse)
        result = step.result
        self.notes = list(result.notes)
        new = [n for n in dict.fromkeys(result.notes) if n not in self._notes_logged]
        self._notes_logged.update(new)
        for note in new:
            self._safe_log(WARN, f"backend: {note}")
        self.last_kept = (int(result.visual_tokens_kept[0]), int(result.visual_tokens_total[0]))
        if step.recomputed is not None:
            self.counters.inc("frames_token_reuse")
        if step.cache_error:
            self.problem("reuse", WARN, f"answer not cached for reuse: {step.cache_error}")
        return Outcome(frame, question, rgb, result, started)
