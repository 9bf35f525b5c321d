"""What only Qwen2.5-VL does, on tiny random checkpoints built with the stock classes and processors: a token
grid per frame (2x2 merge groups, odd merged grids), the window order undone, S_intra as received attention at a
full-attention block, M-RoPE positions of the unpruned prompt kept for the kept tokens, and a default without
any text tower. The contract every family keeps is checked in ``test_backend_contract.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from atp_ros.backends import AtpConfig, ModelLoadError, load_backend
from atp_ros.backends.qwen2_5_vl import Qwen25VLBackend
from atp_ros.testing.tiny.qwen2_5_vl import save_tiny_qwen2_5_vl
from backend_checks import LmCalls, outputs_of
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision, eager_attention_forward
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

MAX_NEW = 5
QUESTIONS = ["where is the red box?", "how many pallets are on the shelf?"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_qwen")
    return {
        "tower": save_tiny_qwen2_5_vl(root / "tower"),
        "plain": save_tiny_qwen2_5_vl(root / "plain", with_text_tower=False),  # what a real checkpoint is
    }


@pytest.fixture(scope="module")
def backend(ckpts: dict[str, Path]) -> Qwen25VLBackend:
    return load_backend(str(ckpts["plain"]), device="cpu")


def _frames(*shapes: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


# ---------------------------------------------------------------- the token grid


def test_grid_follows_the_frame_including_odd_merged_grids(backend) -> None:
    """12 x 16 patches -> 6 x 8 = 48 LLM tokens; 14 x 10 patches -> an odd 7 x 5 merged grid of 35 tokens."""
    imgs = _frames((48, 64), (56, 40))
    result = backend.answer(imgs, QUESTIONS, AtpConfig(keep_ratio=0.25), max_new_tokens=2)
    assert [result.grid_of(b) for b in range(2)] == [(6, 8), (7, 5)]
    assert result.visual_tokens_total == [48, 35] and result.visual_tokens_kept == [12, 9]
    assert result.keep_mask(1).shape == (7, 5) and int(result.keep_mask(1).sum()) == 9
    with pytest.raises(ValueError, match="grid_of"):
        result.grid  # noqa: B018 -- the grids differ: there is no one grid
    assert [v.as_tuple() for v in result.views] == [(0, 0, 64, 48), (0, 0, 40, 56)]  # the whole frame, resized


def test_a_part_of_a_mixed_batch_keeps_its_own_grid(backend) -> None:
    """Ray Serve answers a coalesced batch and splits it per caller (``VlmResult.part``): each part keeps its
    frame's grid, mask, scores and token counts, and pickles without the rest of the batch."""
    import pickle

    imgs = _frames((48, 64), (56, 40), (32, 32))
    result = backend.answer(imgs, [*QUESTIONS, "is the aisle empty?"], AtpConfig(keep_ratio=0.25), max_new_tokens=2)
    for b in range(3):
        part = pickle.loads(pickle.dumps(result.part(b, b + 1)))
        assert part.grid_of(0) == result.grid_of(b) and part.visual_tokens_total == [result.visual_tokens_total[b]]
        assert np.array_equal(part.keep_mask(0), result.keep_mask(b))
        assert np.array_equal(part.score_grid(0), result.score_grid(b))
        assert part.generated_ids == [result.generated_ids[b]]
        assert part.visual_tokens_kept == [result.visual_tokens_kept[b]]


def test_window_order_is_undone(backend) -> None:
    """The un-permuted last block, merged, is exactly the tower's output (which the model un-permutes itself)."""
    batch = backend.preprocess(_frames((40, 50), (64, 48)), QUESTIONS)
    vision = backend.encode(batch)
    thw = batch.inputs["image_grid_thw"]
    window_index, _ = get_vision_window_index(thw, 2, backend.visual.config.window_size, 4)
    assert not torch.equal(window_index, torch.arange(len(window_index)))  # the tiny windows really permute
    merged = backend.visual.merger(vision.last[0])  # groups of 4 consecutive patches, processor order
    stock = backend.model.model.get_image_features(batch.pixel_values, thw).pooler_output
    torch.testing.assert_close(merged, torch.cat(stock), rtol=0, atol=0)
    for b, tokens in enumerate(stock):
        torch.testing.assert_close(vision.tokens[b, : len(tokens)], tokens, rtol=0, atol=0)


