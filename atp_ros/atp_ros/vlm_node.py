"""ROS 2 node ``atp_vlm``: camera + question in; answers, keep masks, overlays, diagnostics out.

The only module of atp_ros that imports rclpy. It stays thin: image conversion is
``image_io``, pruning and the VLM are ``backends``, masks are ``overlay``, statistics
``stats``, parameters ``params``.

Threads: subscription callbacks only store the newest frame in a one-slot holder
(older unprocessed frames are dropped and counted, so a slow model never builds a
queue); a worker thread runs inference on the newest frame; the ``~/ask`` service
and the diagnostics timer have their own callback groups under a
MultiThreadedExecutor. One lock serializes the model between worker and service.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String

from atp_ros import __version__, image_io, overlay, params
from atp_ros.backends import ModelLoadError, VlmBackend, load_backend
from atp_ros.stats import Counters, LatencyWindow
from atp_ros_msgs.msg import VlmAnswer
from atp_ros_msgs.srv import Ask

LOG_THROTTLE_S = 5.0  # one log line per bad-input cause per this many seconds
RECENT_PROBLEM_S = 10.0  # a problem keeps /diagnostics at WARN/ERROR this long


@dataclass
class Frame:
    """A received camera message and when it arrived (monotonic seconds)."""

    msg: Image | CompressedImage
    received: float


class LatestFrame:
    """One-slot holder: ``put`` replaces an unconsumed frame (counted as dropped)."""

    def __init__(self) -> None:
        self._frame: Frame | None = None
        self._cond = threading.Condition()
        self.dropped = 0

    def put(self, frame: Frame) -> None:
        with self._cond:
            if self._frame is not None:
                self.dropped += 1
            self._frame = frame
            self._cond.notify()

    def take(self, timeout: float) -> Frame | None:
        with self._cond:
            if self._frame is None:
                self._cond.wait(timeout)
            frame, self._frame = self._frame, None
            return frame

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


def _descriptor(spec: params.Param) -> ParameterDescriptor:
    desc = ParameterDescriptor(description=spec.description, read_only=not spec.runtime)
    if spec.choices:
        desc.additional_constraints = "one of: " + ", ".join(spec.choices)
    if spec.low is not None and not isinstance(spec.default, bool):
        if isinstance(spec.default, int):
            desc.integer_range = [IntegerRange(from_value=int(spec.low), to_value=int(spec.high), step=1)]
        else:
            desc.floating_point_range = [FloatingPointRange(from_value=spec.low, to_value=spec.high, step=0.0)]
    return desc


class VlmNode(Node):
    """Answers the standing question about each camera frame with an ATP-gated VLM."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("atp_vlm", **kwargs)
        for spec in params.PARAMS:
            self.declare_parameter(spec.name, spec.default, _descriptor(spec))
        for spec in params.PARAMS:  # values from a YAML file / command line get the same checks
            reason = params.check(spec.name, self.get_parameter(spec.name).value)
            if reason:
                raise ValueError(reason)
        # Run-time parameters as one snapshot, replaced whole by _on_set_parameters: the worker
        # and ~/ask never see half of a multi-parameter change (rclpy stores the new values one
        # by one after the callback) and do not read ~10 parameters per frame.
        self._state_lock = threading.Lock()
        self._runtime: dict[str, Any] = {p.name: self._param(p.name) for p in params.PARAMS if p.runtime}
        self._atp = params.atp_config(self._runtime)
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self.model_id = self._param("model_id")
        if not self.model_id:
            raise ModelLoadError("model_id is empty: set it, e.g. -p model_id:=llava-hf/llava-1.5-7b-hf")
        started = time.monotonic()
        self.backend: VlmBackend = load_backend(
            self.model_id, self._param("text_encoder_id"), self._param("device"), self._param("dtype")
        )
        self.get_logger().info(
            f"loaded {self.model_id} ({self.backend.family}) on {self.backend.device} {self.backend.dtype} "
            f"in {time.monotonic() - started:.1f} s: {self.backend.num_visual_tokens} visual tokens "
            f"on a {self.backend.grid[0]}x{self.backend.grid[1]} grid"
        )
        # Backend notes (CLS-only fallback, approximations) reach /rosout once each and /diagnostics.
        self._notes_logged: set[str] = set()
        self._last_notes: list[str] = []
        self._log_notes(self.backend.load_notes)

        self.limits = image_io.ImageLimits(max_pixels=self._param("limits.max_image_pixels"))
        self._max_new_tokens = self._param("max_new_tokens")  # read-only
        self._max_query_chars = self._param("limits.max_query_chars")  # read-only
        self.counters = Counters()
        self.latency = LatencyWindow(self._param("diagnostics.window"))
        self.slot = LatestFrame()
        self._query: str | None = None
        self._latest: Frame | None = None  # newest frame, for ~/ask
        self._problems: dict[str, tuple[float, int, str]] = {}  # cause -> (when, level, message)
        self._last_log: dict[str, float] = {}
        self._last_kept: tuple[int, int] = (0, self.backend.num_visual_tokens)
        self._stop = threading.Event()

        io_group = MutuallyExclusiveCallbackGroup()
        transport = self._param("image_transport")
        if transport == "compressed":
            self.create_subscription(
                CompressedImage, "image/compressed", self._on_image, qos_profile_sensor_data, callback_group=io_group
            )
        else:
            self.create_subscription(Image, "image", self._on_image, qos_profile_sensor_data, callback_group=io_group)
        standing = QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        )
        # A volatile publisher is "incompatible" with this subscription; the one below hears it: no warning.
        quiet = SubscriptionEventCallbacks(incompatible_qos=lambda _event: None)
        self.create_subscription(
            String, "query", self._on_query, standing, callback_group=io_group, event_callbacks=quiet
        )
        # `ros2 topic pub` (Iron and later) and most nodes publish volatile, which a transient-local
        # subscription never matches: a second, volatile best-effort subscription hears every publisher.
        # A transient-local publisher reaches both; the repeat is the same question and changes nothing.
        anyone = QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT, durability=DurabilityPolicy.VOLATILE)
        self.create_subscription(String, "query", self._on_query, anyone, callback_group=io_group)

        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.pub_answer = self.create_publisher(VlmAnswer, "~/answer", reliable)
        self.pub_text = self.create_publisher(String, "~/answer_text", reliable)
        self.pub_mask = self.create_publisher(Image, "~/keep_mask", reliable)
        self.pub_overlay = self.create_publisher(Image, "~/overlay", reliable)
        self.pub_relevance = self.create_publisher(Image, "~/relevance", reliable)
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_service(Ask, "~/ask", self._on_ask, callback_group=MutuallyExclusiveCallbackGroup())
        self.create_timer(1.0, self._publish_diagnostics, callback_group=MutuallyExclusiveCallbackGroup())

        self._worker = threading.Thread(target=self._run_worker, name="atp_vlm_inference", daemon=True)
        self._worker.start()
        self.get_logger().info(
            f"listening on {self.resolve_topic_name('image' if transport == 'raw' else 'image/compressed')} "
            f"and {self.resolve_topic_name('query')}"
        )

    # ------------------------------------------------------------------ parameters

    def _param(self, name: str) -> Any:
        return self.get_parameter(name).value

    def _on_set_parameters(self, changes: list[Parameter]) -> SetParametersResult:
        """Reject the whole change with a reason if any value is invalid (never half-applied)."""
        for change in changes:
            reason = params.check(change.name, change.value)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        # rclpy checked types and descriptor ranges before calling us, so the change is applied now.
        with self._state_lock:
            runtime = self._runtime | {c.name: c.value for c in changes if c.name in self._runtime}
            self._runtime, self._atp = runtime, params.atp_config(runtime)
        return SetParametersResult(successful=True)

    def _runtime_config(self) -> tuple[dict[str, Any], Any]:
        """The run-time parameters and their AtpConfig, from one consistent snapshot."""
        with self._state_lock:
            return self._runtime, self._atp

    # ------------------------------------------------------------------ inputs

    def _on_image(self, msg: Image | CompressedImage) -> None:
        frame = Frame(msg, time.monotonic())
        self.counters.inc("frames_received")
        with self._state_lock:
            self._latest = frame
        self.slot.put(frame)

    def _on_query(self, msg: String) -> None:
        reason = self._check_question(msg.data)
        if reason:
            cause = "query_empty" if not msg.data.strip() else "query_too_long"
            self._problem(cause, DiagnosticStatus.WARN, f"query rejected: {reason} (keeping the previous one)")
            return
        with self._state_lock:
            changed = self._query != msg.data.strip()
            self._query = msg.data.strip()
        if changed:
            self.get_logger().info(f"query: {self._query!r}")

    def _check_question(self, text: str) -> str | None:
        if not text.strip():
            return "empty question"
        limit = self._max_query_chars
        if len(text) > limit:
            return f"question of {len(text)} characters exceeds limits.max_query_chars={limit}"
        return None

    # ------------------------------------------------------------------ problems

    def _problem(self, cause: str, level: bytes, message: str) -> None:
        """Count, remember for /diagnostics and log (throttled per cause) one problem."""
        self.counters.inc(f"errors.{cause}")
        now = time.monotonic()
        with self._state_lock:
            self._problems[cause] = (now, level, message)
            loud = now - self._last_log.get(cause, -1e9) >= LOG_THROTTLE_S
            if loud:
                self._last_log[cause] = now
        if loud:
            log = self.get_logger().error if level == DiagnosticStatus.ERROR else self.get_logger().warning
            log(f"[{cause}] {message}")

    # ------------------------------------------------------------------ inference

    def _to_rgb(self, msg: Image | CompressedImage):
        if isinstance(msg, CompressedImage):
            return image_io.compressed_to_rgb(msg, self.limits)
        return image_io.raw_to_rgb(msg, self.limits)

    def _infer(self, frame: Frame, question: str):
        """Convert + answer one frame; returns ``(rgb, result)`` or raises BadImage / model errors."""
        rgb = self._to_rgb(frame.msg)
        _, atp = self._runtime_config()
        # The backend runs one call at a time (its own lock), so ~/ask and the worker simply queue.
        result = self.backend.answer([rgb], [question], atp, max_new_tokens=self._max_new_tokens)
        with self._state_lock:
            self._last_notes = list(result.notes)
        self._log_notes(result.notes)
        return rgb, result

    def _log_notes(self, notes: list[str]) -> None:
        """Log each distinct backend note once (they repeat every frame while the condition holds)."""
        with self._state_lock:  # the worker and ~/ask both get here
            new = [n for n in dict.fromkeys(notes) if n not in self._notes_logged]
            self._notes_logged.update(new)
        for note in new:
            self.get_logger().warning(f"backend: {note}")

    def _answer_msg(self, header: Header, question: str, result, received: float, mask=None, scores=None) -> VlmAnswer:
        """The VlmAnswer of image 0 of ``result``; ``mask`` is its ``(h, w)`` keep mask when already at hand."""
        h, w = result.grid
        mask = result.keep_mask(0) if mask is None else mask
        scores = _score_grid(result) if scores is None else scores
        msg = VlmAnswer()
        msg.header = header
        msg.query = question
        msg.answer = result.answers[0]
        msg.model_id = self.model_id
        msg.visual_tokens_total = int(result.visual_tokens_total)
        msg.visual_tokens_kept = int(result.visual_tokens_kept[0])
        msg.grid_height, msg.grid_width = int(h), int(w)
        msg.keep_mask = mask.reshape(-1).tobytes()
        msg.alpha = float(result.alpha_used)
        view = result.views[0]
        msg.view_box = [float(v) for v in view.as_tuple()]
        msg.relevant_box = [float(v) for v in overlay.relevant_region(scores, view)]
        msg.inference_ms = float(result.timings.total)
        msg.latency_ms = float((time.monotonic() - received) * 1e3)
        return msg

    def _run_worker(self) -> None:
        last_start = 0.0
        waiting_logged = False
        while not self._stop.is_set() and self.context.ok():
            rate = self._runtime_config()[0]["processing.max_rate_hz"]
            if rate > 0:  # wait out the interval, then take whatever frame is newest
                pause = last_start + 1.0 / rate - time.monotonic()
                if pause > 0 and self._stop.wait(pause):
                    break
            frame = self.slot.take(timeout=0.2)
            if frame is None:
                continue
            with self._state_lock:
                question = self._query
            if question is None:
                self.counters.inc("frames_skipped_no_query")
                if not waiting_logged:
                    self.get_logger().info("frames arriving but no query yet: publish a question on 'query'")
                    waiting_logged = True
                continue
            last_start = time.monotonic()
            self.latency.add({"queue_age": (last_start - frame.received) * 1e3})
            try:
                rgb, result = self._infer(frame, question)
            except image_io.BadImage as err:
                self._problem(err.cause, DiagnosticStatus.WARN, f"frame skipped: {err}")
                continue
            except Exception as err:  # a failing model step (CUDA OOM, ...) must not end the node
                self._problem(
                    "model", DiagnosticStatus.ERROR, f"inference failed, frame skipped: {type(err).__name__}: {err}"
                )
                _release_cuda_cache()
                continue
            try:
                self._publish(frame, question, rgb, result)
            except Exception as err:  # the context goes away under us on Ctrl-C
                if not self.context.ok() or self._stop.is_set():
                    break
                self._problem("publish", DiagnosticStatus.ERROR, f"publishing failed: {type(err).__name__}: {err}")

    def _publish(self, frame: Frame, question: str, rgb, result) -> None:
        header = frame.msg.header
        mask = result.keep_mask(0)  # (h, w) uint8, shared by the answer, the mask image and the overlay
        scores = _score_grid(result)  # (h, w) float32: one host copy, shared by the answer and ~/relevance
        answer = self._answer_msg(header, question, result, frame.received, mask, scores)
        self.pub_answer.publish(answer)
        self.pub_text.publish(String(data=answer.answer))
        if self.pub_mask.get_subscription_count():
            self.pub_mask.publish(Image(header=header, **image_io.rgb_fields(overlay.mask_image(mask))))
        if self.pub_relevance.get_subscription_count():  # the fused score on the patch grid, 32FC1
            gh, gw = scores.shape
            self.pub_relevance.publish(
                Image(header=header, height=gh, width=gw, encoding="32FC1", is_bigendian=0, step=gw * 4,
                      data=scores.astype("<f4").tobytes())
            )  # fmt: skip
        if self.pub_overlay.get_subscription_count():  # the overlay costs a full-frame pass: only when watched
            self.pub_overlay.publish(
                Image(header=header, **image_io.rgb_fields(overlay.overlay(rgb, mask, result.views[0])))
            )
        self.counters.inc("frames_processed")
        self._last_kept = (answer.visual_tokens_kept, answer.visual_tokens_total)
        self.latency.add(result.timings.as_dict() | {"latency": (time.monotonic() - frame.received) * 1e3})

    # ------------------------------------------------------------------ service

    def _on_ask(self, request: Ask.Request, response: Ask.Response) -> Ask.Response:
        reason = self._check_question(request.question)
        with self._state_lock:
            frame = self._latest
        if reason is None and frame is None:
            reason = "no camera frame received yet"
        if reason is None and request.max_age_s > 0:
            age = time.monotonic() - frame.received
            if age > request.max_age_s:
                reason = f"latest frame is {age:.2f} s old (max_age_s={request.max_age_s})"
        if reason is None:
            try:
                _, result = self._infer(frame, request.question.strip())
                response.answer = self._answer_msg(frame.msg.header, request.question.strip(), result, frame.received)
            except image_io.BadImage as err:
                reason = f"latest frame unusable: {err}"
            except Exception as err:
                reason = f"inference failed: {type(err).__name__}: {err}"
                _release_cuda_cache()
        response.success = reason is None
        response.message = "ok" if reason is None else reason
        return response

    # ------------------------------------------------------------------ diagnostics

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        with self._state_lock:
            recent = {c: p for c, p in self._problems.items() if now - p[0] < RECENT_PROBLEM_S}
            query = self._query
            notes = list(self._last_notes)
        status = DiagnosticStatus(
            name=f"{self.get_fully_qualified_name()}: vlm pipeline", hardware_id=str(self.backend.device)
        )
        if recent:
            worst = max(recent.values(), key=lambda p: p[1])
            status.level, status.message = worst[1], worst[2]
        elif notes:  # answering, but not the way the parameters asked (e.g. CLS-only without a text tower)
            status.level, status.message = DiagnosticStatus.WARN, notes[0]
        elif query is None:
            status.level, status.message = DiagnosticStatus.OK, "waiting for a query"
        else:
            status.level, status.message = DiagnosticStatus.OK, "answering"
        values = {
            "model_id": self.model_id,
            "device": str(self.backend.device),
            "dtype": str(self.backend.dtype).removeprefix("torch."),
            "query": query or "",
            "visual_tokens_kept": str(self._last_kept[0]),
            "visual_tokens_total": str(self._last_kept[1]),
            "frames_dropped": str(self.slot.dropped),
            "memory_rss_mb": f"{_rss_mb():.0f}",
            "atp_ros_version": __version__,
            "load_notes": " | ".join(self.backend.load_notes),
            "notes": " | ".join(notes),
        }
        values |= {k: str(v) for k, v in self.counters.snapshot().items()}
        for stage, (p50, p95, _count) in sorted(self.latency.summary().items()):
            values[f"{stage}_ms_p50"] = f"{p50:.2f}"
            values[f"{stage}_ms_p95"] = f"{p95:.2f}"
        values |= _cuda_memory(self.backend.device)
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.pub_diag.publish(array)

    # ------------------------------------------------------------------ lifecycle

    def stop(self, timeout: float = 1.5) -> None:
        """Stop the inference worker (waits at most ``timeout`` s for a frame in flight)."""
        self._stop.set()
        self.slot.wake()
        self._worker.join(timeout)


