"""What only LLaVA-OneVision does, on a tiny random checkpoint built with the stock classes and processors: the
<image> run of base crop + unpadded anyres grid + one newline per grid row (64 + 192 + 12 = 268 for a 40x50
frame), pruning only the grid, the base crop and every newline reaching the LLM, 1-D original positions.
The contract every family keeps is checked in ``test_backend_contract.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from atp_ros.backends import AtpConfig, load_backend
from atp_ros.backends.llava_onevision import LlavaOnevisionBackend
from atp_ros.testing.tiny.llava_onevision import save_tiny_llava_onevision
from backend_checks import LmCalls

QUESTIONS = ["where is the red box?", "how many pallets are on the shelf?"]


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> LlavaOnevisionBackend:
    return load_backend(str(save_tiny_llava_onevision(tmp_path_factory.mktemp("tiny_ov") / "ov")), device="cpu")


def _frames(*shapes: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def test_the_image_run_is_base_grid_and_newlines(backend) -> None:
    imgs = _frames((40, 50), (32, 32))
    batch = backend.preprocess(imgs, QUESTIONS)
    runs = (batch.inputs["input_ids"] == backend.image_token_id).sum(dim=1).tolist()
    assert runs == [64 + 192 + 12, 64 + 64 + 8]  # base 8x8, grid 12x16 (unpadded) or 8x8, a newline per row
    result = backend.answer(imgs, QUESTIONS, AtpConfig(keep_ratio=0.25), max_new_tokens=1)
    assert [result.grid_of(b) for b in range(2)] == [(12, 16), (8, 8)]
    assert result.visual_tokens_total == [192, 64] and result.visual_tokens_kept == [48, 16]
    assert result.consumer_tokens == [48 + 64 + 12, 16 + 64 + 8]


def test_llm_gets_the_base_crop_every_newline_and_the_kept_grid_tokens(backend) -> None:
    """The LLM's image embeddings are the stock packed sequence with the pruned grid cells removed: the base crop
    whole, each row's kept cells in order, then that row's newline; positions are the unpruned ones."""
    imgs = _frames((40, 50), (32, 32))
    batch = backend.preprocess(imgs, QUESTIONS)
    stock = backend.model.model.get_image_features(
        batch.inputs["pixel_values"], batch.inputs["image_sizes"], vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    ).pooler_output  # fmt: skip
    with LmCalls(backend.model.model) as vlm, LmCalls(backend.model.model.language_model) as lm:
        result = backend.answer(imgs, QUESTIONS, AtpConfig(keep_ratio=0.25, positions="original"), max_new_tokens=1)
    image_id = backend.image_token_id
    ids, embeds, pos = vlm.prefill["input_ids"], lm.prefill["inputs_embeds"], lm.prefill["position_ids"]
    for b in range(2):
        h, w = result.grid_of(b)
        cells = result.selection.kept(b)
        keep = torch.zeros(len(stock[b]), dtype=torch.bool)
        keep[:64] = True  # the base crop
        keep[64 + torch.arange(h) * (w + 1) + w] = True  # every newline
        keep[64 + (cells // w) * (w + 1) + cells % w] = True  # the kept grid cells
        real = lm.prefill["attention_mask"][b].bool()
        torch.testing.assert_close(embeds[b][real][ids[b][real] == image_id], stock[b][keep], rtol=0, atol=0)
        newline = backend.model.model.image_newline
        assert int((stock[b][keep] == newline).all(dim=-1).sum()) == h
        full = batch.inputs["input_ids"][b][batch.inputs["attention_mask"][b].bool()]
        where = (full == image_id).nonzero().flatten()
        mask = torch.ones(len(full), dtype=torch.bool)
        mask[where] = keep
        assert pos[b][real].tolist() == torch.arange(len(full))[mask].tolist()
