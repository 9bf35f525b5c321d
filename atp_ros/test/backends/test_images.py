"""Image conversion and validation on real sensor_msgs messages; keep-mask images; parameter checks."""

from __future__ import annotations

import numpy as np
import pytest

sensor_msgs = pytest.importorskip("sensor_msgs.msg")

from atp_ros.backends import images as image_io  # noqa: E402
from atp_ros.ros import overlay, params  # noqa: E402
from atp_ros.ros.stats import Counters, LatencyWindow  # noqa: E402

Image, CompressedImage = sensor_msgs.Image, sensor_msgs.CompressedImage


def _msg(arr: np.ndarray, encoding: str, pad: int = 0) -> Image:
    h, w = arr.shape[:2]
    row = arr.reshape(h, -1)
    if pad:
        row = np.concatenate([row, np.zeros((h, pad), np.uint8)], axis=1)
    return Image(height=h, width=w, encoding=encoding, step=row.shape[1], data=row.tobytes())


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (6, 5, 3), dtype=np.uint8)


def test_rgb_bgr_mono_and_padded_rows_convert(rgb) -> None:
    assert np.array_equal(image_io.raw_to_rgb(_msg(rgb, "rgb8")), rgb)
    assert np.array_equal(image_io.raw_to_rgb(_msg(rgb[:, :, ::-1].copy(), "bgr8")), rgb)
    assert np.array_equal(image_io.raw_to_rgb(_msg(rgb, "rgb8", pad=7)), rgb)  # step > width*3
    mono = rgb[:, :, 0].copy()
    out = image_io.raw_to_rgb(_msg(mono, "mono8"))
    assert out.shape == (6, 5, 3) and np.array_equal(out[:, :, 1], mono)
    rgba = np.concatenate([rgb, np.full((6, 5, 1), 255, np.uint8)], axis=2)
    assert np.array_equal(image_io.raw_to_rgb(_msg(rgba, "rgba8")), rgb)


@pytest.mark.parametrize(
    ("mutate", "cause"),
    [
        (lambda m: setattr(m, "encoding", "32FC7"), "encoding"),
        (lambda m: setattr(m, "data", bytes(m.data)[:-1]), "layout"),
        (lambda m: setattr(m, "step", 3), "layout"),
        (lambda m: (setattr(m, "height", 0), setattr(m, "data", b"")), "size"),
    ],
)
def test_bad_raw_images_raise_one_clear_error(rgb, mutate, cause) -> None:
    msg = _msg(rgb, "rgb8")
    mutate(msg)
    with pytest.raises(image_io.BadInput) as err:
        image_io.raw_to_rgb(msg)
    assert err.value.cause == cause and str(err.value)


def test_huge_images_are_rejected_before_conversion(rgb) -> None:
    with pytest.raises(image_io.BadInput, match="exceeds") as err:
        image_io.raw_to_rgb(_msg(rgb, "rgb8"), image_io.ImageLimits(max_pixels=29))
    assert err.value.cause == "too_large"
    assert image_io.raw_to_rgb(_msg(rgb, "rgb8"), image_io.ImageLimits(max_pixels=30)).shape == (6, 5, 3)


def test_compressed_roundtrip_and_corrupt_data(rgb) -> None:
    import cv2

    ok, png = cv2.imencode(".png", rgb[:, :, ::-1])
    assert ok
    assert np.array_equal(image_io.compressed_to_rgb(CompressedImage(format="png", data=png.tobytes())), rgb)
    for data in (b"", b"\x89PNG garbage"):
        with pytest.raises(image_io.BadInput) as err:
            image_io.compressed_to_rgb(CompressedImage(format="png", data=data))
        assert err.value.cause == "corrupt"


def test_compressed_size_is_checked_before_decoding(monkeypatch) -> None:
    """A 631-byte JPEG declaring 20000x20000 would make OpenCV allocate 1.2 GB and spend seconds."""
    import cv2

    ok, jpeg = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    assert image_io.compressed_to_rgb(CompressedImage(format="jpeg", data=jpeg.tobytes())).shape == (8, 8, 3)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image whose header already exceeds the limit")

    monkeypatch.setattr(image_io, "message_to_cvimage", no_decoding)
    data = bytearray(jpeg.tobytes())
    sof = data.find(b"\xff\xc0")  # baseline start-of-frame: height, width at +5, +7
    for side in (20000, 5000):  # beyond Pillow's own bomb limit; beyond only ours (16.7 Mpixel)
        data[sof + 5 : sof + 9] = side.to_bytes(2, "big") * 2
        with pytest.raises(image_io.BadInput, match="exceeds max_image_pixels") as err:
            image_io.compressed_to_rgb(CompressedImage(format="jpeg", data=bytes(data)))
        assert err.value.cause == "too_large"


def test_rgb_fields_roundtrip(rgb) -> None:
    msg = Image(**image_io.rgb_fields(rgb))
    assert (msg.encoding, msg.step) == ("rgb8", 15)
    assert np.array_equal(image_io.raw_to_rgb(msg), rgb)
    mono = Image(**image_io.rgb_fields(overlay.mask_image(np.eye(4))))
    assert mono.encoding == "mono8" and list(mono.data[:5]) == [255, 0, 0, 0, 0]


