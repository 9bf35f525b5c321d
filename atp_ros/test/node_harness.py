"""Test harness for the atp_vlm node: start the installed executable, talk to it over DDS."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from atp_ros.ros import process
from atp_ros.ros.client import NodeClient, NodeNotReady
from atp_ros.ros.messages import find_status, image_msg, stamp_ns, status_level, status_values  # noqa: F401
from atp_ros.ros.process import node_executable, stop_node  # noqa: F401  (the tests import them from here)
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from rclpy.action import ActionClient
from sensor_msgs.msg import Image
from std_msgs.msg import String

from atp_ros_msgs.action import Ask as AskAction
from atp_ros_msgs.msg import VlmAnswer
from atp_ros_msgs.srv import Ask

_namespaces = itertools.count()


def start_node(model_dir: Path | str, namespace: str, log: Path, **overrides) -> subprocess.Popen:
    """Launch ``vlm_node`` in its own process with ``-p name:=value`` overrides (``a__b`` for ``a.b``)."""
    params = {"model_id": model_dir} | {name.replace("__", "."): value for name, value in overrides.items()}
    return process.start_node(namespace, params, log=log)


@contextlib.contextmanager
def running_node(model_dir: Path | str, context, log: Path, **overrides) -> Iterator[tuple[Probe, subprocess.Popen]]:
    """The installed node started (see :func:`start_node`) and ready, with a :class:`Probe` on its namespace;
    stopped like Ctrl-C and the probe closed afterwards."""
    ns = new_namespace()
    proc = start_node(model_dir, ns, log, **overrides)
    probe = Probe(context, ns)
    try:
        probe.wait_ready(proc, log)
        yield probe, proc
    finally:
        stop_node(proc)
        probe.close()


def new_namespace() -> str:
    return f"/atp_t{os.getpid()}_{next(_namespaces)}"


class Probe(NodeClient):
    """The test's side of the wire: publishes frames and questions, records every output."""

    def __init__(self, context, namespace: str) -> None:
        super().__init__("atp_probe", namespace, context)
        self.ns = namespace
        self.pub_image = self.image_publisher()
        self.pub_compressed = self.image_publisher("image/compressed", compressed=True)
        self.pub_query = self.query_publisher()
        self.answers: list[VlmAnswer] = self.record(VlmAnswer, "atp_vlm/answer")
        self.texts: list[str] = self.record(String, "atp_vlm/answer_text", attr="data")
        self.masks: list[Image] = self.record(Image, "atp_vlm/keep_mask")
        self.overlays: list[Image] = self.record(Image, "atp_vlm/overlay")
        self.diagnostics = self.record_diagnostics()
        self.ask = self.node.create_client(Ask, "atp_vlm/ask_sync")
        self.set_params = self.node.create_client(SetParameters, "atp_vlm/set_parameters")
        self.get_state_client = self.node.create_client(GetState, "atp_vlm/get_state")
        self.change_state_client = self.node.create_client(ChangeState, "atp_vlm/change_state")
        self.ask_action = ActionClient(self.node, AskAction, "atp_vlm/ask")

    def clear(self) -> None:
        with self.lock:
            for store in (self.answers, self.texts, self.masks, self.overlays, self.diagnostics):
                store.clear()

    def wait_ready(self, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
        """Until the node's answer publisher is matched (model loaded, DDS discovered) and ~/ask_sync is up."""
        try:
            super().wait_ready(proc, log, timeout, also=self.ask.service_is_ready)
        except NodeNotReady as err:
            raise AssertionError(str(err)) from None

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
        """Key/values of the node's latest diagnostics status, with ``_level`` and ``_message``."""
        for array in reversed(self.snapshot(self.diagnostics)):
            status = find_status(array, f"{self.ns}/atp_vlm:")
            if status is not None:
                return status_values(status) | {"_level": str(status_level(status)), "_message": status.message}
        return {}


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
