"""Callbacks that never end the node: a guard for each ROS callback, a spin that resumes after one
fails, signals that stop a spin without an exception, and a shutdown that no second signal interrupts."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from functools import wraps
from typing import Any

import rclpy
from rclpy.executors import Executor, ExternalShutdownException


def guarded(cause: str, fallback: Callable | None = None) -> Callable:
    """Wrap a node method used as a ROS callback: an exception it raises is counted under ``cause``
    by the node's ``_report`` (logged once per 1st/10th/100th...), never raised into the executor,
    where it would end ``spin()`` and the process. ``fallback(*args)`` is then the return value."""

    def wrap(callback: Callable) -> Callable:
        @wraps(callback)
        def guard(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return callback(self, *args, **kwargs)
            except Exception as err:
                if self.context.ok():  # else the process is shutting down: a publish on a dead context is no fault
                    self._report(cause, f"{callback.__name__} failed: {type(err).__name__}: {err}")
                return fallback(*args) if fallback is not None else None

        return guard

    return wrap


_spinning = threading.Event()


def install_signal_handlers() -> None:
    """Route SIGINT and SIGTERM so that, while :func:`spin` runs, they stop it without an exception.

    Call it before ``rclpy.init``: rclpy's own handler (which shuts the context down, so ``spin``
    returns) then chains to this one. Python's default SIGINT handler raises ``KeyboardInterrupt``
    wherever the main thread happens to be; inside the executor that can be halfway through building
    an rclpy ``Task``, whose ``__del__`` then prints a traceback on the way out. Outside ``spin``
    (building the node, an autostart loading its model) a signal still raises ``KeyboardInterrupt``,
    so a long load is cut short.
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)


def _on_signal(signum: int, frame: Any) -> None:
    if not _spinning.is_set():
        raise KeyboardInterrupt


def spin(node: Any, executor: Executor) -> None:
    """Spin until shutdown. A callback's exception surfaces from ``spin()``: it is reported by the
    node's ``_report`` (or logged) and spinning resumes, so one failing callback never ends the node (the node's
    own callbacks are guarded; rclpy's lifecycle and parameter services are not)."""
    _spinning.set()
    try:
        while rclpy.ok(context=node.context):
            try:
                executor.spin()
                return
            except (KeyboardInterrupt, ExternalShutdownException):
                raise
            except Exception as err:
                if not rclpy.ok(context=node.context):
                    return  # e.g. Ctrl-C landing inside rclpy's message conversion: shutting down, no fault
                report = getattr(node, "_report", None)
                if report is not None:
                    report("callback", f"a callback failed: {type(err).__name__}: {err}")
                else:
                    node.get_logger().error(f"a callback failed: {type(err).__name__}: {err}")
    finally:
        _spinning.clear()


def shutdown(node: Any, executor: Executor | None) -> None:
    """Stop answering and release ROS resources; never raises, and no signal interrupts it.

    ``ros2 launch`` forwards the terminal's Ctrl-C as a second SIGINT, and a supervisor may add
    SIGTERM: landing inside this cleanup they would end the process with a traceback (and launch
    would report a crash), so later signals are ignored here; every step is bounded in time.
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    stop = getattr(node, "stop", None)
    if stop is not None:
        _quietly(stop, 5.0)  # ends the work in progress (a decode within one token, a task) and joins the worker
    idle = executor is None or _quietly(executor.shutdown, 2.0)
    if node is not None and idle:  # a callback still running (a transition loading a model) keeps the node
        _quietly(node.destroy_node)
    _quietly(rclpy.try_shutdown)


def _quietly(step: Callable, *args: Any) -> Any:
    """``step(*args)``; an error there (a context already invalid) changes nothing: we are leaving."""
    try:
        return step(*args)
    except Exception:
        return False
