"""What only LLaVA does, on tiny random checkpoints (CLIP and SigLIP towers): kept tokens keep their original
RoPE positions, CLS with the "full" strategy, SigLIP's probe, dense S_inter read-outs, crop views.
The contract every family keeps is checked in ``test_backend_contract.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from atp_ros.backends import AtpConfig, ModelLoadError, load_backend
from atp_ros.backends.flops import kv_cache_bytes
from atp_ros.backends.llava import LlavaBackend
from atp_ros.backends.text_towers import dense_states, head_probe_attention, head_value_readout, load_joint_space
from atp_ros.testing.tiny.llava import TEXT_TOWER_SUBDIR, save_tiny_llava
from backend_checks import LmCalls
from PIL import Image
from transformers import LlavaForConditionalGeneration

QUESTIONS = ["what color is the box on the left shelf?", "how many pallets are there?"]
N = 64  # (64 px / patch 8) ** 2
MAX_NEW = 6


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_llava")
    return {
        "clip": save_tiny_llava(root / "clip", tower="clip"),
        "siglip": save_tiny_llava(root / "siglip", tower="siglip"),
        "clip_no_tower": save_tiny_llava(root / "clip_no_tower", tower="clip", with_text_tower=False),
        # CLIP tower that feeds its CLS token too (strategy "full", last layer).
        "clip_full": save_tiny_llava(
            root / "clip_full", tower="clip", vision_feature_layer=-1, vision_feature_select_strategy="full"
        ),
    }


@pytest.fixture(scope="module")
def backends(ckpts: dict[str, Path]) -> dict[str, LlavaBackend]:
    return {name: load_backend(str(path), device="cpu") for name, path in ckpts.items()}


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    # Different sizes and aspect ratios: the processor resizes and crops to the tower's input.
    return [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8), rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)]


def _pixel_values(be: LlavaBackend, imgs: list[np.ndarray]) -> torch.Tensor:
    return be.processor.image_processor(images=[Image.fromarray(i) for i in imgs], return_tensors="pt")["pixel_values"]


# ---------------------------------------------------------------- text tower


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_text_tower_vision_weights_match_vlm(backends: dict, tower: str) -> None:
    """The joint space reads out the same tower the VLM uses (post_layernorm is shared)."""
    be = backends[tower]
    torch.testing.assert_close(be.joint.post_layernorm.weight, be.tower.post_layernorm.weight)


def test_explicit_text_encoder_and_joint_space(ckpts: dict) -> None:
    assert not (ckpts["clip_no_tower"] / TEXT_TOWER_SUBDIR).exists()
    tower_dir = str(ckpts["clip"] / TEXT_TOWER_SUBDIR)
    be = load_backend(str(ckpts["clip_no_tower"]), text_encoder_id=tower_dir, device="cpu")
    assert be.has_text_tower and be.text_tower_id == tower_dir and be.load_notes == []
    joint = load_joint_space(tower_dir, torch.device("cpu"), torch.float32)
    assert joint.patches_to_joint(torch.randn(2, 5, joint.vision_hidden)).shape == (2, 5, joint.embed_dim)
    with pytest.raises(ModelLoadError, match="siglip"):  # a SigLIP space cannot read a CLIP tower
        load_backend(str(ckpts["clip_no_tower"]), text_encoder_id=str(ckpts["siglip"] / TEXT_TOWER_SUBDIR))


# ---------------------------------------------------------------- what the LLM gets


def _record_positions(be: LlavaBackend) -> tuple[list, object]:
    """Forward pre-hook on the LLM's rotary embedding: the position ids of every forward (prefill, then decode)."""
    seen: list = []

    def hook(_module, args, kwargs):
        seen.append((kwargs.get("position_ids") if "position_ids" in kwargs else args[1]).clone())

    return seen, be.model.model.language_model.rotary_emb.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("budget", [{"keep_tokens": 10}, {"mass": 0.4}])
def test_original_positions_reach_rope_and_decoding(backends: dict, images: list, budget: dict) -> None:
    """RoPE sees each kept token's unpruned position, the text after it its unpruned positions, and
    decoding continues from the unpruned length -- with left padding and per-sample budgets."""
    be = backends["clip"]
    seen, handle = _record_positions(be)
    try:
        res = be.answer(images, QUESTIONS, AtpConfig(positions="original", **budget), max_new_tokens=MAX_NEW)
    finally:
        handle.remove()
    prefill = seen[0]  # (B, T)
    unpruned = be.preprocess(images, be.questions(images, QUESTIONS)).inputs  # unpruned prompts
    ids, mask = unpruned["input_ids"], unpruned["attention_mask"]
    for b in range(len(images)):
        row = ids[b][mask[b].bool()]
        where = (row == be.image_token_id).nonzero().flatten()
        start, end = int(where[0]), int(where[-1]) + 1
        kept = res.selection.kept(b).tolist()
        expected = list(range(start)) + [start + i for i in kept] + list(range(end, len(row)))
        assert len(kept) == res.visual_tokens_kept[b] < N
        assert prefill[b, -len(expected) :].tolist() == expected
        if len(res.generated_ids[b]) > 1:  # the first decode step sits right after the unpruned prompt
            assert int(seen[1][b, -1]) == len(row)
    if "mass" in budget:
        assert res.visual_tokens_kept[0] != res.visual_tokens_kept[1]


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_maskclip_keeps_each_tokens_content_and_clearclip_mixes(backends: dict, tower: str) -> None:
    """MaskCLIP keeps each token's own content: changing token j leaves token i's state unchanged."""
    layer = backends[tower].tower.encoder.layers[-1]
    x = torch.randn(1, 5, layer.self_attn.embed_dim)
    y = x.clone()
    y[0, 3] = torch.randn(layer.self_attn.embed_dim)  # (a constant shift would vanish in layer_norm1)
    with torch.no_grad():
        a, b = dense_states(layer, x, "maskclip"), dense_states(layer, y, "maskclip")
        assert torch.allclose(a[0, :3], b[0, :3]) and not torch.allclose(a[0, 3], b[0, 3])
        c, d = dense_states(layer, x, "clearclip"), dense_states(layer, y, "clearclip")
        assert not torch.allclose(c[0, 0], d[0, 0])  # query-query attention mixes tokens


