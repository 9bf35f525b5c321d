"""The atp_vlm node end to end over real Fast DDS: the installed executable in its own process,
a tiny random LLaVA checkpoint loaded from disk, and a test node publishing frames and questions."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("atp_ros_msgs.msg")

from atp_ros.backends.results import STAGES  # noqa: E402
from atp_ros.warehouse.scenes import render_scene  # noqa: E402
from node_harness import (  # noqa: E402
    Probe,
    image_msg,
    new_namespace,
    publish_until_answer,
    running_node,
    stamp_ns,
)
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.dds]
N_TOKENS = 64  # tiny LLaVA: 64 px / patch 8 -> 8x8 grid


@pytest.fixture(scope="module")
def running(tiny_llava, ros_ctx, tmp_path_factory):
    """One node process shared by the tests of this module (startup imports torch: seconds)."""
    log = tmp_path_factory.mktemp("node") / "node.log"
    overrides = {"max_new_tokens": 4, "atp__keep_ratio": 0.25, "limits__max_image_pixels": 200 * 200}
    with running_node(tiny_llava, ros_ctx, log, **overrides) as (probe, proc):
        yield probe, proc, log


def frame(seed: int, stamp: int, h: int = 120, w: int = 160) -> Image:
    return image_msg(render_scene(seed, h, w).rgb, stamp)


def test_end_to_end_answers_masks_overlays_diagnostics(running) -> None:
    probe, proc, log = running
    probe.clear()
    probe.pub_query.publish(String(data="how many boxes are on the floor?"))
    stamps = [1_000_000_000 + i * 33_000_000 for i in range(3)]
    answers = [publish_until_answer(probe, frame(i, s)) for i, s in enumerate(stamps)]
    for answer, stamp in zip(answers, stamps, strict=True):
        assert stamp_ns(answer.header) == stamp and answer.header.frame_id == "camera"
        assert answer.query == "how many boxes are on the floor?"
        assert answer.model_id.endswith("ckpt")
        assert answer.visual_tokens_total == N_TOKENS
        assert len(answer.keep_mask) == answer.grid_height * answer.grid_width == N_TOKENS
        assert sum(answer.keep_mask) == answer.visual_tokens_kept == math.ceil(0.25 * N_TOKENS)
        assert answer.inference_ms > 0 and answer.latency_ms >= answer.inference_ms
        assert abs(answer.alpha - 0.5) < 1e-6
    probe.wait_for(
        lambda: len(probe.snapshot(probe.masks)) >= 3 and len(probe.snapshot(probe.overlays)) >= 3,
        15,
        "keep_mask and overlay images",
    )
    by_stamp = {stamp_ns(a.header): a for a in answers}
    for mask in probe.snapshot(probe.masks):
        answer = by_stamp.get(stamp_ns(mask.header))
        if answer is None:
            continue
        assert (mask.encoding, mask.height, mask.width) == ("mono8", answer.grid_height, answer.grid_width)
        assert list(np.frombuffer(bytes(mask.data), np.uint8) // 255) == list(answer.keep_mask)
    for ov in probe.snapshot(probe.overlays):
        if stamp_ns(ov.header) in by_stamp:
            assert (ov.encoding, ov.height, ov.width, ov.header.frame_id) == ("rgb8", 120, 160, "camera")
    assert probe.snapshot(probe.texts), "answer_text carries the answers"
    probe.wait_for(lambda: probe.status_values().get("frames_processed", "0") != "0", 5, "diagnostics")
    values = probe.status_values()
    assert values["device"] == "cpu" and values["visual_tokens_total"] == str(N_TOKENS)
    assert float(values["latency_ms_p95"]) >= float(values["latency_ms_p50"]) > 0
    for stage in STAGES:
        assert f"{stage}_ms_p50" in values


def test_relevance_image_and_boxes_for_planners(running) -> None:
    """~/relevance: the fused score on the patch grid (32FC1, the frame's header); VlmAnswer carries
    the image region the grid covers (the tiny CLIP processor resizes 160x120 to 85x64 and crops 10
    columns on the left: x in [10, 74) * 160/85) and the most relevant region inside it."""
    probe, proc, log = running
    seen: list[Image] = []
    sub = probe.node.create_subscription(Image, "atp_vlm/relevance", seen.append, 10)
    try:
        probe.wait_for(lambda: probe.node.count_publishers(f"{probe.ns}/atp_vlm/relevance") > 0, 10, "relevance")
        probe.pub_query.publish(String(data="how many boxes are on the floor?"))
        stamp = 6_600_000_000
        deadline = time.monotonic() + 30
        while not [m for m in list(seen) if stamp_ns(m.header) == stamp] and time.monotonic() < deadline:
            probe.pub_image.publish(frame(66, stamp))
            time.sleep(0.2)
        (rel,) = [m for m in list(seen) if stamp_ns(m.header) == stamp][:1]
        answer = next(a for a in probe.snapshot(probe.answers) if stamp_ns(a.header) == stamp)
        assert (rel.encoding, rel.height, rel.width) == ("32FC1", answer.grid_height, answer.grid_width)
        scores = np.frombuffer(bytes(rel.data), dtype="<f4").reshape(rel.height, rel.width)
        assert np.isfinite(scores).all() and scores.max() > scores.min()
        x0, y0, x1, y1 = answer.view_box
        assert (x0, y0, x1, y1) == pytest.approx((10 * 160 / 85, 0.0, 74 * 160 / 85, 120.0), abs=1e-3)
        r0, s0, r1, s1 = answer.relevant_box
        assert x0 <= r0 < r1 <= x1 and y0 <= s0 < s1 <= y1
    finally:
        probe.node.destroy_subscription(sub)


def test_volatile_query_publisher_is_heard_like_ros2_topic_pub(running) -> None:
    """`ros2 topic pub` on Iron and later publishes volatile (reliable, depth 10): the node must hear it
    as well as the transient-local standing question the other tests publish."""
    probe, proc, log = running
    volatile = probe.node.create_publisher(String, "atp_vlm/query", 10)  # rclpy's default: reliable, volatile
    try:
        probe.wait_for(lambda: volatile.get_subscription_count() > 0, 10, "a subscription matching volatile")
        question = "is the aisle clear, asked volatile?"
        probe.clear()
        deadline = time.monotonic() + 30
        answered = []
        while not answered and time.monotonic() < deadline:
            volatile.publish(String(data=question))
            probe.pub_image.publish(frame(77, 7_700_000_000))
            time.sleep(0.2)
            answered = [a for a in probe.snapshot(probe.answers) if a.query == question]
        assert answered, "no answer to the question from a volatile publisher"
    finally:
        probe.node.destroy_publisher(volatile)
        probe.pub_query.publish(String(data="how many boxes are on the floor?"))  # back to the standing question


def test_parameters_change_at_run_time_and_bad_values_are_rejected(running) -> None:
    probe, proc, log = running
    probe.pub_query.publish(String(data="what color is the box?"))
    ok, reason = probe.set_parameter("atp.keep_ratio", 0.5)
    assert ok, reason
    answer = publish_until_answer(probe, frame(7, 2_000_000_000))
    assert answer.visual_tokens_kept == math.ceil(0.5 * N_TOKENS)
    ok, reason = probe.set_parameter("atp.alpha", 2.0)
    assert not ok and "alpha" in reason
    ok, reason = probe.set_parameter("atp.intra_signal", "bogus")
    assert not ok and "intra_signal" in reason
    ok, reason = probe.set_parameter("atp.keep_ratio", 0.0)
    assert not ok and "keep_ratio" in reason
    ok, reason = probe.set_parameter("model_id", "other")
    assert not ok  # read-only while running
    answer = publish_until_answer(probe, frame(8, 2_100_000_000))
    assert answer.visual_tokens_kept == math.ceil(0.5 * N_TOKENS)  # rejected changes left nothing behind
    assert abs(answer.alpha - 0.5) < 1e-6
    ok, reason = probe.set_parameter("atp.selector", "uniform")
    assert ok, reason
    answer = publish_until_answer(probe, frame(10, 2_150_000_000))
    kept = [i for i, m in enumerate(answer.keep_mask) if m]
    assert kept == [i * N_TOKENS // 32 for i in range(32)]  # every 2nd patch at keep_ratio 0.5
    assert probe.set_parameter("atp.selector", "atp")[0]
    assert not probe.set_parameter("atp.selector", "magic")[0]
    for name, good, bad in (("atp.positions", "compact", "sideways"), ("atp.inter_readout", "maskclip", "magic")):
        ok, reason = probe.set_parameter(name, good)
        assert ok, reason
        ok, reason = probe.set_parameter(name, bad)
        assert not ok and name in reason
    answer = publish_until_answer(probe, frame(11, 2_170_000_000))  # answers with compact + maskclip
    assert answer.visual_tokens_kept == math.ceil(0.5 * N_TOKENS)
    assert probe.set_parameter("atp.positions", "original")[0] and probe.set_parameter("atp.inter_readout", "naive")[0]
    ok, reason = probe.set_parameter("atp.enabled", False)
    assert ok, reason
    answer = publish_until_answer(probe, frame(9, 2_200_000_000))
    assert answer.visual_tokens_kept == N_TOKENS and sum(answer.keep_mask) == N_TOKENS
    for name, value in (("atp.enabled", True), ("atp.keep_ratio", 0.25)):
        assert probe.set_parameter(name, value)[0]


def test_answer_reuse_over_dds_marks_reused_answers_and_counts_them(running) -> None:
    probe, proc, log = running
    probe.pub_query.publish(String(data="what color is the box?"))
    assert probe.set_parameter("reuse.mode", "answer")[0]
    assert not probe.set_parameter("reuse.mode", "sparse")[0]
    try:
        rgb = render_scene(12, 120, 160).rgb
        full = publish_until_answer(probe, image_msg(rgb, 2_500_000_000))
        assert not full.reused and full.frames_since_full_run == 0
        again = publish_until_answer(probe, image_msg(rgb, 2_510_000_000))  # the same pixels, a new stamp
        assert again.reused and again.frames_since_full_run >= 1 and again.full_run_age_ms > 0
        assert again.answer == full.answer and list(again.keep_mask) == list(full.keep_mask)
        assert stamp_ns(again.header) == 2_510_000_000, "a reused answer carries the new frame's header"
        probe.wait_for(lambda: int(probe.status_values().get("frames_reused", 0)) >= 1, 30, "frames_reused")
    finally:
        assert probe.set_parameter("reuse.mode", "none")[0]
    after = publish_until_answer(probe, image_msg(rgb, 2_520_000_000))
    assert not after.reused, "reuse none: every frame runs the model again"
    assert probe.set_parameter("reuse.mode", "tokens")[0]
    try:  # token reuse: a new question on the same pixels runs the LLM with the tower from the cache
        publish_until_answer(probe, image_msg(rgb, 2_530_000_000))  # the whole tower: the cache starts here
        probe.pub_query.publish(String(data="is there a pallet?"))
        stamp = 2_540_000_000
        while not any(a.query == "is there a pallet?" for a in probe.snapshot(probe.answers)):
            assert stamp < 2_940_000_000, "the new question never reached the node"
            publish_until_answer(probe, image_msg(rgb, stamp))
            stamp += 10_000_000
        probe.wait_for(lambda: int(probe.status_values().get("frames_token_reuse", 0)) >= 1, 30, "frames_token_reuse")
    finally:
        assert probe.set_parameter("reuse.mode", "none")[0]


def _bad_images() -> dict[str, Image]:
    """One frame per bad-input cause, keyed by the cause the node counts it under."""
    bad = {}
    msg = frame(1, 3_000_000_000)
    msg.encoding = "32FC7"
    bad["encoding"] = msg
    msg = frame(1, 3_100_000_000)
    msg.data = bytes(msg.data)[:-10]
    bad["layout"] = msg
    msg = Image(encoding="rgb8", height=0, width=0, step=0)
    msg.header.stamp.sec, msg.header.stamp.nanosec = 3, 200_000_000
    bad["size"] = msg
    big = np.zeros((201, 200, 3), np.uint8)  # limits.max_image_pixels = 200*200 in this module
    bad["too_large"] = image_msg(big, 3_300_000_000)
    return bad


def test_bad_input_never_kills_the_node(running) -> None:
    probe, proc, log = running
    probe.pub_query.publish(String(data="is there a pallet?"))
    publish_until_answer(probe, frame(2, 2_900_000_000))
    for i, (cause, msg) in enumerate(_bad_images().items()):
        # The newest frame wins the slot: repeat the bad one until the node has counted it.
        deadline = time.monotonic() + 15
        while f"errors.{cause}" not in probe.status_values() and time.monotonic() < deadline:
            probe.pub_image.publish(msg)
            time.sleep(0.2)
        assert f"errors.{cause}" in probe.status_values(), cause
        answer = publish_until_answer(probe, frame(10 + i, 4_000_000_000 + i))
        assert answer.answer is not None and proc.poll() is None, cause
        assert stamp_ns(msg.header) not in {stamp_ns(a.header) for a in probe.snapshot(probe.answers)}
    # Empty and over-long questions are rejected; the standing question stays.
    probe.pub_query.publish(String(data="   "))
    probe.wait_for(lambda: "errors.query_empty" in probe.status_values(), 5, "empty query counted")
    probe.pub_query.publish(String(data="why " * 400))
    answer = publish_until_answer(probe, frame(20, 5_000_000_000))
    assert answer.query == "is there a pallet?"
    probe.wait_for(lambda: "errors.query_too_long" in probe.status_values(), 5, "query errors in diagnostics")
    values = probe.status_values()
    for key in (
        "errors.encoding",
        "errors.layout",
        "errors.size",
        "errors.too_large",
        "errors.query_empty",
        "errors.query_too_long",
    ):
        assert int(values[key]) >= 1, key
    text = log.read_text()
    assert "unsupported encoding '32FC7'" in text and "exceeds limits.max_image_pixels" in text
    assert "empty question" in text and "exceeds limits.max_query_chars" in text
    assert "Traceback" not in text


def test_ask_service(running) -> None:
    probe, proc, log = running
    msg = frame(30, 6_000_000_000)
    probe.pub_image.publish(msg)
    probe.wait_for(lambda: probe.node.count_subscribers(f"{probe.ns}/image") > 0, 5, "node subscribed")
    deadline = time.monotonic() + 20
    response = None
    while time.monotonic() < deadline:
        probe.pub_image.publish(msg)
        time.sleep(0.2)
        response = probe.ask_question("where is the red box?")
        if response.success and stamp_ns(response.answer.header) == stamp_ns(msg.header):
            break
    assert response is not None and response.success, response.message if response else "no response"
    assert response.answer.query == "where is the red box?"
    assert sum(response.answer.keep_mask) == response.answer.visual_tokens_kept
    time.sleep(0.3)
    stale = probe.ask_question("anything?", max_age_s=0.05)
    assert not stale.success and "old" in stale.message
    empty = probe.ask_question("")
    assert not empty.success and "empty" in empty.message


def test_flood_at_30hz_drops_frames_without_growing(running) -> None:
    """Frames at 30 Hz, inference capped at 4 Hz: newest frame wins, drops counted, memory flat."""
    probe, proc, log = running
    probe.pub_query.publish(String(data="how many totes?"))
    assert probe.set_parameter("processing.max_rate_hz", 4.0)[0]
    try:
        publish_until_answer(probe, frame(40, 7_000_000_000))
        probe.wait_for(lambda: probe.status_values().get("memory_rss_mb"), 5, "diagnostics")
        rss_before = float(probe.status_values()["memory_rss_mb"])
        dropped_before = int(probe.status_values()["frames_dropped"])
        probe.clear()
        rgb = render_scene(41, 120, 160).rgb
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < 6.0:
            probe.pub_image.publish(image_msg(rgb, 8_000_000_000 + i))
            i += 1
            time.sleep(1 / 30)
        # The newest frame wins: the last one sent is answered (nothing overwrites it), and the frames in
        # between were dropped, not queued -- a queue would answer all of them. Counts, not timings: a
        # slow or shared machine cannot fail this (the latency bounds this test had did, on loaded runs).
        last = 8_000_000_000 + i - 1
        probe.wait_for(lambda: any(stamp_ns(a.header) == last for a in probe.snapshot(probe.answers)), 30, "last")
        answers = probe.snapshot(probe.answers)
        assert len(answers) <= 30, len(answers)  # capped near 4 Hz for 6 s: never the ~180 frames sent
        probe.wait_for(
            lambda: int(probe.status_values().get("frames_dropped", 0)) > dropped_before + 50, 5, "drops counted"
        )
        rss_after = float(probe.status_values()["memory_rss_mb"])
        assert rss_after < rss_before + 150, (rss_before, rss_after)
    finally:
        assert probe.set_parameter("processing.max_rate_hz", 0.0)[0]


def test_failing_model_step_is_reported_and_the_next_frame_answered(tiny_llava, ros_ctx) -> None:
    """A model step that raises (CUDA out of memory on a GPU box) skips the frame, not the node.

    CUDA OOM cannot happen on a CPU machine, so the node runs in this process and its real
    backend is wrapped to raise ``torch.OutOfMemoryError`` on the first call only.
    """
    import threading

    import torch
    from atp_ros.ros.node import VlmNode
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter

    ns = new_namespace()
    node = VlmNode(
        context=ros_ctx,
        namespace=ns,
        parameter_overrides=[Parameter("model_id", value=str(tiny_llava)), Parameter("max_new_tokens", value=2)],
    )
    executor = MultiThreadedExecutor(num_threads=4, context=ros_ctx)
    probe = None
    try:
        assert node.bring_up() == ""
        real_answer = node.backend.answer
        calls = []

        def flaky_answer(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real_answer(*args, **kwargs)

        node.backend.answer = flaky_answer
        executor.add_node(node)
        threading.Thread(target=executor.spin, daemon=True).start()
        probe = Probe(ros_ctx, ns)
        probe.pub_query.publish(String(data="is the aisle clear?"))
        probe.wait_for(lambda: node.worker.query("") is not None, 10, "query received")
        doomed = frame(70, 11_000_000_000)
        probe.wait_for(lambda: node.count_subscribers(f"{ns}/image") > 0, 5, "subscription")
        deadline = time.monotonic() + 30
        while not calls and time.monotonic() < deadline:
            probe.pub_image.publish(doomed)
            time.sleep(0.1)
        assert calls, "the node never ran the model"
        answer = publish_until_answer(probe, frame(71, 11_100_000_000))
        assert answer.query == "is the aisle clear?" and len(calls) >= 2
        probe.wait_for(lambda: "errors.model" in probe.status_values(), 5, "model error in diagnostics")
        values = probe.status_values()
        assert values["_level"] == "2" and "out of memory" in values["_message"]  # ERROR
        assert stamp_ns(doomed.header) not in {stamp_ns(a.header) for a in probe.snapshot(probe.answers)}
    finally:
        node.stop()
        executor.shutdown()
        node.destroy_node()
        if probe is not None:
            probe.close()


def test_shipped_params_file_applies_in_a_namespace(ros_ctx) -> None:
    """config/vlm.yaml reaches the node in the root namespace and in any other (launch `namespace`)."""
    import os

    from ament_index_python.packages import get_package_share_directory
    from atp_ros.ros import params

    path = os.path.join(get_package_share_directory("atp_ros"), "config", "vlm.yaml")
    for ns in ("/", "/robot1", "/fleet/robot2"):
        node = rclpy.create_node(
            "atp_vlm",
            namespace=ns,
            context=ros_ctx,
            cli_args=["--ros-args", "--params-file", path],
            automatically_declare_parameters_from_overrides=True,
        )
        try:
            values = {name: p.value for name, p in node.get_parameters_by_prefix("").items()}
        finally:
            node.destroy_node()
        assert values.get("model_id") == "warehouse-cell", (ns, values)
        with_default = {name for name, spec in params.BY_NAME.items() if spec.default != ()}  # `cameras`: unset
        assert with_default <= set(values), with_default - set(values)
        assert all(params.check(name, values[name]) is None for name in with_default)


def test_every_parameter_gets_and_dumps_over_the_services(running) -> None:
    """What `ros2 param dump /atp_vlm` and `ros2 param get` do: list, then get every name in one request."""
    from atp_ros.ros.params import PARAMS
    from rcl_interfaces.srv import GetParameters, ListParameters

    probe, _, _ = running
    listed = probe.call(probe.node.create_client(ListParameters, "atp_vlm/list_parameters"), ListParameters.Request(),
                        "list_parameters").result.names  # fmt: skip
    assert {p.name for p in PARAMS} <= set(listed)
    got = probe.call(probe.node.create_client(GetParameters, "atp_vlm/get_parameters"),
                     GetParameters.Request(names=listed), "get_parameters").values  # fmt: skip
    assert len(got) == len(listed), "an uninitialized parameter makes rclpy return no values at all"
    cameras = got[listed.index("cameras")]
    assert cameras.type == 9 and list(cameras.string_array_value) == []  # PARAMETER_STRING_ARRAY, unset