def _score_grid(result):
    """The fused ATP score of image 0 on its ``(h, w)`` patch grid, float32 on the host."""
    return result.selection.scores[0].reshape(result.grid).cpu().numpy()


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: peak RSS is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cuda_memory(device) -> dict[str, str]:
    if getattr(device, "type", "") != "cuda":
        return {}
    import torch

    return {
        "cuda_allocated_mb": f"{torch.cuda.memory_allocated(device) / 2**20:.0f}",
        "cuda_reserved_mb": f"{torch.cuda.memory_reserved(device) / 2**20:.0f}",
    }


def _release_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(args: list[str] | None = None) -> int:
    """Init, spin until Ctrl-C or shutdown, clean up; 1 with one line when the model cannot be loaded."""
    rclpy.init(args=args)
    node = None
    try:
        try:
            node = VlmNode()
        except (ModelLoadError, ValueError, ParameterException) as err:  # rclpy: wrong type / out of range
            reason = " ".join(str(err).split())  # one line, even for library errors that span several
            print(f"[atp_vlm] FATAL: cannot start: {reason}", file=sys.stderr, flush=True)
            return 1
        executor = MultiThreadedExecutor(num_threads=3)
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.stop()
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


def main(args: list[str] | None = None) -> None:
    """Entry point of ``vlm_node``.

    Everything the node owns is closed by :func:`run`; the interpreter's own teardown of
    torch + transformers modules then takes about 2 s, which would break "Ctrl-C stops
    within 2 s", so the process leaves right after flushing its output.
    """
    code = run(args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