def test_full_strategy_keeps_cls_and_prunes_patches(backends: dict, images: list) -> None:
    be = backends["clip_full"]
    assert be.num_feature_tokens == N + 1 and be.score_layer == be.num_layers - 1
    ref = be.reference_generate(images, QUESTIONS, max_new_tokens=MAX_NEW)
    assert be.answer(images, QUESTIONS, AtpConfig(keep_ratio=1.0), max_new_tokens=MAX_NEW).generated_ids == ref
    with LmCalls(be.model.model.language_model) as lm:
        res = be.answer(images, QUESTIONS, AtpConfig(keep_tokens=7), max_new_tokens=MAX_NEW)
    # Token counts are patches in every family; CLS rides along to the LLM and shows in consumer_tokens.
    assert res.visual_tokens_total == [N, N] and res.visual_tokens_kept == [7, 7] and res.consumer_tokens == [8, 8]
    assert res.selection.mask.sum(dim=(1, 2)).tolist() == [7, 7]
    assert lm.prefill["attention_mask"].sum(dim=1).tolist() == [t + 8 for t in res.text_tokens]


def test_kv_cache_bytes(backends: dict) -> None:
    """2 (K, V) x layers x tokens x KV heads x head dim x 2 bytes (fp16)."""
    t = backends["clip"].model.config.text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    assert kv_cache_bytes(t, 33) == 2 * t.num_hidden_layers * 33 * t.num_key_value_heads * head_dim * 2


# ---------------------------------------------------------------- scoring


def test_cls_only_matches_eager_cls_attention(backends: dict, ckpts: dict, images: list) -> None:
    """alpha=0 keeps the top-K of CLS attention; checked against an eager tower's full attention maps."""
    be = backends["clip"]
    k = 16
    res = be.answer(images, QUESTIONS, AtpConfig(alpha=0.0, keep_tokens=k), max_new_tokens=2)
    eager = LlavaForConditionalGeneration.from_pretrained(str(ckpts["clip"]), attn_implementation="eager").eval()
    with torch.inference_mode():
        out = eager.model.vision_tower(_pixel_values(be, images), output_attentions=True)
    cls_row = out.attentions[be.score_layer][:, :, 0, 1:].mean(dim=1)  # (B, N): CLS -> patches, head-averaged
    torch.testing.assert_close(res.selection.s_intra, cls_row.float(), rtol=1e-4, atol=1e-6)
    expected = torch.sort(cls_row, dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values
    assert res.selection.indices.tolist() == expected.tolist()
    # The default score layer is the one that produces vision_feature_layer (-2): layer L-2.
    assert be.score_layer == be.num_layers - 2


def test_siglip_probe_attention_matches_pooling_head(backends: dict, images: list) -> None:
    be = backends["siglip"]
    res = be.answer(images, QUESTIONS, AtpConfig(alpha=0.0, keep_tokens=8), max_new_tokens=2)
    assert res.scoring.intra_signal == "probe"
    head = be.joint.head
    with torch.inference_mode():
        states = be.tower(_pixel_values(be, images)).last_hidden_state  # post_layernorm applied
        probe = head.probe.expand(len(images), -1, -1)
        _, weights = head.attention(probe, states, states, need_weights=True, average_attn_weights=True)
        torch.testing.assert_close(head_probe_attention(head, states), weights[:, 0].float(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(res.selection.s_intra, weights[:, 0].float(), rtol=1e-4, atol=1e-6)
        # The MaskCLIP read-out of patch i is the head's output when the probe attends to patch i only.
        one = states[:1, 5:6]
        pooled = head.attention(probe[:1], one, one)[0]
        pooled = pooled + head.mlp(head.layernorm(pooled))
        torch.testing.assert_close(head_value_readout(head, states)[:1, 5:6], pooled)


def test_result_reports_the_frame_region_each_grid_covers(backends: dict, images: list) -> None:
    """The tiny CLIP processor resizes the short side and center-crops: the 48x80 frame becomes 64x106
    (transformers rounds the long side down) and loses 21 resized pixels on the left, so the grid covers
    x in [21, 85) * 80/106 of the frame; the square frame is covered whole. SigLIP's stretches every frame."""
    res = backends["clip"].answer(images, QUESTIONS, AtpConfig(keep_tokens=8), max_new_tokens=1)
    crop = pytest.approx((21 * 80 / 106, 0.0, 85 * 80 / 106, 48.0))
    assert [v.as_tuple() for v in res.views] == [crop, (0.0, 0.0, 96.0, 96.0)]
    res = backends["siglip"].answer(images, QUESTIONS, AtpConfig(keep_tokens=8), max_new_tokens=1)
    assert [v.as_tuple() for v in res.views] == [(0.0, 0.0, 80.0, 48.0), (0.0, 0.0, 96.0, 96.0)]


def test_a_literal_image_token_in_a_question_adds_no_placeholders(backends: dict, images: list) -> None:
    be = backends["clip"]
    res = be.answer(images[:1], "what is <image> here?", AtpConfig(keep_tokens=4), max_new_tokens=1)
    assert res.visual_tokens_kept == [4]
