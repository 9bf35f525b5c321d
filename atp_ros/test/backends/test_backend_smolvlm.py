"""What only SmolVLM2 / Idefics3 does, on tiny random checkpoints built with the stock classes and processors:
tiles stitched into one grid over the frame, pruning after the pixel shuffle, the structural text tokens and
the global tile untouched, kept tokens at their original 1-D positions, both model types loading.
The contract every family keeps is checked in ``test_backend_contract.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from atp_ros.backends import AtpConfig, load_backend
from backend_checks import LmCalls

pytest.importorskip("num2words")  # SmolVLMProcessor needs it

from atp_ros.backends.smolvlm import Idefics3Backend, SmolVLMBackend
from atp_ros.testing.tiny.smolvlm import save_tiny_smolvlm

QUESTIONS = ["where is the red box?", "how many pallets are on the shelf?"]
G = 4  # LLM tokens per tile side: 32 px / patch 4 = 8 patches, pixel shuffle 2


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_smolvlm")
    return {"smolvlm": save_tiny_smolvlm(root / "smolvlm"), "idefics3": save_tiny_smolvlm(root / "i3", kind="idefics3")}


@pytest.fixture(scope="module")
def backend(ckpts) -> SmolVLMBackend:
    return load_backend(str(ckpts["smolvlm"]), device="cpu")


def _frames(*shapes: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def test_tiles_form_one_grid_over_the_frame(backend) -> None:
    """A 4:5 frame becomes 2x2 tiles (an 8x8 token grid), a 1:2 frame 1x2 tiles (4x8): N per frame, masks per
    frame, the global tile on top of K."""
    imgs = _frames((40, 50), (32, 64))
    result = backend.answer(imgs, QUESTIONS, AtpConfig(keep_ratio=0.25), max_new_tokens=2)
    assert [result.grid_of(b) for b in range(2)] == [(8, 8), (4, 8)]
    assert result.visual_tokens_total == [64, 32] and result.visual_tokens_kept == [16, 8]
    assert result.consumer_tokens == [16 + 16, 8 + 16]  # + the global tile's 16 tokens
    assert result.keep_mask(1).shape == (4, 8) and int(result.keep_mask(1).sum()) == 8


def test_llm_gets_the_structural_tokens_the_global_tile_and_the_kept_tokens_in_its_order(backend) -> None:
    """Stock prompt minus the dropped <image> tokens: every <fake_token_around_image>, <row_i_col_j>,
    <global-img> and newline stays; each kept embedding is the stock connector output of the tile and position
    its frame-grid cell names; the global tile arrives whole; positions are those of the unpruned prompt."""
    imgs = _frames((40, 50), (32, 64))
    batch = backend.preprocess(imgs, QUESTIONS)
    stock = backend.model.model.get_image_features(
        batch.inputs["pixel_values"], batch.inputs["pixel_attention_mask"]
    ).pooler_output  # per image (tiles * 16, D), tile by tile
    with LmCalls(backend.model.model) as vlm, LmCalls(backend.model.model.text_model) as lm:
        result = backend.answer(imgs, QUESTIONS, AtpConfig(keep_ratio=0.25, positions="original"), max_new_tokens=1)
    image_id = backend.image_token_id
    ids, embeds, pos = vlm.prefill["input_ids"], lm.prefill["inputs_embeds"], lm.prefill["position_ids"]
    for b, (rows, cols) in enumerate([(2, 2), (1, 2)]):
        full = batch.inputs["input_ids"][b][batch.inputs["attention_mask"][b].bool()]
        real = lm.prefill["attention_mask"][b].bool()
        row = ids[b][real]
        assert row[row != image_id].tolist() == full[full != image_id].tolist()  # every text token, in order
        cells = result.selection.kept(b)
        r, c = cells // (cols * G), cells % (cols * G)
        offsets = ((r // G) * cols + c // G) * G * G + (r % G) * G + c % G  # tile-major, raster within a tile
        local = rows * cols * G * G
        expected = torch.cat([offsets.sort().values, torch.arange(local, local + G * G)])
        torch.testing.assert_close(embeds[b][real][row == image_id], stock[b][expected], rtol=0, atol=0)
        where = (full == image_id).nonzero().flatten()
        keep = torch.ones(len(full), dtype=torch.bool)
        keep[where] = False
        keep[where[expected]] = True
        assert pos[b][real].tolist() == torch.arange(len(full))[keep].tolist()  # original positions


def test_idefics3_model_type_loads_and_is_exact(ckpts) -> None:
    backend = load_backend(str(ckpts["idefics3"]), device="cpu")
    assert isinstance(backend, Idefics3Backend) and backend.family == "idefics3"
    imgs = _frames((40, 50), (32, 64))
    ref = backend.reference_generate(imgs, QUESTIONS, max_new_tokens=4)
    assert backend.answer(imgs, QUESTIONS, AtpConfig(keep_ratio=1.0), max_new_tokens=4).generated_ids == ref
    assert backend.answer(imgs, QUESTIONS, AtpConfig(keep_ratio=0.25), max_new_tokens=1).visual_tokens_kept == [16, 8]


def test_a_budget_per_tile_spreads_evenly_and_keeps_all_exactly(backend) -> None:
    """``tile_budget = "tile"``: keep_ratio per tile (4 of each tile's 16 at 0.25), keep_tokens split evenly
    (ceil(K / tiles) each); keeping everything is still the stock answer. The default is one budget per frame."""
    imgs = _frames((40, 50), (32, 64))
    assert backend.tile_budget == "image"
    backend.tile_budget = "tile"
    try:
        quarter = backend.answer(imgs, QUESTIONS, AtpConfig(keep_ratio=0.25), max_new_tokens=1)
        tokens = backend.answer(imgs, QUESTIONS, AtpConfig(keep_tokens=6), max_new_tokens=1)
        full = backend.answer(imgs, QUESTIONS, AtpConfig(keep_ratio=1.0), max_new_tokens=3)
    finally:
        backend.tile_budget = "image"
    for b, (h, w) in enumerate([(8, 8), (4, 8)]):
        mask = quarter.keep_mask(b)
        per_tile = [int(mask[r : r + G, c : c + G].sum()) for r in range(0, h, G) for c in range(0, w, G)]
        assert per_tile == [4] * (h * w // (G * G))
        assert quarter.score_grid(b).shape == (h, w)
    assert tokens.visual_tokens_kept == [8, 6]  # 4 tiles x ceil(6 / 4); 2 tiles x ceil(6 / 2)
    assert full.generated_ids == backend.reference_generate(imgs, QUESTIONS, max_new_tokens=3)


def test_literal_image_and_layout_tokens_in_a_question_are_dropped(backend) -> None:
    img = _frames((40, 50))
    plain = backend.answer(img, "where is the box?", AtpConfig(keep_tokens=6), max_new_tokens=2)
    sneaky = backend.answer(img, "where <row_3_col_1> is <image> the <global-img>box?", AtpConfig(keep_tokens=6), 2)
    assert sneaky.generated_ids == plain.generated_ids and sneaky.visual_tokens_total == [64]
