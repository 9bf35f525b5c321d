"""Callbacks that never end the node: a guard for each ROS callback and a spin that resumes after one fails."""

from __future__ import annotations

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
                self._report(cause, f"{callback.__name__} failed: {type(err).__name__}: {err}")
                return fallback(*args) if fallback is not None else None

        return guard

    return wrap


def spin(node: Any, executor: Executor) -> None:
    """Spin until shutdown. A callback's exception surfaces from ``spin()``: it is reported by the
    node's ``_report`` and spinning resumes, so one failing callback never ends the node (the node's
    own callbacks are guarded; rclpy's lifecycle and parameter services are not)."""
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
