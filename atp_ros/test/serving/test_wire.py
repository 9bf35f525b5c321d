"""The serving modules that need no Ray: requests and frames on the wire, serve.yaml, payload sizes."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from atp_ros.backends.errors import BadInput
from atp_ros.method import AtpConfig
from atp_ros.serving.config import ServeConfig, code_version, config_from_yaml
from atp_ros.serving.payload import embedding_payload
from atp_ros.serving.wire import ServeRequest, checked_frames, decode_image, encode_image, make_request

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"


def _png_declaring(width: int, height: int) -> bytes:
    """A few dozen bytes of PNG whose header declares ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_wire_config_and_payload_import_without_ray() -> None:
    code = (
        "import sys, atp_ros.serving, atp_ros.serving.wire, atp_ros.serving.config, atp_ros.serving.payload;"
        "sys.exit('ray' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_decode_image_is_the_node_decoder_with_its_limits() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    assert np.array_equal(decode_image(encode_image(rgb)), rgb)  # PNG: lossless
    assert decode_image(encode_image(rgb, "jpeg")).shape == rgb.shape
    assert decode_image(rgb) is rgb
    with pytest.raises(BadInput, match=r"cannot decode image bytes \(12 bytes\)") as corrupt:
        decode_image(b"not an image")
    assert corrupt.value.cause == "corrupt"
    with pytest.raises(BadInput) as bomb:  # a tiny file declaring 20000x20000: refused before decoding
        decode_image(_png_declaring(20000, 20000))
    assert bomb.value.cause == "too_large"
    with pytest.raises(BadInput) as wide:
        decode_image(np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (1, 4096 * 4096 + 1, 3)))
    assert wide.value.cause == "too_large"
    with pytest.raises(BadInput, match="HxWx3 uint8"):
        decode_image(rgb.astype(np.float32))
    for empty in ((0, 0, 3), (0, 5, 3), (5, 0, 3)):  # what broke every request sharing its model call
        with pytest.raises(BadInput, match="zero-size") as zero:
            decode_image(np.zeros(empty, np.uint8))
        assert zero.value.cause == "size"


