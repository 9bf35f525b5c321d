"""ROS image messages <-> RGB numpy arrays, with the checks a camera topic needs.

Conversion goes through ``rosbags-image`` (``message_to_cvimage``): it works on
rclpy messages and on rosbags' own messages alike (so live topics and bag replay
share one path), and it is NumPy 2-safe. cv_bridge is not used: it is not
installable on our CI machines and Humble's cv_bridge breaks under NumPy 2.

No rclpy import here: messages are duck-typed (``encoding``, ``height``, ``width``,
``step``, ``is_bigendian``, ``data``; or ``format``, ``data`` when compressed).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
from PIL import Image as PILImage
from rosbags.image import message_to_cvimage
from rosbags.image.image import ENCODINGMAP

from atp_ros.backends.errors import BadInput

# Encodings we accept on the raw topic: everything rosbags-image converts to rgb8.
SUPPORTED_ENCODINGS: frozenset[str] = frozenset(ENCODINGMAP)
# Chroma-subsampled layouts: 4:2:2 packs two pixels per chroma pair (even width), 4:2:0 also
# halves the rows (even height). OpenCV raises on other sizes.
_EVEN_WIDTH = frozenset({"uyvy", "yuv422", "yuyv", "yuv422_yuy2", "nv12", "nv21"})
_EVEN_HEIGHT = frozenset({"nv12", "nv21"})


@dataclass(frozen=True)
class ImageLimits:
    """Accepted frame sizes: ``max_pixels`` = width*height, ``max_bytes`` of compressed data."""

    max_pixels: int = 4096 * 4096
    max_bytes: int = 64 * 1024 * 1024


def _bytes_per_pixel(encoding: str) -> int:
    depth, _, _, channels = ENCODINGMAP[encoding]
    return depth // 8 * channels


def raw_to_rgb(msg: Any, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """``sensor_msgs/Image`` -> ``(H, W, 3)`` uint8 RGB. Raises :class:`BadInput`."""
    if msg.encoding not in SUPPORTED_ENCODINGS:
        raise BadInput("encoding", f"unsupported encoding {msg.encoding!r} (supported: rgb8, bgr8, mono8, ...)")
    if msg.height == 0 or msg.width == 0:
        raise BadInput("size", f"zero-size image {msg.width}x{msg.height}")
    if msg.height * msg.width > limits.max_pixels:
        raise BadInput(
            "too_large", f"image {msg.width}x{msg.height} exceeds limits.max_image_pixels={limits.max_pixels}"
        )
    if msg.encoding in _EVEN_WIDTH and (msg.width % 2 or (msg.encoding in _EVEN_HEIGHT and msg.height % 2)):
        need = "width and height" if msg.encoding in _EVEN_HEIGHT else "width"
        raise BadInput("layout", f"{msg.encoding} needs an even {need}, got {msg.width}x{msg.height}")
    row = msg.width * _bytes_per_pixel(msg.encoding)
    # height is the image's height (sensor_msgs/Image: "number of rows" of the picture); planar
    # YUV 4:2:0 stores 1.5 buffer rows of luma-width bytes per picture row.
    if msg.encoding in _EVEN_HEIGHT:
        row, rows = msg.width, msg.height * 3 // 2
    else:
        rows = msg.height
    if msg.step < row:
        raise BadInput("layout", f"step {msg.step} is smaller than one row of {msg.encoding} ({row} bytes)")
    if len(msg.data) != msg.step * rows:
        raise BadInput("layout", f"data length {len(msg.data)} != step*height = {msg.step}*{rows}")
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if msg.step != row:  # padded rows: rosbags-image assumes packed rows, so strip the padding
        data = data.reshape(rows, msg.step)[:, :row].tobytes()
    # rosbags-image reads ``height`` as the buffer's rows (4:2:0 included), not the picture's.
    packed = SimpleNamespace(
        encoding=msg.encoding, height=rows, width=msg.width, is_bigendian=msg.is_bigendian, data=data
    )
    try:
        rgb = message_to_cvimage(packed, "rgb8")
    except Exception as err:  # ImageError, ValueError, and OpenCV's cv2.error, which is none of those
        raise BadInput("encoding", f"cannot convert {msg.encoding} to rgb8: {type(err).__name__}: {err}") from err
    return _as_rgb_u8(rgb)


def compressed_to_rgb(msg: Any, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """``sensor_msgs/CompressedImage`` (jpeg/png) -> ``(H, W, 3)`` uint8 RGB. Raises :class:`BadInput`."""
    if len(msg.data) == 0:
        raise BadInput("corrupt", "empty compressed image")
    if len(msg.data) > limits.max_bytes:
        raise BadInput("too_large", f"compressed image of {len(msg.data)} bytes exceeds the limit {limits.max_bytes}")
    size = _declared_size(msg.data)  # before decoding: a few hundred bytes of JPEG can declare 20000x20000
    if size is not None and size[0] * size[1] > limits.max_pixels:
        raise BadInput("too_large", f"compressed image of {size[0]}x{size[1]} exceeds max_image_pixels")
    try:
        rgb = message_to_cvimage(msg, "rgb8")
    except Exception as err:  # rosbags asserts on undecodable data; OpenCV raises cv2.error
        raise BadInput("corrupt", f"cannot decode compressed image (format {msg.format!r})") from err
    if rgb.shape[0] * rgb.shape[1] > limits.max_pixels:
        raise BadInput("too_large", f"decoded image {rgb.shape[1]}x{rgb.shape[0]} exceeds max_image_pixels")
    return _as_rgb_u8(rgb)


def _declared_size(data: Any) -> tuple[int, int] | None:
    """``(width, height)`` from a compressed image's header (nothing decoded); None if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            with PILImage.open(io.BytesIO(data)) as img:
                return img.size
    except PILImage.DecompressionBombError as err:  # beyond Pillow's own limit (~179 Mpixel)
        raise BadInput("too_large", f"compressed image exceeds max_image_pixels ({err})") from err
    except Exception:  # not a format Pillow knows, or a broken header: OpenCV decides
        return None


def _as_rgb_u8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint16:  # 16-bit sources: keep the top byte
        img = (img >> 8).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def rgb_fields(rgb: np.ndarray) -> dict[str, Any]:
    """Fields of a ``sensor_msgs/Image`` (rgb8 or mono8) holding ``rgb`` ``(H, W[, 3])`` uint8."""
    if rgb.dtype != np.uint8 or rgb.ndim not in (2, 3):
        raise ValueError(f"expected (H, W) or (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    h, w = rgb.shape[:2]
    channels = 1 if rgb.ndim == 2 else rgb.shape[2]
    return {
        "height": h,
        "width": w,
        "encoding": "mono8" if channels == 1 else "rgb8",
        "is_bigendian": 0,
        "step": w * channels,
        "data": np.ascontiguousarray(rgb).tobytes(),
    }
