"""Frames lost in transport: the subscription's message-lost event, counted per camera and explained.

A best-effort camera subscription hears of frames the middleware dropped (Fast DDS reports gaps in
the sample sequence). Each loss is counted in the worker's counters (``frames_lost``, or
``<camera>.frames_lost`` with several cameras), so ``/diagnostics`` shows it, and reported as a
``frames_lost`` problem (WARN) whose line says what to set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rclpy.event_handler import SubscriptionEventCallbacks

from atp_ros.problems import WARN

HINT = (
    "large frames need the Fast DDS profile on the SENDING side (the camera driver) as well as here: "
    "FASTDDS_DEFAULT_PROFILES_FILE=$(ros2 pkg prefix atp_ros)/share/atp_ros/config/fastdds_large_frames.xml "
    "RMW_FASTRTPS_USE_QOS_FROM_XML=0 (docs/node.md, 'Frames that arrive')"
)


def loss_events(
    worker_of: Callable[[], Any], camera: str, topic: str, many_cameras: bool
) -> SubscriptionEventCallbacks:
    """Event callbacks for a camera subscription that count lost frames into the current worker."""

    def on_lost(info: Any) -> None:
        worker = worker_of()
        lost = int(getattr(info, "total_count_change", 0))
        if worker is None or lost <= 0:
            return
        worker.counters.inc("frames_lost", lost)
        if many_cameras:
            worker.counters.inc(f"{camera}.frames_lost", lost)
        worker.problem("frames_lost", WARN, f"{lost} frame(s) lost in transport on {topic}: {HINT}")

    return SubscriptionEventCallbacks(message_lost=on_lost)