def test_requests_are_checked_on_both_sides() -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    raw = make_request([rgb, encode_image(rgb)], "q?", AtpConfig(), 4)
    assert raw.images[0] is rgb and isinstance(raw.images[1], bytes) and raw.questions == ("q?", "q?")
    jpeg = make_request([rgb], ["q?"], AtpConfig(), 4, image_format="jpeg")
    assert jpeg.images[0][:2] == b"\xff\xd8"
    with pytest.raises(ValueError, match="one question per image"):
        make_request([rgb], ["a", "b"], AtpConfig(), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        make_request([rgb], "q?", AtpConfig(), 0)
    assert np.array_equal(checked_frames(jpeg)[0], decode_image(jpeg.images[0]))
    with pytest.raises(ValueError, match="max_new_tokens"):  # what a request built elsewhere may carry
        checked_frames(ServeRequest((rgb,), ("q?",), AtpConfig(), 0))


def test_code_version_follows_the_model_settings() -> None:
    cfg = ServeConfig()
    assert code_version(cfg) == code_version(replace(cfg, max_batch_size=1))  # batching changes in place
    assert code_version(cfg) != code_version(replace(cfg, model_id="other"))


def test_embedding_payload_counts_bytes_per_frame() -> None:
    tiny = embedding_payload(144, 256, 0.25)  # warehouse-tiny: 12x12 patches, 256-wide LLM, fp16
    assert (tiny.tokens, tiny.embedding_bytes, tiny.position_bytes, tiny.total) == (36, 36 * 256 * 2, 72, 18504)
    full = embedding_payload(576, 4096)  # llava-1.5-7b, every token: no positions needed
    assert (full.tokens, full.total) == (576, 576 * 4096 * 2)
    assert embedding_payload(576, 4096, 0.11).tokens == 64  # ceil(0.11 * 576), the node's budget rule
    with pytest.raises(ValueError):
        embedding_payload(576, 4096, 0.0)


def test_shipped_serve_yaml_and_bad_files(tmp_path) -> None:
    cfg = config_from_yaml(CONFIG_DIR / "serve.yaml")
    assert (cfg.app, cfg.model_id, cfg.address, cfg.max_batch_size) == ("atp_vlm", "warehouse-tiny", "", 8)
    assert (cfg.num_replicas, cfg.num_cpus, cfg.num_gpus, cfg.batch_wait_timeout_s) == (1, 1.0, 0.0, 0.01)
    bad = tmp_path / "serve.yaml"
    bad.write_text("batching:\n  max_batch: 4\n")
    with pytest.raises(ValueError, match=r"unknown setting 'batching\.max_batch'"):
        config_from_yaml(bad)
    bad.write_text("deployment:\n  num_replicas: many\n")
    with pytest.raises(ValueError, match="num_replicas must be an integer"):
        config_from_yaml(bad)
    with pytest.raises(ValueError, match="not found"):
        config_from_yaml(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        (
            "batching:\n  batch_wait_timeout_s: .nan\n",
            "batching.batch_wait_timeout_s / --batch-wait-timeout-s must be a finite number, got nan",
        ),
        (
            "batching:\n  batch_wait_timeout_s: .inf\n",
            "batching.batch_wait_timeout_s / --batch-wait-timeout-s must be a finite number, got inf",
        ),
        ("batching:\n  batch_wait_timeout_s: nan\n", "must be a finite number, got nan"),
        ("batching:\n  max_batch_size: 2.9\n", "batching.max_batch_size must be an integer, got 2.9"),
        ("batching:\n  max_batch_size: true\n", "batching.max_batch_size must be an integer, got True"),
        ("ray:\n  num_cpus: .nan\n", "ray.num_cpus must be an integer, got nan"),
        (
            "deployment:\n  ray_actor_options:\n    num_cpus: -1\n",
            "deployment.ray_actor_options.num_cpus / --num-cpus must be >= 0, got -1.0",
        ),
        ("deployment:\n  ray_actor_options:\n    num_gpus: .inf\n", "num_gpus / --num-gpus must be a finite number"),
        ("deployment:\n  max_ongoing_requests: 1.5\n", "deployment.max_ongoing_requests must be an integer, got 1.5"),
    ],
)
def test_every_number_in_serve_yaml_is_finite_in_range_and_whole_where_counted(tmp_path, yaml_text, message) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError) as err:
        config_from_yaml(path)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("flag", "value", "setting"),
    [
        ("--batch-wait-timeout-s", "nan", "batching.batch_wait_timeout_s / --batch-wait-timeout-s"),
        ("--batch-wait-timeout-s", "inf", "batching.batch_wait_timeout_s / --batch-wait-timeout-s"),
        ("--num-cpus", "nan", "deployment.ray_actor_options.num_cpus / --num-cpus"),
        ("--num-gpus", "-inf", "deployment.ray_actor_options.num_gpus / --num-gpus"),
        ("--num-cpus", "-1", "deployment.ray_actor_options.num_cpus / --num-cpus"),
    ],
)
def test_atp_serve_flags_name_the_setting_of_a_bad_number(flag, value, setting) -> None:
    """The CLI's checks, in a process without Ray: one line naming the setting, exit 2, nothing started."""
    code = (
        "import sys; from atp_ros.serving.cli import config_from_args, parse_args\n"
        f"args, _ = parse_args([{flag + '=' + value!r}])\n"
        "try:\n    config_from_args(args)\nexcept ValueError as err:\n    print(err); sys.exit(2)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith(setting), proc.stdout


def test_serve_config_checks_numbers_built_in_code() -> None:
    for bad in ({"max_batch_size": 2.9}, {"num_replicas": float("nan")}, {"batch_wait_timeout_s": float("inf")}):
        with pytest.raises(ValueError, match="must be"):
            ServeConfig(**bad).check()
    ServeConfig(num_gpus=0.5, num_cpus=1.5, max_batch_size=4).check()
