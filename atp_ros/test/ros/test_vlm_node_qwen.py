"""The atp_vlm node answering with a Qwen2.5-VL checkpoint over real Fast DDS: the installed executable in its
own process, a tiny random Qwen2.5-VL saved like a real one (no text tower, as every published Qwen2.5-VL),
a token grid that follows the frame, and the intra-only note in the node's log and in /diagnostics."""

from __future__ import annotations

import math

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("atp_ros_msgs.msg")

from atp_ros.warehouse.scenes import render_scene  # noqa: E402
from node_harness import image_msg, publish_until_answer, running_node, stamp_ns  # noqa: E402
from std_msgs.msg import String  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.dds]


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory):
    from atp_ros.testing.tiny.qwen2_5_vl import save_tiny_qwen2_5_vl

    return save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen") / "ckpt", with_text_tower=False)


def _grid(ckpt, rgb: np.ndarray) -> tuple[int, int]:
    """The LLM-token grid the stock processor gives this frame (patch grid over the 2x2 merge)."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(ckpt), local_files_only=True)
    _, h, w = processor.image_processor(images=[Image.fromarray(rgb)])["image_grid_thw"][0].tolist()
    return h // 2, w // 2


def test_node_answers_with_qwen2_5_vl_over_dds(tiny_qwen, ros_ctx, tmp_path) -> None:
    log = tmp_path / "node.log"
    overrides = {"max_new_tokens": 4, "atp__keep_ratio": 0.25, "limits__max_image_pixels": 200 * 200}
    frames = [render_scene(i, 120, 160).rgb for i in range(2)] + [render_scene(2, 96, 96).rgb]
    with running_node(tiny_qwen, ros_ctx, log, **overrides) as (probe, _proc):
        probe.pub_query.publish(String(data="where is the red box?"))
        stamps = [2_000_000_000 + i * 33_000_000 for i in range(len(frames))]
        answers = [publish_until_answer(probe, image_msg(rgb, s)) for rgb, s in zip(frames, stamps, strict=True)]
        for answer, stamp, rgb in zip(answers, stamps, frames, strict=True):
            h, w = _grid(tiny_qwen, rgb)
            assert stamp_ns(answer.header) == stamp and answer.query == "where is the red box?"
            assert (answer.grid_height, answer.grid_width) == (h, w)
            assert answer.visual_tokens_total == h * w == len(answer.keep_mask)
            assert sum(answer.keep_mask) == answer.visual_tokens_kept == math.ceil(0.25 * h * w)
            assert answer.alpha == 0.0  # no text tower: S_intra alone, and the node says so below
            assert list(answer.view_box) == [0.0, 0.0, float(rgb.shape[1]), float(rgb.shape[0])]
        assert answers[0].visual_tokens_total != answers[2].visual_tokens_total  # 4:3 and square frames differ
        probe.wait_for(lambda: probe.status_values().get("frames_processed", "0") != "0", 10, "diagnostics")
        values = probe.status_values()
        assert "intra-only" in values["load_notes"] and "no matching contrastive text tower" in values["load_notes"]
        assert "S_intra is the attention each patch receives" in values["load_notes"]
    text = log.read_text()
    assert "a token grid per frame (at most 64 visual tokens)" in text
    assert "no matching contrastive text tower" in text  # the load note reaches the node's log
