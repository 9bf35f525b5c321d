"""What only IDEFICS does: the perceiver resampler reads CLS + the kept patches only (masked when
budgets differ), and checkpoints without a resampler. The contract every family keeps is checked in
``test_backend_contract.py``."""

from __future__ import annotations

import pytest
import torch
from atp_ros.backends import AtpConfig, load_backend
from atp_ros.backends.idefics import resample
from atp_ros.testing.tiny.idefics import save_tiny_idefics
from backend_checks import MAX_NEW, QUESTIONS, ForwardInputs, IdeficsTester, assert_cls_plus_kept, outputs_of

N_LATENTS = 4  # save_tiny_idefics' default


@pytest.fixture(scope="module")
def tester() -> IdeficsTester:
    return IdeficsTester()


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
