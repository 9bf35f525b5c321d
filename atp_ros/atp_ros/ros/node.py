"""ROS 2 lifecycle node ``atp_vlm``: camera + question in; answers, keep masks, overlays, diagnostics out.

The only module of atp_ros that imports rclpy. It is the ROS adapter around
:class:`atp_ros.ros.worker.InferenceWorker` (latest-frame slots, the inference thread, rate
cap, problem log, statistics); images are converted by ``image_io``, masks and overlays
drawn by ``overlay``, parameters described in ``params``.

Lifecycle (``rclpy.lifecycle``): ``configure`` loads the model (or connects to an
atp-serve deployment with ``backend: ray``) and creates the publishers, the ``~/ask``
action and the ``~/ask_sync`` service; ``activate`` subscribes and starts the worker;
``deactivate`` unsubscribes and stops it (a running decode ends within one token);
``cleanup`` releases the model and the CUDA cache; ``shutdown`` works from any state.
With ``autostart`` (default) the node configures and activates itself.

Callback groups under a MultiThreadedExecutor: inputs (images, queries) in one mutually
exclusive group, asks in a reentrant one (each waits for its turn at the worker),
diagnostics in their own.
"""

from __future__ import annotations

import gc
import os
import resource
import sys
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from functools import partial, wraps
from typing import Any

import rclpy
from action_msgs.msg import GoalStatus  # noqa: F401  (documents the action's terminal states)
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.exceptions import ParameterException, ParameterUninitializedException
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from atp_ros import __version__
from atp_ros.backends import images as image_io
from atp_ros.backends.errors import GenerationStopped, ModelLoadError, ServiceUnavailable
from atp_ros.backends.loading import release_cuda_cache
from atp_ros.ros import overlay, params
from atp_ros.ros.worker import ERROR, OK, WARN, BadInput, InferenceWorker, Outcome
from atp_ros_msgs.action import Ask as AskAction
from atp_ros_msgs.msg import VlmAnswer
from atp_ros_msgs.srv import Ask

RECENT_PROBLEM_S = 10.0  # a problem keeps /diagnostics at WARN/ERROR this long
FEEDBACK_PERIOD_S = 0.2  # ~/ask feedback while a goal waits or runs
_LEVEL = {OK: DiagnosticStatus.OK, WARN: DiagnosticStatus.WARN, ERROR: DiagnosticStatus.ERROR}


def _guarded(cause: str, fallback: Any = None) -> Callable:
    """Wrap a ROS callback: an exception it raises is counted under ``cause`` and logged (once per
    1st/10th/100th...), never raised into the executor, where it would end ``spin()`` and the process."""

    def wrap(callback: Callable) -> Callable:
        @wraps(callback)
        def guarded(self: VlmNode, *args: Any, **kwargs: Any) -> Any:
            try:
                return callback(self, *args, **kwargs)
            except Exception as err:
                self._report(cause, f"{callback.__name__} failed: {type(err).__name__}: {err}")
                return fallback(*args) if fallback is not None else None

        return guarded

    return wrap


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


@dataclass
class CameraIo:
    """The topics of one camera: ``''`` is the single unnamed camera (``image``, ``~/answer``, ...)."""

    name: str
    answer: Any = None
    text: Any = None
    mask: Any = None
    overlay: Any = None
    relevance: Any = None

    def topic(self, base: str) -> str:
        return f"{self.name}/{base}" if self.name else base

    def private(self, base: str) -> str:
        return f"~/{self.name}/{base}" if self.name else f"~/{base}"


