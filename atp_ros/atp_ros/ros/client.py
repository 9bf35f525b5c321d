"""The other end of the wire: a small rclpy node that feeds an atp_vlm node and records what it says.

Publishes camera frames and standing questions, records answers, images and ``/diagnostics``, and
waits until the node is ready (its answer publisher discovered, optionally more). It spins on its
own thread, in its own rclpy context unless given one. The demos, the live replay, the soak and the
tests build on it; :mod:`atp_ros.ros.process` starts the node it talks to.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from atp_ros.ros import messages, process
from atp_ros.ros.process import log_tail


class NodeNotReady(RuntimeError):
    """The node exited or was not ready in time; the message says which, with its log's end."""


class NodeClient:
    """A client node in ``namespace``; ``context`` None: one of its own, shut down by :meth:`close`."""

    def __init__(self, name: str, namespace: str = "", context: Any = None) -> None:
        self._own_context = context is None
        process.use_dds_profile()  # this client sends camera frames: the sender's side needs the profile
        if context is None:
            context = rclpy.context.Context()
            rclpy.init(context=context)
        self.context = context
        self.node = rclpy.create_node(name, namespace=namespace or None, context=context)
        self.lock = threading.Lock()
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self._closing = threading.Event()
        self._spin = threading.Thread(target=self._spin_until_closed, daemon=True)
        self._spin.start()

    def _spin_until_closed(self) -> None:
        # An entity destroyed from another thread while the executor builds its wait set raises
        # InvalidHandle there (e.g. a camera publisher replaced mid-run): spinning must go on.
        while not self._closing.is_set() and self.context.ok():
            try:
                self.executor.spin()
                return
            except ExternalShutdownException:
                return
            except Exception:
                time.sleep(0.01)

    # ------------------------------------------------------------------ publishing

    def image_publisher(self, topic: str = "image", compressed: bool = False) -> Any:
        """Camera frames (sensor-data QoS, like a camera driver)."""
        return self.node.create_publisher(CompressedImage if compressed else Image, topic, qos_profile_sensor_data)

    def query_publisher(self, topic: str = "atp_vlm/query") -> Any:
        """Standing questions (reliable, transient local: a node that starts later still gets the latest)."""
        return self.node.create_publisher(String, topic, messages.STANDING)

    # ------------------------------------------------------------------ recording

    def subscribe(self, msg_type: Any, topic: str, callback: Callable, depth: int = 50, raw: bool = False) -> Any:
        """A reliable subscription; ``callback`` runs on the client's spin thread."""
        return self.node.create_subscription(msg_type, topic, callback, messages.reliable(depth), raw=raw)

    def record(self, msg_type: Any, topic: str, depth: int = 50, attr: str | None = None) -> list:
        """A list that every message on ``topic`` (or its ``attr``) is appended to; read it with :meth:`snapshot`."""
        store: list = []

        def keep(msg: Any) -> None:
            with self.lock:
                store.append(getattr(msg, attr) if attr else msg)

        self.subscribe(msg_type, topic, keep, depth)
        return store

    def record_diagnostics(self) -> list[DiagnosticArray]:
        """Every ``/diagnostics`` array (depth 50, the default QoS of a diagnostics publisher)."""
        return self.record(DiagnosticArray, "/diagnostics")

    def snapshot(self, store: list) -> list:
        """A copy of a recorded list, taken under the lock the recording appends under."""
        with self.lock:
            return list(store)

    # ------------------------------------------------------------------ waiting

    @staticmethod
    def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> None:
        """Until ``predicate()`` is true; AssertionError naming ``what`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def answering(self, target: str = "atp_vlm") -> bool:
        """True once the node ``target`` (relative to this client's namespace, or absolute) publishes answers here."""
        return self.node.count_publishers(self.node.resolve_topic_name(f"{target}/answer")) > 0

    def wait_ready(
        self,
        proc: subprocess.Popen | None = None,
        log: Path | None = None,
        timeout: float = 90.0,
        target: str = "atp_vlm",
        also: Callable[[], bool] | None = None,
    ) -> None:
        """Until ``target``'s answer publisher is discovered (model loaded, DDS matched) and ``also()`` holds.

        :class:`NodeNotReady` when ``proc`` exits first or ``timeout`` passes, with the end of ``log``.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise NodeNotReady(f"node exited with {proc.returncode}:\n{log_tail(log)}")
            if self.answering(target) and (also is None or also()):
                return
            time.sleep(0.1)
        raise NodeNotReady(f"node not ready after {timeout:g} s:\n{log_tail(log)}")

    def close(self) -> None:
        """Stop spinning and destroy the node (and the context when it is the client's own)."""
        self._closing.set()
        self.executor.shutdown()
        self._spin.join(5)
        self.node.destroy_node()
        if self._own_context:
            rclpy.try_shutdown(context=self.context)