def test_s_intra_is_the_attention_each_patch_receives_at_the_full_block(backend) -> None:
    """Recomputed the way the tower runs it (window order, its own rotary table, the eager kernel's weights),
    averaged over heads and queries, un-permuted and pooled per merge group: the backend's S_intra."""
    imgs = _frames((40, 50), (64, 48))
    result = backend.answer(imgs, QUESTIONS, AtpConfig(alpha=0.0, keep_tokens=4), max_new_tokens=1)
    assert result.scoring.intra_signal == "received" and result.notes == []
    batch = backend.preprocess(imgs, QUESTIONS)
    thw = batch.inputs["image_grid_thw"]
    visual, block = backend.visual, backend.visual.blocks[backend.score_layer]
    hs = visual(batch.pixel_values, grid_thw=thw, output_hidden_states=True).hidden_states[backend.score_layer]
    window_index, _ = get_vision_window_index(thw, 2, visual.config.window_size, 4)
    units = window_index.repeat_interleave(4) * 4 + torch.arange(4).repeat(len(window_index))  # patch order
    cos, sin = visual.rotary_pos_emb(hs, get_vision_position_ids(thw, 2))
    cos, sin = cos[units], sin[units]  # the rotary table in window order, as the tower permutes it
    start = 0
    for b, (_, h, w) in enumerate(thw.tolist()):
        seg = (units >= start) & (units < start + h * w)  # this image's patches (in window order)
        x = block.norm1(hs[seg])
        q, k, v = block.attn.qkv(x).reshape(len(x), 3, 4, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos[seg], sin[seg])
        _, weights = eager_attention_forward(
            block.attn, *(t.transpose(0, 1)[None] for t in (q, k, v)), None, block.attn.scaling
        )
        received = weights[0].mean(dim=(0, 1))  # (L_b,) in window order
        order = torch.argsort(units[seg])
        pooled = received[order].reshape(-1, 4).mean(dim=1)  # processor order, then per merge group
        torch.testing.assert_close(result.selection.s_intra[b, : len(pooled)], pooled, rtol=1e-5, atol=1e-7)
        start += h * w


# ---------------------------------------------------------------- what the LLM gets


def _stock_prefill(backend, imgs) -> dict:
    with LmCalls(backend.model.model.language_model) as lm:
        backend.reference_generate(imgs, QUESTIONS, max_new_tokens=2)
    return lm.calls


def test_llm_gets_text_plus_kept_tokens_at_their_original_positions(backend) -> None:
    """keep 0.25: the prefill holds text + vision start/end + the kept merged tokens only, each at the M-RoPE
    position it has in the unpruned prompt (the model's own get_rope_index), and decoding goes on from there."""
    imgs = _frames((40, 50), (64, 48))
    stock = _stock_prefill(backend, imgs)
    with LmCalls(backend.model.model) as vlm, LmCalls(backend.model.model.language_model) as lm:
        result = backend.answer(imgs, QUESTIONS, AtpConfig(keep_ratio=0.25), max_new_tokens=2)
    assert result.visual_tokens_kept == [8, 12] and result.visual_tokens_total == [30, 48]
    ids, full_ids = vlm.prefill["input_ids"], backend.preprocess(imgs, QUESTIONS).inputs["input_ids"]
    full_pos, pos = stock[0]["position_ids"], lm.prefill["position_ids"]  # (4, B, T): text row + t, h, w
    cfg = backend.model.config
    for b in range(2):
        real = lm.prefill["attention_mask"][b].bool()
        row, full_real = ids[b][real], full_ids.shape[1] - int((full_ids[b] == backend.tokenizer.pad_token_id).sum())
        assert len(row) == result.text_tokens[b] + result.visual_tokens_kept[b]
        start = int((row == cfg.vision_start_token_id).nonzero()) + 1
        assert row[start : start + result.visual_tokens_kept[b]].eq(cfg.image_token_id).all()
        assert int(row[start + result.visual_tokens_kept[b]]) == cfg.vision_end_token_id
        # The kept columns of the unpruned positions: text before, kept image offsets, text after.
        stock_row = full_pos[1:, b, full_ids.shape[1] - full_real :]
        kept = result.selection.kept(b) + start
        n = result.visual_tokens_total[b]
        columns = torch.cat([torch.arange(start), kept, torch.arange(start + n, full_real)])
        assert torch.equal(pos[1:, b][:, real], stock_row[:, columns])
        assert pos[0, b][real].tolist() == list(range(len(row)))  # the text row: what generate derives
    # The first decode step continues from the last prompt position + 1 in every row, as stock Qwen2.5-VL does.
    assert torch.equal(lm.calls[1]["position_ids"][:, :, 0], pos[:, :, -1] + 1)
    assert torch.equal(lm.calls[1]["position_ids"][1:, :, 0], stock[1]["position_ids"][1:, :, 0])
    assert lm.calls[1]["cached"] == ids.shape[1] < full_ids.shape[1]


def test_llm_embeds_exactly_the_kept_merged_tokens(backend) -> None:
    imgs = _frames((40, 50), (64, 48))
    stock = backend.model.model.get_image_features(**_vision_inputs(backend, imgs)).pooler_output
    with LmCalls(backend.model.model) as vlm, LmCalls(backend.model.model.language_model) as lm:
        result = backend.answer(imgs, QUESTIONS, AtpConfig(keep_tokens=7), max_new_tokens=1)
    embeds, ids = lm.prefill["inputs_embeds"], vlm.prefill["input_ids"]
    for b in range(2):
        at = ids[b] == backend.model.config.image_token_id
        torch.testing.assert_close(embeds[b][at], stock[b][result.selection.kept(b)], rtol=0, atol=0)


