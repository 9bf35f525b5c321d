"""What travels between a client and the deployment: requests, results and frames; no Ray here.

Frames travel as raw HxWx3 uint8 RGB arrays or as PNG / JPEG bytes. Bytes are decoded by the
node's own decoder (:func:`atp_ros.backends.images.compressed_to_rgb`), with its size limits and
its guard against images whose header declares far more pixels than they carry.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from atp_ros.backends.errors import BadInput
from atp_ros.backends.images import ImageLimits, compressed_to_rgb
from atp_ros.backends.results import VlmResult
from atp_ros.backends.stages import questions_for
from atp_ros.method import AtpConfig
from atp_ros.stream import ReuseConfig, ReuseDecision

Image = np.ndarray | bytes  # an HxWx3 uint8 RGB array, or a JPEG / PNG file's bytes
IMAGE_FORMATS = ("raw", "png", "jpeg")  # how a client sends frames
_MAGIC = {b"\x89PNG": "png", b"\xff\xd8": "jpeg"}  # file signatures, to name the format in errors


@dataclass(frozen=True)
class ServeRequest:
    """One caller's frames and questions (one question per frame) with the settings to answer them."""

    images: tuple[Image, ...]
    questions: tuple[str, ...]
    atp: AtpConfig = field(default_factory=AtpConfig)
    max_new_tokens: int = 32
    # A camera stream's frame (one image): the replica keeps per-stream reuse state keyed by ``stream``
    # and answers it like the node's reuse.mode, ``stamp_s`` being its stream time.
    stream: str = ""
    reuse: ReuseConfig = field(default_factory=ReuseConfig)
    stamp_s: float = 0.0

    @property
    def streamed(self) -> bool:
        """A stream's frame with reuse on: answered alone, with the stream's state."""
        return bool(self.stream) and self.reuse.mode != "none"

    @property
    def key(self) -> tuple[AtpConfig, int]:
        """Requests with equal keys share one backend call."""
        return self.atp, self.max_new_tokens


@dataclass(frozen=True)
class ServedResult:
    """A request's own part of a batched call, and how it was batched."""

    result: VlmResult  # this request's images only (timings: the whole call's)
    batch_size: int  # requests in the batch Ray formed
    call_images: int  # images in the backend call this request rode in
    call_id: str  # that call (unique across replicas)
    offset: int  # where this request's first image sat in that call
    reused: ReuseDecision | None = None  # a stream's frame answered from its cache (no model ran)
    recomputed: int | None = None  # token reuse: patches the tower re-ran for this frame


def encode_image(rgb: np.ndarray, fmt: str = "png", quality: int = 90) -> bytes:
    """An HxWx3 uint8 frame as PNG (lossless) or JPEG (``quality``) bytes."""
    from PIL import Image as PILImage

    if fmt not in ("png", "jpeg"):
        raise ValueError(f"image format must be png or jpeg, got {fmt!r}")
    buf = io.BytesIO()
    PILImage.fromarray(np.asarray(rgb, np.uint8)).save(buf, format=fmt.upper(), quality=quality)
    return buf.getvalue()


def decode_image(image: Image, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """An HxWx3 uint8 RGB array from raw pixels or JPEG / PNG bytes.

    Raises :class:`BadInput` (a ValueError) for bytes that do not decode, an array of another
    shape or type, a frame without pixels and a frame beyond ``limits``.
    """
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        fmt = next((name for magic, name in _MAGIC.items() if data.startswith(magic)), "unknown")
        try:
            image = compressed_to_rgb(SimpleNamespace(format=fmt, data=data), limits)
        except BadInput as err:
            raise BadInput(err.cause, f"cannot decode image bytes ({len(data)} bytes): {err}") from None
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise BadInput("encoding", f"expected an HxWx3 uint8 RGB array, got {arr.dtype} {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:  # the node's raw_to_rgb refuses these too
        raise BadInput("size", f"zero-size image {arr.shape[1]}x{arr.shape[0]}")
    if arr.shape[0] * arr.shape[1] > limits.max_pixels:
        raise BadInput("too_large", f"image {arr.shape[1]}x{arr.shape[0]} exceeds max_image_pixels={limits.max_pixels}")
    return arr


def _checked_settings(
    images: Sequence[Image], questions: Sequence[str] | str, atp: AtpConfig, max_new_tokens: int
) -> list[str]:
    """One question per image; ValueError naming what is wrong with the questions or settings."""
    qs = questions_for(list(images), questions)
    atp.check()
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return qs


def make_request(
    images: Sequence[Image],
    questions: Sequence[str] | str,
    atp: AtpConfig,
    max_new_tokens: int,
    image_format: str = "raw",
    jpeg_quality: int = 90,
    stream: str = "",
    reuse: ReuseConfig = ReuseConfig(),
    stamp_s: float = 0.0,
) -> ServeRequest:
    """The request for these frames, checked first (a bad one never travels).

    Arrays go as they are (``raw``) or encoded in ``image_format``; bytes go as they are.
    """
    qs = _checked_settings(images, questions, atp, max_new_tokens)
    reuse.check()
    if stream and reuse.mode != "none" and len(images) != 1:
        raise ValueError(f"a stream's request carries one frame, got {len(images)}")
    payload: list[Image] = []
    for img in images:
        if isinstance(img, bytes):
            payload.append(img)
        elif image_format == "raw":
            payload.append(decode_image(img))
        else:
            payload.append(encode_image(decode_image(img), image_format, jpeg_quality))
    return ServeRequest(tuple(payload), tuple(qs), atp, int(max_new_tokens), stream, reuse, float(stamp_s))


def checked_frames(request: ServeRequest) -> list[np.ndarray]:
    """The request's frames decoded; ValueError (:class:`BadInput` for a frame) naming what is wrong."""
    frames = [decode_image(img) for img in request.images]
    _checked_settings(frames, request.questions, request.atp, request.max_new_tokens)
    return frames
