"""IDEFICS backend on a tiny random checkpoint: exactness, resampler key pruning, text tower, errors.

The checkpoint (and its CLIP text tower) is built in-process, saved with ``save_pretrained``
and loaded back through ``atp_ros.backends.load_backend``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from atp_ros.backends import AtpConfig, load_backend
from atp_ros.backends.idefics import IdeficsBackend, resample
from atp_ros.testing.tiny.idefics import save_tiny_idefics
from backend_checks import (
    MAX_NEW,
    QUESTIONS,
    ForwardInputs,
    assert_cls_plus_kept,
    check_concurrent_calls_match_sequential,
    check_cuda_auto_dtype_exact,
    check_each_alone_matches_batch,
    check_keep_all_matches_stock,
    check_load_errors,
    check_mask_sum_equals_kept,
    check_missing_text_tower,
    check_pruned_result,
    frames,
    outputs_of,
)

N_LATENTS = 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_idefics(tmp_path_factory.mktemp("idefics") / "tiny", n_latents=N_LATENTS)


@pytest.fixture(scope="module")
def backend(ckpt) -> IdeficsBackend:
    return load_backend(str(ckpt), device="cpu")


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return frames()


def test_loads_through_load_backend(backend):
    assert isinstance(backend, IdeficsBackend)
    assert backend.family == "idefics"
    assert backend.has_text_tower and backend.joint.kind == "clip" and backend.joint.vision_hidden == 32
    assert backend.grid == (8, 8) and backend.num_visual_tokens == 64
    assert backend.device.type == "cpu" and backend.dtype == torch.float32
    assert backend.model.config._attn_implementation == "sdpa" and backend.model.config.use_resampler


@pytest.mark.parametrize("atp", [AtpConfig(enabled=False), AtpConfig(keep_ratio=1.0)], ids=["disabled", "k_eq_n"])
def test_keep_all_matches_stock_generate(backend, images, atp):
    check_keep_all_matches_stock(backend, images, atp)


def test_resampler_sees_only_kept_tokens(backend, images):
    k = 8
    inner = backend.model.model
    first_block = inner.perceiver_resampler.blocks[0][0]
    with (
        ForwardInputs(
            vit=inner.vision_model.embeddings,  # counts ViT passes
            context=first_block.context_layer_norm,
            cross_keys=inner.gated_cross_attn_layers[0].cross_attn.k_proj,
        ) as rec,
        outputs_of(inner.vision_model.encoder.layers[-1]) as states,  # the tower's last states (B, 1+N, D)
    ):
        result = backend.answer(images, QUESTIONS, AtpConfig(keep_tokens=k), max_new_tokens=MAX_NEW)
    assert len(rec.seen["vit"]) == 1  # generate reuses the resampled latents; the ViT ran once
    (context,) = rec.seen["context"]  # resampler ran once, on CLS + K patches per image
    assert context.shape == (3, 1 + k, 32)
    assert_cls_plus_kept(context, states[-1], result.selection)  # states: (B, 1+N, D)
    # The LLM's gated cross-attention reads n_latents keys whatever K is (the honest part).
    assert all(keys.shape[:2] == (3, N_LATENTS) for keys in rec.seen["cross_keys"])
    assert result.consumer_tokens == [k + 1] * 3  # resampler context: CLS + K


def test_per_sample_budget_masks_padded_context(backend, images):
    question = "where is the red box?"
    with outputs_of(backend.model.model.perceiver_resampler.layer_norm) as latents:
        result = backend.answer(images, question, AtpConfig(mass=0.5), max_new_tokens=MAX_NEW)
        # Each image alone with its own K (no padding, stock resampler) gives the same latents.
        check_each_alone_matches_batch(backend, images, question, result, latents)


def test_masked_resample_matches_stock(backend):
    resampler = backend.model.model.perceiver_resampler
    torch.manual_seed(0)
    context = torch.randn(2, 9, 32)
    with torch.no_grad():
        full = resample(resampler, context, torch.ones(2, 9, dtype=torch.long))
        torch.testing.assert_close(full, resampler(context))
        # Row 0 keeps 5 real keys and 4 garbage padding keys: padding must not matter.
        padded = context.clone()
        padded[0, 5:] = 1e3
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[0, 5:] = 0
        out = resample(resampler, padded, mask)
        torch.testing.assert_close(out[0], resampler(context[:1, :5])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], full[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("atp", [AtpConfig(keep_tokens=8), AtpConfig(keep_ratio=0.3), AtpConfig(mass=0.6)])
def test_mask_sum_equals_kept(backend, images, atp):
    check_mask_sum_equals_kept(backend, images, atp)


def test_result_timings_flops_and_text_cache(backend, images):
    check_pruned_result(backend, images)  # llm_prefill: the LLM reads n_latents latents whatever K is
    received = backend.answer(images, QUESTIONS, AtpConfig(intra_signal="received", keep_tokens=6), max_new_tokens=1)
    assert received.visual_tokens_kept == [6] * 3


def test_concurrent_calls_match_sequential(backend, images):
    check_concurrent_calls_match_sequential(backend, images)


def test_missing_text_tower_notes_and_cls_only(ckpt, images, tmp_path_factory):
    check_missing_text_tower(ckpt, images, tmp_path_factory.mktemp("idefics_bare") / "tiny")


def test_without_resampler_cross_attention_keys_shrink(tmp_path, images):
    path = save_tiny_idefics(tmp_path / "no_resampler", use_resampler=False, with_text_tower=False)
    backend = load_backend(str(path), device="cpu")
    full = backend.answer(images, QUESTIONS, AtpConfig(enabled=False), max_new_tokens=3)
    assert full.generated_ids == backend.reference_generate(images, QUESTIONS, max_new_tokens=3)
    with ForwardInputs(keys=backend.model.model.gated_cross_attn_layers[0].cross_attn.k_proj) as rec:
        result = backend.answer(images, QUESTIONS, AtpConfig(keep_tokens=8), max_new_tokens=3)
    assert all(keys.shape[:2] == (3, 1 + 8) for keys in rec.seen["keys"])  # prefill and every decode step
    assert result.flops["projector"] == 0.0 and result.flops["llm_prefill"] < full.flops["llm_prefill"]
    with pytest.raises(ValueError, match="resampler"):
        backend.answer(images, QUESTIONS, AtpConfig(mass=0.5), max_new_tokens=1)


def test_bad_inputs_raise_model_load_error(tmp_path, ckpt):
    check_load_errors(tmp_path, ckpt)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_dtype_exact(ckpt, images):
    check_cuda_auto_dtype_exact(ckpt, images)
