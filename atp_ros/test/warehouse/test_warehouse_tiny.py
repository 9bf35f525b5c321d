"""The bundled warehouse-tiny model, loaded from the installed package like users load it.

It must answer fixed test-split samples (the generator's own ground truth) with all tokens
and with ATP pruning, and the node must answer with it by default over DDS.
"""

from __future__ import annotations

import numpy as np
import pytest
from atp_ros.backends import BUNDLED_MODELS, AtpConfig, load_backend, resolve_model_id
from atp_ros.warehouse.scenes import questions_for_scene, render_scene, split_seed
from backend_checks import samples_accuracy

# Kinds the model card measures at >= 0.89 with all tokens (README); the others are reported, not tested.
RELIABLE = ("gripper", "aisle", "exists", "which_level")
COUNT = 16


@pytest.fixture(scope="module")
def model():
    return load_backend("warehouse-tiny", device="cpu")


@pytest.fixture(scope="module")
def samples():
    """The first 16 questions of the reliable kinds on the test split (336 px, the generator's recipe)."""
    out = []
    i = 0
    while len(out) < COUNT:
        seed = split_seed("test", i)
        scene = render_scene(seed, 336, 336)
        rng = np.random.default_rng([seed, 7])
        for q in questions_for_scene(scene, rng, count=4, kinds=RELIABLE)[:1]:
            out.append((scene.rgb, q))
        i += 1
    return out


def test_bundled_model_is_installed_with_its_text_tower(model) -> None:
    assert "warehouse-tiny" in BUNDLED_MODELS
    path = resolve_model_id("warehouse-tiny")
    assert path.endswith("atp_ros/models/warehouse-tiny")
    assert model.family == "llava" and model.grid == (12, 12) and model.num_visual_tokens == 144
    assert model.has_text_tower  # ATP runs with both signals


def test_answers_fixed_test_samples(model, samples) -> None:
    assert {q.kind for _, q in samples} == set(RELIABLE)
    assert samples_accuracy(model, samples, AtpConfig(enabled=False)) >= 14 / 16
    # ATP with the validation-chosen defaults (alpha 1.0, original positions) at keep 0.4 and 0.11.
    assert samples_accuracy(model, samples, AtpConfig(alpha=1.0, keep_ratio=0.4)) >= 13 / 16
    assert samples_accuracy(model, samples, AtpConfig(alpha=1.0, keep_ratio=0.11)) >= 12 / 16


def test_model_card_scores_through_the_evaluation_sweep(model) -> None:
    """The model card's run() answers and scores with the sweep: its figures are the records' means."""
    from atp_ros.evaluation.sweep import answer_samples
    from atp_ros.warehouse import model_card

    samples = model_card.make_samples("test", 3, 2, (336, 336))
    assert len(samples) == 6 and all(s.kind and s.answers and s.evidence for s in samples)
    row = model_card.run(model, samples, AtpConfig(alpha=1.0, keep_ratio=0.25), batch=4)
    assert set(row) == {"accuracy", "per_kind", "evidence_recall", "tokens_kept", "ms_per_sample", "n"}
    records = answer_samples(model, samples, AtpConfig(alpha=1.0, keep_ratio=0.25), 3, batch=4)
    assert row["accuracy"] == np.mean([r["accuracy"] for r in records]) and row["n"] == 6
    assert row["tokens_kept"] == 36 and 0 <= row["evidence_recall"] <= 1
    full = model_card.run(model, samples, AtpConfig().keep_all())
    assert full["tokens_kept"] == 144 and full["evidence_recall"] == 1.0


@pytest.mark.ros
def test_node_answers_with_the_bundled_model(tmp_path) -> None:
    """The installed node, started with ``model_id:=warehouse-tiny``, answers a camera frame correctly."""
    rclpy = pytest.importorskip("rclpy")
    from node_harness import Probe, image_msg, new_namespace, publish_until_answer, start_node, stop_node
    from std_msgs.msg import String

    scene = render_scene(split_seed("test", 3), 240, 320)
    ctx = rclpy.context.Context()
    rclpy.init(context=ctx)
    ns = new_namespace()
    log = tmp_path / "node.log"
    proc = start_node("warehouse-tiny", ns, log, max_new_tokens=3)
    probe = Probe(ctx, ns)
    try:
        probe.wait_ready(proc, log)
        probe.pub_query.publish(String(data="what is the gripper holding?"))
        try:
            answer = publish_until_answer(probe, image_msg(scene.rgb, 1_000_000_000), timeout=60.0)
        except AssertionError as err:
            raise AssertionError(f"{err}; node log:\n{log.read_text()[-3000:]}") from None
        assert answer.model_id == "warehouse-tiny" and answer.visual_tokens_total == 144
        assert answer.answer == scene.holding
    finally:
        stop_node(proc)
        probe.close()
        rclpy.try_shutdown(context=ctx)
