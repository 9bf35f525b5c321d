"""Message conversion of the atp_vlm node and its clients: answers, images, stamps, diagnostics, QoS, parameters.

``VlmAnswer`` from a worker outcome, the keep mask / relevance / overlay images, camera frames
from RGB arrays, header stamps in nanoseconds, and the key/values of a ``DiagnosticStatus``.
Message packages only; no rclpy node here.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

from atp_ros.backends import images as image_io
from atp_ros.ros import overlay, params
from atp_ros_msgs.msg import VlmAnswer

# The standing question: the latest one reaches a subscriber that joins later.
STANDING = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


def reliable(depth: int = 10) -> QoSProfile:
    """Reliable, volatile: the node's outputs and what records them."""
    return QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE)


def score_grid(result: Any) -> np.ndarray:
    """The fused ATP score of image 0 of a ``VlmResult`` on its ``(h, w)`` patch grid, float32 on the host."""
    return result.score_grid(0)


def answer_msg(
    outcome: Any, model_id: str, mask: np.ndarray | None = None, scores: np.ndarray | None = None
) -> VlmAnswer:
    """The VlmAnswer of a worker ``Outcome``; ``mask`` / ``scores`` are its ``(h, w)`` grids when already at hand."""
    result = outcome.result
    h, w = result.grid_of(0)
    mask = result.keep_mask(0) if mask is None else mask
    scores = score_grid(result) if scores is None else scores
    msg = VlmAnswer()
    msg.header = outcome.frame.payload.header
    msg.camera = outcome.frame.camera
    msg.query = outcome.question
    msg.answer = result.answers[0]
    msg.model_id = model_id
    msg.visual_tokens_total = int(result.visual_tokens_total[0])
    msg.visual_tokens_kept = int(result.visual_tokens_kept[0])
    msg.grid_height, msg.grid_width = int(h), int(w)
    msg.keep_mask = mask.reshape(-1).tobytes()
    msg.alpha = float(result.alpha_used)
    view = result.views[0]
    msg.view_box = [float(v) for v in view.as_tuple()]
    msg.relevant_box = [float(v) for v in overlay.relevant_region(scores, view)]
    reuse = getattr(outcome, "reuse", None)
    if reuse is None:
        msg.inference_ms = float(result.timings.total)
    else:  # the model did not run: the time is the change check's
        msg.inference_ms = float((time.monotonic() - outcome.started) * 1e3)
        msg.reused = True
        msg.frames_since_full_run = int(reuse.frames_since_full)
        msg.full_run_age_ms = float(reuse.age_s * 1e3)
    msg.latency_ms = float((time.monotonic() - outcome.frame.received) * 1e3)
    return msg


def rgb_image(rgb: np.ndarray, header: Any = None) -> Image:
    """An ``rgb8`` Image of an ``(H, W, 3)`` uint8 array."""
    msg = Image(**image_io.rgb_fields(rgb))
    if header is not None:
        msg.header = header
    return msg


def mask_image(mask: np.ndarray, header: Any) -> Image:
    """The keep mask (``(h, w)`` uint8) as the node's ``~/keep_mask`` image."""
    return rgb_image(overlay.mask_image(mask), header)


def relevance_image(scores: np.ndarray, header: Any) -> Image:
    """The fused score on the patch grid as a ``32FC1`` image (``~/relevance``)."""
    gh, gw = scores.shape
    return Image(header=header, height=gh, width=gw, encoding="32FC1", is_bigendian=0, step=gw * 4,
                 data=scores.astype("<f4").tobytes())  # fmt: skip


def image_msg(rgb: np.ndarray, stamp: int, frame_id: str = "camera") -> Image:
    """A camera frame: ``rgb`` stamped ``stamp`` nanoseconds."""
    msg = rgb_image(rgb)
    msg.header.frame_id = frame_id
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(stamp), 1_000_000_000)
    return msg


def stamp_ns(header: Any) -> int:
    """A header's stamp in nanoseconds: the key that matches an answer to its frame."""
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def status_level(status: Any) -> int:
    """A ``DiagnosticStatus`` level as an int (rclpy hands it over as one byte)."""
    level = status.level
    return int.from_bytes(level, "little") if isinstance(level, bytes) else int(level)


def status_values(status: Any) -> dict[str, str]:
    """A ``DiagnosticStatus``'s key/values."""
    return {kv.key: kv.value for kv in status.values}


def find_status(array: Any, prefix: str) -> Any:
    """The status of ``array`` whose name starts with ``prefix`` (a node's name), else None."""
    return next((s for s in array.status if s.name.startswith(prefix)), None)


def descriptor(spec: params.Param, type_: Any = None) -> ParameterDescriptor:
    """The ROS parameter descriptor of one of the node's parameters: description, read-only, range, choices
    (and ``type_``, an ``rclpy.parameter.Parameter.Type``, where the declaration cannot infer it)."""
    desc = ParameterDescriptor(description=spec.description, read_only=not spec.runtime)
    if type_ is not None:
        desc.type = type_.value
    if spec.choices:
        desc.additional_constraints = "one of: " + ", ".join(spec.choices)
    if spec.low is not None and not isinstance(spec.default, bool):
        if isinstance(spec.default, int):
            desc.integer_range = [IntegerRange(from_value=int(spec.low), to_value=int(spec.high), step=1)]
        else:
            desc.floating_point_range = [FloatingPointRange(from_value=spec.low, to_value=spec.high, step=0.0)]
    return desc
