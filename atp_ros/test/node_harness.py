"""Test harness for the atp_vlm node: start the installed executable, talk to it over DDS."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import rclpy
from atp_ros.backends import images as image_io
from atp_ros.ros.process import node_executable, stop_node  # noqa: F401  (the tests import stop_node from here)
from diagnostic_msgs.msg import DiagnosticArray
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from atp_ros_msgs.action import Ask as AskAction
from atp_ros_msgs.msg import VlmAnswer
from atp_ros_msgs.srv import Ask

_namespaces = itertools.count()


def start_node(model_dir: Path | str, namespace: str, log: Path, **overrides) -> subprocess.Popen:
    """Launch ``vlm_node`` in its own process with ``-p name:=value`` overrides (``a__b`` for ``a.b``).

    Its SIGINT disposition is the default even when the test runner was started in the
    background (where children inherit SIGINT ignored): the tests send it Ctrl-C.
    """
    args = [str(node_executable()), "--ros-args", "-r", f"__ns:={namespace}", "-p", f"model_id:={model_dir}"]
    for name, value in overrides.items():
        if isinstance(value, bool):
            value = str(value).lower()
        args += ["-p", f"{name.replace('__', '.')}:={value}"]
    with log.open("w") as out:
        return subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy(), preexec_fn=_default_sigint
        )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def new_namespace() -> str:
    return f"/atp_t{os.getpid()}_{next(_namespaces)}"


def image_msg(rgb: np.ndarray, stamp_ns: int, frame_id: str = "camera") -> Image:
    msg = Image(**image_io.rgb_fields(rgb))
    msg.header.frame_id = frame_id
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
    return msg


def stamp_ns(header) -> int:
    return header.stamp.sec * 1_000_000_000 + header.stamp.nanosec


class Probe:
    """The test's side of the wire: publishes frames and questions, records every output."""

    def __init__(self, context, namespace: str) -> None:
        self.ns = namespace
        self.node = rclpy.create_node("atp_probe", namespace=namespace, context=context)
        standing = QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        )
        self.pub_image = self.node.create_publisher(Image, "image", qos_profile_sensor_data)
        self.pub_compressed = self.node.create_publisher(CompressedImage, "image/compressed", qos_profile_sensor_data)
        self.pub_query = self.node.create_publisher(String, "atp_vlm/query", standing)
        self.answers: list[VlmAnswer] = []
        self.texts: list[str] = []
        self.masks: list[Image] = []
        self.overlays: list[Image] = []
        self.diagnostics: list[DiagnosticArray] = []
        self._lock = threading.Lock()
        reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(VlmAnswer, "atp_vlm/answer", self._keep(self.answers), reliable)
        self.node.create_subscription(String, "atp_vlm/answer_text", self._keep(self.texts, "data"), reliable)
        self.node.create_subscription(Image, "atp_vlm/keep_mask", self._keep(self.masks), reliable)
        self.node.create_subscription(Image, "atp_vlm/overlay", self._keep(self.overlays), reliable)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._keep(self.diagnostics), 50)
        self.ask = self.node.create_client(Ask, "atp_vlm/ask_sync")
        self.set_params = self.node.create_client(SetParameters, "atp_vlm/set_parameters")
        self.get_state_client = self.node.create_client(GetState, "atp_vlm/get_state")
        self.change_state_client = self.node.create_client(ChangeState, "atp_vlm/change_state")
        self.ask_action = ActionClient(self.node, AskAction, "atp_vlm/ask")
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self._spin = threading.Thread(target=self.executor.spin, daemon=True)
        self._spin.start()

    def _keep(self, store: list, attr: str | None = None) -> Callable:
        def callback(msg) -> None:
            with self._lock:
                store.append(getattr(msg, attr) if attr else msg)

        return callback

    def snapshot(self, store: list) -> list:
        with self._lock:
            return list(store)

    def clear(self) -> None:
        with self._lock:
            for store in (self.answers, self.texts, self.masks, self.overlays, self.diagnostics):
                store.clear()

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def wait_ready(self, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
        """Until the node's answer publisher is matched (model loaded, DDS discovered)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"node exited with {proc.returncode}:\n{log.read_text()}")
            if self.node.count_publishers(f"{self.ns}/atp_vlm/answer") and self.ask.service_is_ready():
                return
            time.sleep(0.1)
        raise AssertionError(f"node not ready after {timeout} s:\n{log.read_text()}")

    def ask_question(self, question: str, max_age_s: float = 0.0, timeout: float = 60.0) -> Ask.Response:
        future = self.ask.call_async(Ask.Request(question=question, max_age_s=max_age_s))
        self.wait_for(future.done, timeout, f"~/ask({question!r})")
        return future.result()

    def call(self, client, request, what: str, timeout: float = 60.0):
        """Call a service and wait for the response."""
        self.wait_for(client.service_is_ready, 30, f"{what} service")
        future = client.call_async(request)
        self.wait_for(future.done, timeout, what)
        return future.result()

    def lifecycle_state(self) -> str:
        return self.call(self.get_state_client, GetState.Request(), "get_state").current_state.label

    def transition(self, name: str) -> bool:
        """Trigger a lifecycle transition by name (configure, activate, deactivate, cleanup, shutdown)."""
        ids = {
            "configure": Transition.TRANSITION_CONFIGURE,
            "activate": Transition.TRANSITION_ACTIVATE,
            "deactivate": Transition.TRANSITION_DEACTIVATE,
            "cleanup": Transition.TRANSITION_CLEANUP,
            "shutdown": Transition.TRANSITION_ACTIVE_SHUTDOWN,
        }
        request = ChangeState.Request(transition=Transition(id=ids[name]))
        return self.call(self.change_state_client, request, name).success

    def set_parameter(self, name: str, value) -> tuple[bool, str]:
        if isinstance(value, bool):
            pv = ParameterValue(type=ParameterType.PARAMETER_BOOL, bool_value=value)
        elif isinstance(value, int):
            pv = ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=value)
        elif isinstance(value, float):
            pv = ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=value)
        else:
            pv = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=value)
        self.wait_for(self.set_params.service_is_ready, 10, "set_parameters service")
        future = self.set_params.call_async(SetParameters.Request(parameters=[Parameter(name=name, value=pv)]))
        self.wait_for(future.done, 10, f"set {name}")
        result = future.result().results[0]
        return result.successful, result.reason

    def status_values(self) -> dict[str, str]:
        """Key/values of the node's latest diagnostics status."""
        for array in reversed(self.snapshot(self.diagnostics)):
            for status in array.status:
                if status.name.startswith(f"{self.ns}/atp_vlm:"):
                    return {kv.key: kv.value for kv in status.values} | {
                        "_level": str(
                            int.from_bytes(status.level, "little") if isinstance(status.level, bytes) else status.level
                        ),
                        "_message": status.message,
                    }
        return {}

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()


def publish_until_answer(probe: Probe, msg, timeout: float = 30.0):
    """Publish ``msg`` (best effort) until an answer with its stamp arrives; returns that answer."""
    want = stamp_ns(msg.header)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe.pub_image.publish(msg)
        for _ in range(10):
            for answer in probe.snapshot(probe.answers):
                if stamp_ns(answer.header) == want:
                    return answer
            time.sleep(0.05)
    raise AssertionError(f"no answer for frame stamped {want} within {timeout} s")