def test_overlay_keeps_kept_patches_and_grays_pruned(rgb) -> None:
    img = np.full((8, 8, 3), (200, 10, 10), np.uint8)
    mask = np.array([[1, 0], [0, 0]])
    out = overlay.overlay(img, mask)
    assert np.array_equal(out[:4, :4], img[:4, :4])
    pruned = out[4:, 4:]
    assert (pruned[..., 0] == pruned[..., 1]).all() and not np.array_equal(pruned, img[4:, 4:])
    assert overlay.upsample_mask(mask, 3, 5).shape == (3, 5)


def test_parameter_checks_name_the_problem() -> None:
    assert params.check("atp.alpha", 0.3) is None
    assert "atp.alpha" in params.check("atp.alpha", 2.0)
    assert "keep_ratio" in params.check("atp.keep_ratio", 0.0)
    assert params.check("atp.keep_ratio", 1.0) is None
    assert "one of" in params.check("atp.intra_signal", "nope")
    assert "integer" in params.check("atp.keep_tokens", 1.5)
    assert "bool" in params.check("atp.enabled", 1)
    assert params.check("use_sim_time", True) is None
    defaults = {p.name: p.default for p in params.PARAMS}
    assert all(params.check(name, value) is None for name, value in defaults.items())
    cfg = params.atp_config(defaults)
    assert (cfg.alpha, cfg.keep_ratio, cfg.enabled) == (0.5, 0.25, True)


def test_latency_window_and_counters() -> None:
    window = LatencyWindow(size=10)
    for v in range(100):
        window.add({"vision": float(v)})
    p50, p95, count = window.summary()["vision"]
    assert count == 10 and 94 <= p50 <= 95 and p95 > p50
    counters = Counters()
    counters.inc("a")
    counters.inc("a", 2)
    assert counters.get("a") == 3 and counters.snapshot() == {"a": 3}


def _nv12_msg(rgb: np.ndarray) -> Image:
    """An NV12 frame encoded by OpenCV (Y plane, then interleaved U/V at half resolution)."""
    import cv2

    h, w = rgb.shape[:2]
    i420 = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)  # Y plane, then U plane, then V plane
    y, u, v = i420[:h], i420[h : h + h // 4].reshape(-1), i420[h + h // 4 :].reshape(-1)
    data = np.concatenate([y.reshape(-1), np.stack([u, v], axis=1).reshape(-1)])
    return Image(height=h, width=w, encoding="nv12", step=w, data=data.tobytes())


def test_nv12_height_is_the_picture_height() -> None:
    """sensor_msgs/Image.height is the picture's rows; a 4:2:0 buffer holds 1.5x as many."""
    rgb = np.zeros((8, 6, 3), np.uint8)
    rgb[:, :, 0] = 200  # a flat red picture survives chroma subsampling
    out = image_io.raw_to_rgb(_nv12_msg(rgb))
    assert out.shape == (8, 6, 3)
    assert abs(int(out[..., 0].mean()) - 200) < 12 and out[..., 1].mean() < 20


@pytest.mark.parametrize("encoding", ["yuv422", "uyvy", "yuyv", "yuv422_yuy2", "nv12", "nv21"])
def test_odd_sizes_of_subsampled_encodings_are_bad_input(encoding) -> None:
    """OpenCV raises cv2.error on odd-width 4:2:2 / 4:2:0 frames: that is the frame's fault, one line."""
    w, h = 5, 4
    rows = h * 3 // 2 if encoding in ("nv12", "nv21") else h
    step = w if encoding in ("nv12", "nv21") else w * 2
    msg = Image(height=h, width=w, encoding=encoding, step=step, data=bytes(step * rows))
    with pytest.raises(image_io.BadInput, match="even") as err:
        image_io.raw_to_rgb(msg)
    assert err.value.cause == "layout"
    even = Image(height=h, width=6, encoding=encoding, step=step + (1 if step == w else 2), data=b"")
    even.data = bytes(even.step * rows)
    assert image_io.raw_to_rgb(even).shape == (4, 6, 3)


def test_overlay_outlines_kept_areas_on_the_pruned_side() -> None:
    img = np.full((12, 12, 3), (20, 200, 20), np.uint8)
    mask = np.zeros((3, 3), np.uint8)
    mask[1, 1] = 1  # pixels [4, 8) x [4, 8)
    out = overlay.overlay(img, mask, edge=1)
    assert np.array_equal(out[4:8, 4:8], img[4:8, 4:8])  # kept: exactly the camera's pixels
    assert (out[3, 3:9] == (255, 255, 0)).all() and (out[4:8, 8] == (255, 255, 0)).all()  # a ring around them
    far = out[0, 0]
    assert far[0] == far[1] == far[2] and far[0] < img[0, 0].mean()  # pruned: dark gray
    assert np.array_equal(overlay.overlay(img, mask, edge=0)[3, 3], far)