class VlmNode(LifecycleNode):
    """Answers the standing question about each camera frame with an ATP-gated VLM."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("atp_vlm", **kwargs)
        for spec in params.PARAMS:
            if isinstance(spec.default, tuple):  # a string array without a default ([] has no type in ROS)
                self.declare_parameter(spec.name, Parameter.Type.STRING_ARRAY, _descriptor(spec))
            else:
                self.declare_parameter(spec.name, spec.default, _descriptor(spec))
        for spec in params.PARAMS:  # values from a YAML file / command line get the same checks
            reason = params.check(spec.name, self._param(spec.name))
            if reason:
                raise ValueError(reason)
        self.model_id: str = self._param("model_id")
        self.autostart: bool = self._param("autostart")
        self.cameras = [CameraIo(name) for name in (self._param("cameras") or [""])]
        # Run-time parameters as one snapshot, replaced whole by _on_set_parameters: the worker
        # never sees half of a multi-parameter change (rclpy stores the values one by one after it).
        self._runtime: dict[str, Any] = {p.name: self._param(p.name) for p in params.PARAMS if p.runtime}
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self.backend: Any = None
        self.worker: InferenceWorker | None = None
        self.state = "unconfigured"  # the lifecycle state, for diagnostics and readiness
        self.start_error = ""  # why the last configure failed (one line)
        self._subscriptions_io: list = []
        self._asks: list = []  # the action server and the service
        self._input_group = MutuallyExclusiveCallbackGroup()
        self._ask_group = ReentrantCallbackGroup()
        self._notes_logged: set[str] = set()
        self.limits = image_io.ImageLimits(max_pixels=self._param("limits.max_image_pixels"))
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(1.0, self._publish_diagnostics, callback_group=MutuallyExclusiveCallbackGroup())
        # SIGINT/SIGTERM shut the context down: a running decode ends within one token.
        self.context.on_shutdown(self._on_context_shutdown)

    def _param(self, name: str) -> Any:
        try:
            return self.get_parameter(name).value
        except ParameterUninitializedException:  # `cameras` when not set
            return None

    # ------------------------------------------------------------------ lifecycle transitions

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load the model (or connect to the service), create publishers and the ask endpoints."""
        started = time.monotonic()
        try:
            self.backend = self._load_backend()
        except ModelLoadError as err:
            self.start_error = " ".join(str(err).split())  # one line, even for multi-line library errors
            self.get_logger().error(f"configure failed: {self.start_error}")
            return TransitionCallbackReturn.FAILURE
        self.start_error = ""
        b = self.backend
        try:
            self.get_logger().info(
                f"loaded {self.model_id} ({b.family}) on {b.device} {b.dtype} in {time.monotonic() - started:.1f} s:"
                f" {b.num_visual_tokens} visual tokens on a {b.grid[0]}x{b.grid[1]} grid"
            )
            self._log_notes(b.load_notes)
        except ServiceUnavailable as err:  # backend ray: the service may come later; frames count it till then
            self.get_logger().warning(f"{err} (answering once it is reachable)")
        self.worker = InferenceWorker(
            self.backend,
            [c.name for c in self.cameras],
            decode=self._decode,
            on_answer=self._publish,
            log=self._log,
            config=params.runtime_config(self._runtime),
            max_new_tokens=self._param("max_new_tokens"),
            max_query_chars=self._param("limits.max_query_chars"),
            latency_window=self._param("diagnostics.window"),
            query_topic=self.resolve_topic_name("~/query"),
        )
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        for cam in self.cameras:
            cam.answer = self.create_lifecycle_publisher(VlmAnswer, cam.private("answer"), reliable)
            cam.text = self.create_lifecycle_publisher(String, cam.private("answer_text"), reliable)
            cam.mask = self.create_lifecycle_publisher(Image, cam.private("keep_mask"), reliable)
            cam.overlay = self.create_lifecycle_publisher(Image, cam.private("overlay"), reliable)
            cam.relevance = self.create_lifecycle_publisher(Image, cam.private("relevance"), reliable)
        self._asks = [
            ActionServer(
                self,
                AskAction,
                "~/ask",
                execute_callback=self._execute_ask,
                goal_callback=lambda _goal: GoalResponse.ACCEPT,
                cancel_callback=lambda _goal: CancelResponse.ACCEPT,
                callback_group=self._ask_group,
            ),
            self.create_service(Ask, "~/ask_sync", self._on_ask_sync, callback_group=self._ask_group),
        ]
        self.state = "inactive"
        return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Subscribe to the cameras and queries and start answering."""
        transport = self._param("image_transport")
        compressed = transport == "compressed"
        image_type, image_topic = (CompressedImage, "image/compressed") if compressed else (Image, "image")
        for cam in self.cameras:
            self._subscriptions_io.append(
                self.create_subscription(
                    image_type,
                    cam.topic(image_topic),
                    partial(self._on_image, cam.name),
                    qos_profile_sensor_data,
                    callback_group=self._input_group,
                )
            )
        self._subscribe_query("~/query", None)  # every camera's question
        for cam in self.cameras:
            if cam.name:
                self._subscribe_query(cam.private("query"), cam.name)
        self.worker.start()
        self.state = "active"
        inputs = ", ".join(self.resolve_topic_name(c.topic(image_topic)) for c in self.cameras)
        self.get_logger().info(f"active: listening on {inputs} and {self.resolve_topic_name('~/query')}")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Unsubscribe and stop the worker: inactive, frames are neither queued nor answered."""
        self._stop_processing()
        self.state = "inactive"
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release the model, the CUDA cache, the publishers and the ask endpoints."""
        self._release()
        self.state = "unconfigured"
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_processing()
        self._release()
        self.state = "finalized"
        return super().on_shutdown(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_processing()
        self._release()
        self.state = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def bring_up(self) -> str:
        """``autostart``: configure, then activate. Empty string on success, else why not (one line)."""
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            return self.start_error or "configure failed"
        if self.trigger_activate() != TransitionCallbackReturn.SUCCESS:
            return "activate failed"
        return ""

    def _load_backend(self) -> Any:
        if not self.model_id:
            raise ModelLoadError("model_id is empty: set it, e.g. -p model_id:=llava-hf/llava-1.5-7b-hf")
        if self._param("backend") == "ray":
            from atp_ros.serving.serve import RemoteBackend

            return RemoteBackend(self._param("ray.address"), self._param("ray.app"), self._param("ray.timeout_s"))
        from atp_ros.backends import load_backend

        return load_backend(self.model_id, self._param("text_encoder_id"), self._param("device"), self._param("dtype"))

    def _stop_processing(self) -> None:
        for sub in self._subscriptions_io:
            self.destroy_subscription(sub)
        self._subscriptions_io.clear()
        if self.worker is not None and not self.worker.stop(timeout=10.0):
            self.get_logger().error("the inference thread did not stop within 10 s")

    def _release(self) -> None:
        for endpoint in self._asks:
            if isinstance(endpoint, ActionServer):
                endpoint.destroy()
            else:
                self.destroy_service(endpoint)
        self._asks.clear()
        for cam in self.cameras:
            for pub in (cam.answer, cam.text, cam.mask, cam.overlay, cam.relevance):
                if pub is not None:
                    self.destroy_lifecycle_publisher(pub)
            cam.answer = cam.text = cam.mask = cam.overlay = cam.relevance = None
        self.worker = self.backend = None
        gc.collect()
        release_cuda_cache()

    def _on_context_shutdown(self) -> None:
        worker = self.worker
        if worker is not None:
            worker.request_stop()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop answering now (end a running decode, join the worker); True when it ended in time."""
        worker = self.worker
        return True if worker is None else worker.stop(timeout)

    # ------------------------------------------------------------------ parameters

    def _on_set_parameters(self, changes: list[Parameter]) -> SetParametersResult:
        """Reject the whole change with a reason if any value is invalid (never half-applied)."""
        for change in changes:
            reason = params.check(change.name, change.value)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        runtime = self._runtime | {c.name: c.value for c in changes if c.name in self._runtime}
        config = params.runtime_config(runtime)
        # rclpy checked types and descriptor ranges before calling us: the change is applied now, whole.
        self._runtime = runtime
        if self.worker is not None:
            self.worker.set_config(config)
        return SetParametersResult(successful=True)

    # ------------------------------------------------------------------ inputs

    def _subscribe_query(self, topic: str, camera: str | None) -> None:
        callback = partial(self._on_query, camera)
        standing = QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        )
        # A volatile publisher is "incompatible" with this subscription; the one below hears it: no warning.
        quiet = SubscriptionEventCallbacks(incompatible_qos=lambda _event: None)
        self._subscriptions_io.append(
            self.create_subscription(
                String, topic, callback, standing, callback_group=self._input_group, event_callbacks=quiet
            )
        )
        # `ros2 topic pub` (Iron and later) and most nodes publish volatile, which a transient-local
        # subscription never matches: a second, volatile best-effort subscription hears every publisher.
        # A transient-local publisher reaches both; the repeat is the same question and changes nothing.
        anyone = QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT, durability=DurabilityPolicy.VOLATILE)
        self._subscriptions_io.append(
            self.create_subscription(String, topic, callback, anyone, callback_group=self._input_group)
        )

    @_guarded("callback")
    def _on_image(self, camera: str, msg: Image | CompressedImage) -> None:
        worker = self.worker
        if worker is not None:  # None: a frame delivered while the node was cleaning up
            worker.put_frame(camera, msg)

    @_guarded("callback")
    def _on_query(self, camera: str | None, msg: String) -> None:
        worker = self.worker
        if worker is None:
            return
        try:
            changed = worker.set_query(msg.data, camera)
        except BadInput as err:
            worker.problem(err.cause, WARN, f"query rejected: {err} (keeping the previous one)")
            return
        if changed:
            where = f" for camera {camera}" if camera else ""
            self.get_logger().info(f"query{where}: {msg.data.strip()!r}")

    def _report(self, cause: str, message: str) -> None:
        """Count an unexpected failure of a callback (ERROR) in the worker's problem log when there is
        one, else log it; never raises."""
        worker = self.worker
        try:
            if worker is not None:
                worker.problem(cause, ERROR, message)
            else:
                self.get_logger().error(f"[{cause}] {message}")
        except Exception:  # nowhere left to report to: dropping the line beats ending the process
            pass

    def _decode(self, msg: Image | CompressedImage):
        if isinstance(msg, CompressedImage):
            return image_io.compressed_to_rgb(msg, self.limits)
        return image_io.raw_to_rgb(msg, self.limits)

    # ------------------------------------------------------------------ outputs

    def _log(self, level: int, line: str) -> None:
        # One call site per severity: rclpy keys its logging state by call site and raises
        # "Logger severity cannot be changed between calls" when one site logs at two levels.
        logger = self.get_logger()
        if level >= ERROR:
            logger.error(line)
        elif level == WARN:
            logger.warning(line)
        else:
            logger.info(line)

    def _log_notes(self, notes: list[str]) -> None:
        for note in dict.fromkeys(notes):
            if note not in self._notes_logged:
                self._notes_logged.add(note)
                self.get_logger().warning(f"backend: {note}")

    def _answer_msg(self, outcome: Outcome, mask=None, scores=None) -> VlmAnswer:
        """The VlmAnswer of ``outcome``; ``mask`` / ``scores`` are its ``(h, w)`` grids when already at hand."""
        result = outcome.result
        h, w = result.grid
        mask = result.keep_mask(0) if mask is None else mask
        scores = _score_grid(result) if scores is None else scores
        msg = VlmAnswer()
        msg.header = outcome.frame.payload.header
        msg.camera = outcome.frame.camera
        msg.query = outcome.question
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
        msg.latency_ms = float((time.monotonic() - outcome.frame.received) * 1e3)
        return msg

    def _publish(self, outcome: Outcome) -> None:
        """Publish one answered frame on its camera's topics (called on the worker thread)."""
        cam = next(c for c in self.cameras if c.name == outcome.frame.camera)
        header = outcome.frame.payload.header
        mask = outcome.result.keep_mask(0)  # (h, w) uint8, shared by the answer, the mask image and the overlay
        scores = _score_grid(outcome.result)  # (h, w) float32: one host copy, for the answer and ~/relevance
        answer = self._answer_msg(outcome, mask, scores)
        cam.answer.publish(answer)
        cam.text.publish(String(data=answer.answer))
        if cam.mask.get_subscription_count():
            cam.mask.publish(Image(header=header, **image_io.rgb_fields(overlay.mask_image(mask))))
        if cam.relevance.get_subscription_count():  # the fused score on the patch grid, 32FC1
            gh, gw = scores.shape
            cam.relevance.publish(
                Image(header=header, height=gh, width=gw, encoding="32FC1", is_bigendian=0, step=gw * 4,
                      data=scores.astype("<f4").tobytes())
            )  # fmt: skip
        if cam.overlay.get_subscription_count():  # the overlay costs a full-frame pass: only when watched
            picture = overlay.overlay(outcome.rgb, mask, outcome.result.views[0])
            cam.overlay.publish(Image(header=header, **image_io.rgb_fields(picture)))

    # ------------------------------------------------------------------ asks

    def _ask(self, question: str, camera: str, max_age_s: float, goal_handle=None) -> tuple[str, VlmAnswer | None]:
        """Run one ask through the worker's priority slot: ``(message, answer)``; ``answer`` None on failure."""
        worker = self.worker
        if worker is None or not worker.running:
            return f"not answering: the node is {self.state}", None
        ticket = worker.ask(question, camera, max_age_s)
        accepted = time.monotonic()
        timeout = self._param("limits.ask_timeout_s")
        while not ticket.future.done():
            if not worker.running:  # stopped or died: nobody will ever answer this ticket
                ticket.cancel()
                return f"not answering: the inference thread is not running (node {self.state})", None
            if time.monotonic() - accepted > timeout:
                ticket.cancel()  # ends it before it runs, or mid-decode within one token
                worker.problem("ask_timeout", WARN, f"ask timed out after {timeout:g} s: {question.strip()[:80]!r}")
                return f"timed out after {timeout:g} s (limits.ask_timeout_s)", None
            if goal_handle is not None:
                if goal_handle.is_cancel_requested:
                    ticket.cancel()
                feedback = AskAction.Feedback(
                    stage="running" if ticket.started.is_set() else "queued",
                    elapsed_ms=(time.monotonic() - accepted) * 1e3,
                )
                goal_handle.publish_feedback(feedback)
            futures.wait([ticket.future], timeout=FEEDBACK_PERIOD_S)
        err = ticket.future.exception()
        if isinstance(err, GenerationStopped):
            return ("cancelled" if ticket.cancelled.is_set() else f"stopped: {err}"), None
        if isinstance(err, BadInput):
            return str(err), None
        if err is not None:
            return f"inference failed: {type(err).__name__}: {err}", None
        return "ok", self._answer_msg(ticket.future.result())

    @_guarded("ask", fallback=lambda _goal: AskAction.Result(success=False, message="internal error (see the log)"))
    def _execute_ask(self, goal_handle) -> AskAction.Result:
        goal = goal_handle.request
        message, answer = self._ask(goal.question, goal.camera, goal.max_age_s, goal_handle)
        result = AskAction.Result(success=answer is not None, message=message)
        if answer is not None:
            result.answer = answer
            goal_handle.succeed()
        elif message == "cancelled" and goal_handle.is_cancel_requested:
            goal_handle.canceled()
        else:
            goal_handle.abort()
        return result

    @_guarded("ask", fallback=lambda _req, resp: resp)
    def _on_ask_sync(self, request: Ask.Request, response: Ask.Response) -> Ask.Response:
        message, answer = self._ask(request.question, request.camera, request.max_age_s)
        response.success, response.message = answer is not None, message
        if answer is not None:
            response.answer = answer
        return response

    # ------------------------------------------------------------------ diagnostics

    def _backend_facts(self) -> dict[str, Any]:
        """Device, dtype and load notes of the backend; empty while a remote one is unreachable."""
        backend = self.backend
        try:
            return {"device": backend.device, "dtype": backend.dtype, "load_notes": list(backend.load_notes)}
        except (AttributeError, ServiceUnavailable):
            return {}

    @_guarded("diagnostics")
    def _publish_diagnostics(self) -> None:
        worker, backend = self.worker, self.backend
        facts = self._backend_facts() if backend is not None else {}
        device = str(facts.get("device", ""))
        status = DiagnosticStatus(name=f"{self.get_fully_qualified_name()}: vlm pipeline", hardware_id=device)
        values: dict[str, str] = {
            "lifecycle_state": self.state,
            "model_id": self.model_id,
            "backend": self._param("backend"),
            "atp_ros_version": __version__,
            "memory_rss_mb": f"{_rss_mb():.0f}",
        }
        if worker is None:
            status.level = DiagnosticStatus.ERROR if self.start_error else DiagnosticStatus.OK
            status.message = f"configure failed: {self.start_error}" if self.start_error else self.state
        else:
            recent = worker.problems.recent(RECENT_PROBLEM_S)
            queries = {c.name: worker.query(c.name) for c in self.cameras}
            if self.state == "active" and not worker.running:
                status.level = DiagnosticStatus.ERROR
                status.message = "the inference thread is not running: no frame or ask is answered"
            elif recent:
                worst = max(recent.values(), key=lambda p: p.level)
                status.level, status.message = _LEVEL[worst.level], worst.message
            elif worker.notes:  # answering, but not the way the parameters asked (e.g. CLS-only without text tower)
                status.level, status.message = DiagnosticStatus.WARN, worker.notes[0]
            elif self.state != "active":
                status.level, status.message = DiagnosticStatus.OK, self.state
            elif not any(queries.values()):
                status.level, status.message = DiagnosticStatus.OK, "waiting for a query"
            else:
                status.level, status.message = DiagnosticStatus.OK, "answering"
            values |= {
                "device": device,
                "dtype": str(facts.get("dtype", "")).removeprefix("torch."),
                "query": " | ".join(f"{c}: {q}" if c else q for c, q in queries.items() if q),
                "visual_tokens_kept": str(worker.last_kept[0]),
                "visual_tokens_total": str(worker.last_kept[1]),
                "load_notes": " | ".join(facts.get("load_notes", [])),
                "notes": " | ".join(worker.notes),
                "worker_running": str(worker.running).lower(),
            }
            stats = worker.stats()
            values |= {k: f"{v:.0f}" if isinstance(v, float) else str(v) for k, v in stats.items()}
            for stage, (p50, p95, _count) in sorted(worker.latency.summary().items()):
                values[f"{stage}_ms_p50"] = f"{p50:.2f}"
                values[f"{stage}_ms_p95"] = f"{p95:.2f}"
            values |= _cuda_memory(facts.get("device"))
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.pub_diag.publish(array)


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


