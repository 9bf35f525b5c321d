"""LLaVA backend on tiny random checkpoints (CLIP and SigLIP towers), saved and loaded back like real ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from atp_ros.backends import STAGES, AtpConfig, ModelLoadError, load_backend
from atp_ros.backends.llava import LlavaBackend
from atp_ros.backends.text_towers import head_probe_attention, head_value_readout, load_joint_space
from atp_ros.method import Selection
from atp_ros.testing.tiny.llava import TEXT_TOWER_SUBDIR, save_tiny_llava
from backend_checks import check_concurrent_calls_match_sequential
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


def _record_prefill(be: LlavaBackend) -> tuple[list[dict], object]:
    """Forward pre-hook on the language model that keeps what the prefill (first) call received."""
    calls: list[dict] = []

    def hook(_module, _args, kwargs):
        if not calls:
            calls.append({k: kwargs.get(k) for k in ("inputs_embeds", "attention_mask", "position_ids")})

    return calls, be.model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


# ---------------------------------------------------------------- tiny checkpoints


def test_tiny_checkpoint_layout_and_determinism(ckpts: dict[str, Path], tmp_path: Path) -> None:
    path = ckpts["clip"]
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert (path / TEXT_TOWER_SUBDIR / "model.safetensors").is_file()
    assert not (ckpts["clip_no_tower"] / TEXT_TOWER_SUBDIR).exists()
    again = save_tiny_llava(tmp_path / "again", tower="clip")
    assert (again / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_text_tower_vision_weights_match_vlm(ckpts: dict[str, Path], backends: dict, tower: str) -> None:
    """The joint space reads out the same tower the VLM uses (post_layernorm is shared)."""
    be = backends[tower]
    assert be.has_text_tower and be.joint.kind == tower
    assert be.text_tower_id == str(ckpts[tower] / TEXT_TOWER_SUBDIR)
    torch.testing.assert_close(be.joint.post_layernorm.weight, be.tower.post_layernorm.weight)
    assert be.joint.encode_text("red box").shape == (be.joint.embed_dim,)


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("tower", ["clip", "siglip"])
@pytest.mark.parametrize("batch", [1, 2])
def test_disabled_and_keep_all_match_stock_generate(backends: dict, images: list, tower: str, batch: int) -> None:
    be = backends[tower]
    imgs, qs = images[:batch], QUESTIONS[:batch]
    ref = be.reference_generate(imgs, qs, max_new_tokens=MAX_NEW)
    assert all(len(r) > 0 for r in ref)
    assert batch == 1 or ref[0] != ref[1]  # the inputs matter: a degenerate model would prove nothing
    off = be.answer(imgs, qs, AtpConfig(enabled=False), max_new_tokens=MAX_NEW)
    assert off.generated_ids == ref
    compact = be.answer(imgs, qs, AtpConfig(keep_ratio=1.0, positions="compact"), max_new_tokens=MAX_NEW)
    assert compact.generated_ids == ref
    assert off.visual_tokens_kept == [N] * batch and off.selection.method == "keep_all"
    full = be.answer(imgs, qs, AtpConfig(keep_ratio=1.0), max_new_tokens=MAX_NEW)  # ATP on, K = N
    assert full.generated_ids == ref
    assert full.selection.indices.tolist() == [list(range(N))] * batch


# ---------------------------------------------------------------- pruning


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_prefill_holds_text_plus_k_image_positions(backends: dict, images: list, tower: str) -> None:
    be = backends[tower]
    calls, handle = _record_prefill(be)
    try:
        res = be.answer(images, QUESTIONS, AtpConfig(keep_tokens=10, positions="compact"), max_new_tokens=MAX_NEW)
    finally:
        handle.remove()
    assert res.visual_tokens_kept == [10, 10]
    embeds, mask, positions = calls[0]["inputs_embeds"], calls[0]["attention_mask"], calls[0]["position_ids"]
    lengths = [t + 10 for t in res.text_tokens]
    assert embeds.shape[1] == max(lengths)
    assert mask.sum(dim=1).tolist() == lengths
    for b, length in enumerate(lengths):  # left padded, positions 0..len-1 on the real tokens
        assert mask[b, -length:].all() and not mask[b, :-length].any()
        assert positions[b, -length:].tolist() == list(range(length))
    assert res.text_tokens[0] != res.text_tokens[1]  # the questions differ in length: padding was exercised


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


def test_positions_change_answers_only_through_rope(backends: dict, images: list) -> None:
    """Same kept tokens, same sequence length; only the position ids differ between the modes."""
    be = backends["clip"]
    calls, handle = _record_prefill(be)
    try:
        be.answer(images, QUESTIONS, AtpConfig(keep_tokens=10, positions="compact"), max_new_tokens=1)
        first = dict(calls[0])
        calls.clear()
        be.answer(images, QUESTIONS, AtpConfig(keep_tokens=10, positions="original"), max_new_tokens=1)
    finally:
        handle.remove()
    torch.testing.assert_close(calls[0]["inputs_embeds"], first["inputs_embeds"])
    assert torch.equal(calls[0]["attention_mask"], first["attention_mask"])
    assert not torch.equal(calls[0]["position_ids"], first["position_ids"])


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_dense_readouts(backends: dict, images: list, tower: str) -> None:
    be = backends[tower]
    inter = {}
    for readout in ("naive", "maskclip", "clearclip"):
        res = be.answer(images, QUESTIONS, AtpConfig(alpha=1.0, inter_readout=readout), max_new_tokens=1)
        assert res.scoring.inter_readout == readout
        inter[readout] = res.selection.s_inter
        assert inter[readout].shape == (2, N) and torch.isfinite(inter[readout]).all()
    assert not torch.allclose(inter["naive"], inter["maskclip"])
    assert not torch.allclose(inter["maskclip"], inter["clearclip"])
    # MaskCLIP keeps each token's own content: changing token j leaves token i's state unchanged.
    from atp_ros.backends.text_towers import dense_states

    layer = be.tower.encoder.layers[-1]
    x = torch.randn(1, 5, layer.self_attn.embed_dim)
    y = x.clone()
    y[0, 3] = torch.randn(layer.self_attn.embed_dim)  # (a constant shift would vanish in layer_norm1)
    with torch.no_grad():
        a, b = dense_states(layer, x, "maskclip"), dense_states(layer, y, "maskclip")
        assert torch.allclose(a[0, :3], b[0, :3]) and not torch.allclose(a[0, 3], b[0, 3])
        c, d = dense_states(layer, x, "clearclip"), dense_states(layer, y, "clearclip")
        assert not torch.allclose(c[0, 0], d[0, 0])  # query-query attention mixes tokens


def test_bad_atp_choices_are_rejected(backends: dict, images: list) -> None:
    be = backends["clip"]
    for bad in ({"positions": "sideways"}, {"inter_readout": "magic"}, {"intra_signal": "x"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            be.answer(images[:1], QUESTIONS[0], AtpConfig(**bad))


def test_per_sample_budget_left_pads(backends: dict, images: list) -> None:
    be = backends["clip"]
    calls, handle = _record_prefill(be)
    try:
        res = be.answer(images, QUESTIONS, AtpConfig(mass=0.4, alpha=0.5), max_new_tokens=MAX_NEW)
    finally:
        handle.remove()
    kept = res.visual_tokens_kept
    assert kept == res.selection.lengths.tolist()
    assert kept[0] != kept[1], "pick inputs whose adaptive budgets differ"
    lengths = [t + k for t, k in zip(res.text_tokens, kept, strict=True)]
    assert calls[0]["attention_mask"].sum(dim=1).tolist() == lengths
    assert calls[0]["inputs_embeds"].shape[1] == max(lengths)
    # Each sample alone gives the same tokens as inside the padded batch.
    for b in range(2):
        alone = be.answer(
            images[b : b + 1], QUESTIONS[b : b + 1], AtpConfig(mass=0.4, alpha=0.5), max_new_tokens=MAX_NEW
        )
        assert alone.visual_tokens_kept == [kept[b]]
        assert alone.generated_ids[0] == res.generated_ids[b]


def test_full_strategy_keeps_cls_and_prunes_patches(backends: dict, images: list) -> None:
    be = backends["clip_full"]
    assert be.num_feature_tokens == N + 1 and be.score_layer == be.num_layers - 1
    ref = be.reference_generate(images, QUESTIONS, max_new_tokens=MAX_NEW)
    assert be.answer(images, QUESTIONS, AtpConfig(keep_ratio=1.0), max_new_tokens=MAX_NEW).generated_ids == ref
    calls, handle = _record_prefill(be)
    try:
        res = be.answer(images, QUESTIONS, AtpConfig(keep_tokens=7), max_new_tokens=MAX_NEW)
    finally:
        handle.remove()
    # Token counts are patches in every family; CLS rides along to the LLM and shows in consumer_tokens.
    assert res.visual_tokens_total == N and res.visual_tokens_kept == [7, 7] and res.consumer_tokens == [8, 8]
    assert res.selection.mask.sum(dim=(1, 2)).tolist() == [7, 7]
    assert calls[0]["attention_mask"].sum(dim=1).tolist() == [t + 8 for t in res.text_tokens]


# ---------------------------------------------------------------- result contents


def test_result_contents(backends: dict, images: list) -> None:
    be = backends["clip"]
    res = be.answer(images, QUESTIONS, AtpConfig(keep_tokens=12), max_new_tokens=MAX_NEW)
    sel: Selection = res.selection
    assert len(res.answers) == 2 and all(isinstance(a, str) for a in res.answers)
    assert res.grid == (8, 8) and sel.mask.shape == (2, 8, 8)
    assert res.visual_tokens_total == N
    for b in range(2):
        idx = sel.kept(b)
        assert int(sel.mask[b].sum()) == res.visual_tokens_kept[b] == 12
        assert torch.all(idx[1:] > idx[:-1])
        assert sel.mask[b].flatten().nonzero().flatten().tolist() == idx.tolist()
    assert sel.s_intra.shape == sel.s_inter.shape == (2, N)
    assert res.alpha_used == 0.5 and res.notes == []
    assert set(res.timings.as_dict()) >= set(STAGES)
    assert all(v >= 0 for v in res.timings.as_dict().values()) and res.timings.prefill > 0 and res.timings.decode > 0
    assert 0 < res.flops["llm_prefill"] < res.flops["llm_prefill_unpruned"]
    assert res.flops["scoring"] > 0  # CLS row + joint read-out: part of the pipeline, not hidden
    parts = res.flops["vision"] + res.flops["scoring"] + res.flops["projector"] + res.flops["llm_prefill"]
    assert res.flops["pipeline"] == pytest.approx(parts)
    off = be.answer(images, QUESTIONS, AtpConfig(enabled=False), max_new_tokens=1)
    cls_only = be.answer(images, QUESTIONS, AtpConfig(alpha=0.0, keep_tokens=12), max_new_tokens=1)
    assert off.flops["scoring"] == 0.0 < cls_only.flops["scoring"] < res.flops["scoring"]
    assert res.keep_mask(1).dtype == np.uint8 and res.keep_mask(1).sum() == 12


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


def test_missing_text_tower_runs_cls_only_with_note(backends: dict, images: list) -> None:
    be = backends["clip_no_tower"]
    assert not be.has_text_tower
    assert be.load_notes and "no text tower" in be.load_notes[0]
    res = be.answer(images, QUESTIONS, AtpConfig(alpha=0.7, keep_tokens=8), max_new_tokens=2)
    assert res.alpha_used == 0.0
    assert len(res.notes) == 1 and "running CLS-only, alpha=0" in res.notes[0]
    assert res.selection.s_inter is None and res.selection.s_intra is not None
    # Same tower weights as "clip": CLS-only picks the same patches there.
    ref = be.answer(images, QUESTIONS, AtpConfig(alpha=0.0, keep_tokens=8), max_new_tokens=2)
    assert res.selection.indices.tolist() == ref.selection.indices.tolist() and ref.notes == []


def test_cls_only_skips_text_tower_and_joint_space(backends: dict, images: list) -> None:
    """A selector that does not use S_inter runs neither the text tower nor the joint read-out per frame."""
    be = backends["clip"]
    misses = be.text_cache.misses
    for atp in (AtpConfig(alpha=0.0, keep_tokens=8), AtpConfig(selector="uniform", keep_tokens=8)):
        res = be.answer(images, ["a question asked only here", "and another one"], atp, max_new_tokens=1)
        assert res.selection.s_inter is None and res.alpha_used == 0.0
    assert be.text_cache.misses == misses


def test_concurrent_calls_match_sequential(backends: dict, images: list) -> None:
    check_concurrent_calls_match_sequential(backends["clip"], images)


def test_text_embedding_cache_hits_on_repeated_question(backends: dict, images: list) -> None:
    be = backends["clip"]
    q = "is the aisle empty?"
    be.answer(images[:1], q, AtpConfig(keep_tokens=8), max_new_tokens=1)
    hits, misses = be.text_cache.hits, be.text_cache.misses
    be.answer(images[:1], q, AtpConfig(keep_tokens=8), max_new_tokens=1)
    assert be.text_cache.hits == hits + 1 and be.text_cache.misses == misses


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_received_signal(backends: dict, images: list, tower: str) -> None:
    be = backends[tower]
    res = be.answer(images, QUESTIONS, AtpConfig(intra_signal="received", alpha=0.0, keep_tokens=8), max_new_tokens=2)
    assert res.scoring.intra_signal == "received"
    s = res.selection.s_intra
    assert s.shape == (2, N) and torch.all(s > 0)
    cls = be.answer(images, QUESTIONS, AtpConfig(alpha=0.0, keep_tokens=8), max_new_tokens=2)
    assert not torch.allclose(s, cls.selection.s_intra)


@pytest.mark.parametrize("selector", ["random", "uniform", "divprune", "text_only"])
def test_baseline_selectors(backends: dict, images: list, selector: str) -> None:
    res = backends["clip"].answer(images, QUESTIONS, AtpConfig(selector=selector, keep_tokens=6), max_new_tokens=1)
    assert res.visual_tokens_kept == [6, 6] and res.selection.method == selector


def test_explicit_text_encoder_and_joint_space(ckpts: dict) -> None:
    tower_dir = str(ckpts["clip"] / TEXT_TOWER_SUBDIR)
    be = load_backend(str(ckpts["clip_no_tower"]), text_encoder_id=tower_dir, device="cpu")
    assert be.has_text_tower and be.text_tower_id == tower_dir and be.load_notes == []
    joint = load_joint_space(tower_dir, torch.device("cpu"), torch.float32)
    assert joint.patches_to_joint(torch.randn(2, 5, joint.vision_hidden)).shape == (2, 5, joint.embed_dim)
    with pytest.raises(ModelLoadError, match="siglip"):  # a SigLIP space cannot read a CLIP tower
        load_backend(str(ckpts["clip_no_tower"]), text_encoder_id=str(ckpts["siglip"] / TEXT_TOWER_SUBDIR))


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=str(empty)):
        load_backend(str(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(ModelLoadError, match=str(broken)):
        load_backend(str(broken))
    with pytest.raises(ModelLoadError, match=str(broken)):
        LlavaBackend.from_pretrained(str(broken))


def test_bad_inputs(backends: dict, images: list) -> None:
    be = backends["clip"]
    with pytest.raises(ValueError, match="questions"):
        be.answer(images, ["one question"], max_new_tokens=1)
    with pytest.raises(ValueError, match="HxWx3"):
        be.answer([np.zeros((8, 8), np.uint8)], "what?", max_new_tokens=1)
    with pytest.raises(ValueError, match="intra_signal"):
        be.answer(images, "what?", AtpConfig(intra_signal="nope"), max_new_tokens=1)
    # A literal <image> in a question must not add placeholders.
    res = be.answer(images[:1], "what is <image> here?", AtpConfig(keep_tokens=4), max_new_tokens=1)
    assert res.visual_tokens_kept == [4]
