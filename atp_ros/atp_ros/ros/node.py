"""ROS 2 lifecycle node ``atp_vlm``: camera + question in; answers, keep masks, overlays, diagnostics out.

The ROS adapter around :class:`atp_ros.ros.worker.InferenceWorker` (latest-frame slots, the
inference thread, rate cap, problem log, statistics); images are converted by ``image_io``,
answers and images built by ``messages``, the status computed by ``diagnostics``, asks served
by ``asks``, parameters described in ``params``.

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
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
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
from atp_ros.backends.errors import ModelLoadError, ServiceUnavailable
from atp_ros.backends.loading import release_cuda_cache
from atp_ros.ros import diagnostics, messages, overlay, params, transport
from atp_ros.ros.asks import AskEndpoints
from atp_ros.ros.callbacks import guarded, install_signal_handlers, shutdown, spin
from atp_ros.ros.worker import ERROR, WARN, BadInput, InferenceWorker, Outcome
from atp_ros_msgs.msg import VlmAnswer


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


class VlmNode(AskEndpoints, LifecycleNode):
    """Answers the standing question about each camera frame with an ATP-gated VLM."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("atp_vlm", **kwargs)
        for spec in params.PARAMS:
            if isinstance(spec.default, tuple):  # typed, writable, an unset one a typed [], then read-only:
                # rclpy answers a get_parameters request naming an uninitialized parameter with no values at all
                self.declare_parameter(spec.name, Parameter.Type.STRING_ARRAY, ParameterDescriptor())
                if self._param(spec.name) is None:
                    self.set_parameters([Parameter(spec.name, Parameter.Type.STRING_ARRAY, list(spec.default))])
                self.set_descriptor(spec.name, messages.descriptor(spec, Parameter.Type.STRING_ARRAY))
            else:
                self.declare_parameter(spec.name, spec.default, messages.descriptor(spec))
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
                + (
                    f" {b.num_visual_tokens} visual tokens on a {b.grid[0]}x{b.grid[1]} grid"
                    if b.grid is not None
                    else f" a token grid per frame (at most {b.num_visual_tokens} visual tokens)"
                )
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
        reliable = messages.reliable(10)
        for cam in self.cameras:
            cam.answer = self.create_lifecycle_publisher(VlmAnswer, cam.private("answer"), reliable)
            cam.text = self.create_lifecycle_publisher(String, cam.private("answer_text"), reliable)
            cam.mask = self.create_lifecycle_publisher(Image, cam.private("keep_mask"), reliable)
            cam.overlay = self.create_lifecycle_publisher(Image, cam.private("overlay"), reliable)
            cam.relevance = self.create_lifecycle_publisher(Image, cam.private("relevance"), reliable)
        self._create_asks()
        self.state = "inactive"
        return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Subscribe to the cameras and queries and start answering."""
        compressed = self._param("image_transport") == "compressed"
        image_type = CompressedImage if compressed else Image
        topics = []
        for cam in self.cameras:
            # image_transport's convention: <remapped base topic>/compressed, so `-r image:=/cam/image` carries over
            topic = self.resolve_topic_name(cam.topic("image")) + ("/compressed" if compressed else "")
            topics.append(topic)
            lost = transport.loss_events(lambda: self.worker, cam.name, topic, len(self.cameras) > 1)
            self._subscriptions_io.append(
                self.create_subscription(
                    image_type, topic, partial(self._on_image, cam.name), qos_profile_sensor_data,
                    callback_group=self._input_group, event_callbacks=lost,
                )
            )  # fmt: skip
        self._subscribe_query("~/query", None)  # every camera's question
        relative = self.resolve_topic_name("query")  # `-r query:=/planner/question` remaps this spelling, not ~/query
        if relative != self.resolve_topic_name("query", only_expand=True):
            self._subscribe_query(relative, None)
        for cam in self.cameras:
            if cam.name:
                self._subscribe_query(cam.private("query"), cam.name)
        self.worker.start()
        self.state = "active"
        self.get_logger().info(f"active: listening on {', '.join(topics)} and {self.resolve_topic_name('~/query')}")
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
            from atp_ros.serving.client import RemoteBackend

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
        self._destroy_asks()
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
        standing = messages.STANDING
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

    @guarded("callback")
    def _on_image(self, camera: str, msg: Image | CompressedImage) -> None:
        worker = self.worker
        if worker is not None:  # None: a frame delivered while the node was cleaning up
            worker.put_frame(camera, msg)

    @guarded("callback")
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
        # One call site per severity: rclpy raises when one call site logs at two severities.
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

    def _publish(self, outcome: Outcome) -> None:
        """Publish one answered frame on its camera's topics (called on the worker thread)."""
        try:
            self._publish_outcome(outcome)
        except Exception:
            if not self.context.ok():  # a signal shut the context down mid-publish: stop quietly, no fault
                worker = self.worker
                if worker is not None:
                    worker.request_stop()
            raise

    def _publish_outcome(self, outcome: Outcome) -> None:
        cam = next(c for c in self.cameras if c.name == outcome.frame.camera)
        header = outcome.frame.payload.header
        mask = outcome.result.keep_mask(0)  # (h, w) uint8, shared by the answer, the mask image and the overlay
        scores = messages.score_grid(outcome.result)  # (h, w) float32: one host copy, for the answer and ~/relevance
        answer = messages.answer_msg(outcome, self.model_id, mask, scores)
        cam.answer.publish(answer)
        cam.text.publish(String(data=answer.answer))
        if cam.mask.get_subscription_count():
            cam.mask.publish(messages.mask_image(mask, header))
        if cam.relevance.get_subscription_count():
            cam.relevance.publish(messages.relevance_image(scores, header))
        if cam.overlay.get_subscription_count():  # the overlay costs a full-frame pass: only when watched
            picture = overlay.overlay(outcome.rgb, mask, outcome.result.views[0])
            cam.overlay.publish(messages.rgb_image(picture, header))

    # ------------------------------------------------------------------ asks

    # ------------------------------------------------------------------ diagnostics

    def _backend_facts(self) -> dict[str, Any]:
        """Device, dtype and load notes of the backend; empty while a remote one is unreachable."""
        backend = self.backend
        try:
            return {"device": backend.device, "dtype": backend.dtype, "load_notes": list(backend.load_notes)}
        except (AttributeError, ServiceUnavailable):
            return {}

    @guarded("diagnostics")
    def _publish_diagnostics(self) -> None:
        worker, backend = self.worker, self.backend
        facts = self._backend_facts() if backend is not None else {}
        base = {
            "lifecycle_state": self.state,
            "model_id": self.model_id,
            "backend": self._param("backend"),
            "atp_ros_version": __version__,
            "memory_rss_mb": f"{diagnostics.rss_mb():.0f}",
        }
        view = None if worker is None else diagnostics.snapshot(worker, [c.name for c in self.cameras])
        level, message, values = diagnostics.status(self.state, view, self.start_error, facts, base)
        status = DiagnosticStatus(
            name=f"{self.get_fully_qualified_name()}: vlm pipeline",
            hardware_id=str(facts.get("device", "")),
            level=bytes([level]),
            message=message,
            values=[KeyValue(key=k, value=v) for k, v in values.items()],
        )
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        self.pub_diag.publish(array)


def _fatal(reason: str) -> int:
    print(f"[atp_vlm] FATAL: cannot start: {' '.join(reason.split())}", file=sys.stderr, flush=True)
    return 1


def run(args: list[str] | None = None) -> int:
    """Init, spin until Ctrl-C / SIGTERM / shutdown, clean up; 1 with one line when it cannot start."""
    install_signal_handlers()  # before rclpy.init, which chains its handler to ours
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
        spin(node, executor)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        if rclpy.ok():
            raise
        # A SIGINT/SIGTERM shut the context down while the node was still being built (rclpy then
        # fails to publish on the dead context): a normal stop, not a crash.
    finally:
        shutdown(node, executor)
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