def _spin(node: VlmNode, executor: MultiThreadedExecutor) -> None:
    """Spin until shutdown. A callback's exception surfaces from ``spin()``: it is reported and
    spinning resumes, so one failing callback never ends the node (ours are guarded; rclpy's own
    lifecycle and parameter services are not)."""
    while rclpy.ok(context=node.context):
        try:
            executor.spin()
            return
        except (KeyboardInterrupt, ExternalShutdownException):
            raise
        except Exception as err:
            if not rclpy.ok(context=node.context):
                return
            node._report("callback", f"a callback failed: {type(err).__name__}: {err}")


def _fatal(reason: str) -> int:
    print(f"[atp_vlm] FATAL: cannot start: {' '.join(reason.split())}", file=sys.stderr, flush=True)
    return 1


def run(args: list[str] | None = None) -> int:
    """Init, spin until Ctrl-C / SIGTERM / shutdown, clean up; 1 with one line when it cannot start."""
    rclpy.init(args=args)
    node = executor = None
    try:
        try:
            node = VlmNode()
        except (ValueError, ParameterException) as err:  # rclpy: wrong type / out of range; ours: params.check
            return _fatal(str(err))
        executor = MultiThreadedExecutor(num_threads=4)
        executor.add_node(node)
        if node.autostart:
            reason = node.bring_up()
            if reason:  # a failed configure has logged its one line already
                return 1 if node.start_error else _fatal(reason)
        _spin(node, executor)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.stop()  # ends a running decode within one token and joins the worker
        if executor is not None:
            executor.shutdown()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


def main(args: list[str] | None = None) -> None:
    """Entry point of ``vlm_node``.

    :func:`run` stops the worker, shuts the executor down and destroys the node; every
    thread the node started is joined by then. What remains is the interpreter's own
    teardown of the torch + transformers modules (about 2 s on these machines), which
    would break "Ctrl-C stops within 2 s": the process leaves right after flushing.
    """
    code = run(args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