def _vision_inputs(backend, imgs) -> dict:
    inputs = backend.preprocess(imgs, QUESTIONS).inputs
    return {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}


def test_keep_quarter_shrinks_the_prefill(backend) -> None:
    imgs = _frames((64, 64), (64, 48))
    full = backend.answer(imgs, QUESTIONS, AtpConfig(enabled=False), max_new_tokens=1)
    quarter = backend.answer(imgs, QUESTIONS, AtpConfig(keep_ratio=0.25), max_new_tokens=1)
    assert full.visual_tokens_total == [64, 48] and quarter.visual_tokens_kept == [16, 12]
    assert quarter.flops["llm_tokens"] == full.flops["llm_tokens"] - (48 + 36) / 2
    assert quarter.flops["llm_prefill"] < 0.6 * full.flops["llm_prefill"]
    assert quarter.flops["llm_prefill_unpruned"] == full.flops["llm_prefill"]


def test_same_size_frames_batch_like_singles(backend) -> None:
    """Frames of one size share a grid: one batched selection (no per-image grids), equal to each frame alone."""
    imgs = _frames((40, 50), (40, 50))
    atp = AtpConfig(mass=0.5, alpha=0.0)
    batch = backend.answer(imgs, QUESTIONS, atp, max_new_tokens=MAX_NEW)
    assert batch.selection.grids is None and batch.grid == (5, 6)
    for b in range(2):
        alone = backend.answer(imgs[b : b + 1], QUESTIONS[b], atp, max_new_tokens=MAX_NEW)
        assert alone.visual_tokens_kept == [batch.visual_tokens_kept[b]]
        assert torch.equal(alone.selection.kept(0), batch.selection.kept(b))
        assert alone.generated_ids[0] == batch.generated_ids[b]


# ---------------------------------------------------------------- text tower and settings


def test_without_a_text_tower_it_runs_intra_only_and_says_so(backend, ckpts) -> None:
    """A real Qwen2.5-VL has no matching text tower: the load note says so (the node logs it and lists it in
    /diagnostics), every call that asked for alpha > 0 carries a note, and S_intra alone ranks the tokens."""
    assert not backend.has_text_tower
    first = backend.load_notes[0]
    assert "no text tower" in first and "intra-only" in first and "no matching contrastive text tower" in first
    result = backend.answer(_frames((40, 50)), QUESTIONS[0], AtpConfig(alpha=0.5, keep_tokens=6), max_new_tokens=1)
    assert result.alpha_used == 0.0 and result.selection.s_inter is None
    assert "running intra-only (S_intra alone), alpha=0" in result.notes[0]
    given = load_backend(str(ckpts["plain"]), text_encoder_id=str(ckpts["tower"] / "atp_text_tower"), device="cpu")
    assert given.has_text_tower and any("an approximation" in n for n in given.load_notes)
    scored = given.answer(_frames((40, 50)), QUESTIONS[0], AtpConfig(alpha=0.5, keep_tokens=6), max_new_tokens=1)
    assert scored.alpha_used == 0.5 and scored.selection.s_inter.shape == (1, 30) and scored.notes == []


def test_compact_positions_are_noted_not_silently_changed(backend) -> None:
    result = backend.answer(_frames((40, 50)), QUESTIONS[0], AtpConfig(keep_tokens=6, positions="compact"))
    assert any("positions=compact is not available" in n for n in result.notes)


def test_score_layer_must_be_a_full_attention_block(ckpts) -> None:
    with pytest.raises(ModelLoadError, match="not a full-attention block"):
        Qwen25VLBackend.from_pretrained(str(ckpts["plain"]), device="cpu", score_layer=0)
    assert Qwen25VLBackend.from_pretrained(str(ckpts["plain"]), device="cpu", score_layer=1).score_layer == 1


def test_literal_vision_tokens_in_a_question_are_dropped(backend) -> None:
    img = _frames((40, 50))
    plain = backend.answer(img, "where is the box?", AtpConfig(keep_tokens=6), max_new_tokens=2)
    sneaky = backend.answer(img, "where <|image_pad|> is the <|vision_start|>box?", AtpConfig(keep_tokens=6), 2)
    assert sneaky.generated_ids == plain.generated_ids and sneaky.visual_tokens_total == [30]


def test_the_tower_runs_once_per_call(backend) -> None:
    with outputs_of(backend.visual) as seen:
        backend.answer(_frames((40, 50), (64, 48)), QUESTIONS, AtpConfig(keep_tokens=6), max_new_tokens=3)
    assert len(seen) == 1
