"""IDEFICS backend on a tiny random checkpoint: exactness, resampler key pruning, text tower, errors.

The checkpoint (and its CLIP text tower) is built in-process, saved with ``save_pretrained``
and loaded back through ``atp_ros.backends.load_backend``.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from atp_ros.backends import AtpConfig, ModelLoadError, load_backend
from atp_ros.backends.idefics import IdeficsBackend, resample
from atp_ros.tiny.idefics import TEXT_TOWER_SUBDIR, save_tiny_idefics

MAX_NEW = 5
N_LATENTS = 4
QUESTIONS = ["where is the red box?", "how many pallets are on the shelf?", "is the aisle empty?"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_idefics(tmp_path_factory.mktemp("idefics") / "tiny", n_latents=N_LATENTS)


@pytest.fixture(scope="module")
def backend(ckpt) -> IdeficsBackend:
    return load_backend(str(ckpt), device="cpu")


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 50), (32, 32), (64, 48))]


class _Inputs:
    """Forward hooks keeping the first positional input of each hooked module."""

    def __init__(self, **modules) -> None:
        self.seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        self.handles = [m.register_forward_hook(self._keep(name)) for name, m in modules.items()]

    def _keep(self, name: str):
        def hook(_module, args, _out) -> None:
            self.seen[name].append(args[0])

        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def test_loads_through_load_backend(backend):
    assert isinstance(backend, IdeficsBackend)
    assert backend.family == "idefics"
    assert backend.has_text_tower and backend.joint.kind == "clip" and backend.joint.vision_hidden == 32
    assert backend.grid == (8, 8) and backend.num_visual_tokens == 64
    assert backend.device.type == "cpu" and backend.dtype == torch.float32
    assert backend.model.config._attn_implementation == "sdpa" and backend.model.config.use_resampler


@pytest.mark.parametrize("atp", [AtpConfig(enabled=False), AtpConfig(keep_ratio=1.0)], ids=["disabled", "k_eq_n"])
def test_keep_all_matches_stock_generate(backend, images, atp):
    reference = backend.reference_generate(images, QUESTIONS, max_new_tokens=MAX_NEW)
    result = backend.answer(images, QUESTIONS, atp, max_new_tokens=MAX_NEW)
    assert result.generated_ids == reference
    assert result.visual_tokens_kept == [64, 64, 64]


def test_resampler_sees_only_kept_tokens(backend, images):
    k = 8
    inner = backend.model.model
    first_block = inner.perceiver_resampler.blocks[0][0]
    with _Inputs(
        vit=inner.vision_model.post_layernorm,  # pooled CLS only; counts ViT passes
        context=first_block.context_layer_norm,
        cross_keys=inner.gated_cross_attn_layers[0].cross_attn.k_proj,
    ) as rec:
        captured = {}

        def keep_vit(_module, _args, out) -> None:
            captured["states"] = out.last_hidden_state

        handle = inner.vision_model.register_forward_hook(keep_vit)
        try:
            result = backend.answer(images, QUESTIONS, AtpConfig(keep_tokens=k), max_new_tokens=MAX_NEW)
        finally:
            handle.remove()
    assert len(rec.seen["vit"]) == 1  # generate reuses the resampled latents; the ViT ran once
    (context,) = rec.seen["context"]  # resampler ran once, on CLS + K patches per image
    assert context.shape == (3, 1 + k, 32)
    states = captured["states"]  # (B, 1+N, D)
    for b in range(3):
        torch.testing.assert_close(context[b], torch.cat([states[b, :1], states[b, 1 + result.selection.kept(b)]]))
    # The LLM's gated cross-attention reads n_latents keys whatever K is (the honest part).
    assert all(keys.shape[:2] == (3, N_LATENTS) for keys in rec.seen["cross_keys"])
    assert result.selection.extras["resampler_context"] == [k + 1] * 3


def test_per_sample_budget_masks_padded_context(backend, images):
    latents: list[torch.Tensor] = []

    def keep(_module, _args, out) -> None:
        latents.append(out)

    handle = backend.model.model.perceiver_resampler.layer_norm.register_forward_hook(keep)
    try:
        result = backend.answer(images, "where is the red box?", AtpConfig(mass=0.5), max_new_tokens=MAX_NEW)
        kept = result.visual_tokens_kept
        assert len(set(kept)) > 1, f"test needs different per-sample budgets, got {kept}"
        # Each image alone with its own K (no padding, stock resampler) gives the same latents.
        for b, k in enumerate(kept):
            single = backend.answer([images[b]], "where is the red box?", AtpConfig(keep_tokens=k), max_new_tokens=1)
            assert torch.equal(single.selection.kept(0), result.selection.kept(b))
            torch.testing.assert_close(latents[-1][0], latents[0][b], atol=1e-5, rtol=1e-5)
    finally:
        handle.remove()


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
    result = backend.answer(images, QUESTIONS, atp, max_new_tokens=2)
    assert result.visual_tokens_total == 64 and result.grid == (8, 8)
    for b in range(3):
        assert int(result.keep_mask(b).sum()) == result.visual_tokens_kept[b] == int(result.selection.lengths[b])


def test_result_timings_flops_and_text_cache(backend, images):
    pruned = backend.answer(images, QUESTIONS, AtpConfig(keep_tokens=8), max_new_tokens=MAX_NEW)
    full = backend.answer(images, QUESTIONS, AtpConfig(enabled=False), max_new_tokens=MAX_NEW)
    assert pruned.alpha_used == 0.5 and pruned.notes == []
    assert pruned.selection.s_inter is not None
    assert pruned.text_tokens == full.text_tokens and all(t > 0 for t in pruned.text_tokens)
    for stage in ("preprocess", "vision", "scoring", "projector", "prefill", "decode"):
        assert getattr(pruned.timings, stage) > 0, stage
    f, g = pruned.flops, full.flops
    assert f["projector"] < f["projector_keep_all"] == g["projector"]
    assert f["llm_prefill"] == g["llm_prefill"]  # the LLM reads n_latents latents whatever K is
    assert f["pipeline"] == pytest.approx(f["vision"] + f["scoring"] + f["projector"] + f["llm_prefill"])
    misses = backend.text_cache.misses
    backend.answer(images, QUESTIONS, AtpConfig(keep_tokens=8), max_new_tokens=1)
    assert backend.text_cache.misses == misses
    received = backend.answer(images, QUESTIONS, AtpConfig(intra_signal="received", keep_tokens=6), max_new_tokens=1)
    assert received.visual_tokens_kept == [6] * 3


def test_missing_text_tower_notes_and_cls_only(ckpt, images, tmp_path_factory):
    bare = tmp_path_factory.mktemp("idefics_bare") / "tiny"
    shutil.copytree(ckpt, bare, ignore=shutil.ignore_patterns(TEXT_TOWER_SUBDIR))
    backend = load_backend(str(bare), device="cpu")
    assert not backend.has_text_tower
    result = backend.answer(images, QUESTIONS, AtpConfig(alpha=0.5, keep_tokens=8), max_new_tokens=2)
    assert result.alpha_used == 0.0
    assert len(result.notes) == 1 and "CLS-only" in result.notes[0]
    assert result.selection.s_inter is None and result.visual_tokens_kept == [8] * 3
    with_tower = load_backend(str(bare), text_encoder_id=str(ckpt / TEXT_TOWER_SUBDIR), device="cpu")
    assert with_tower.has_text_tower


def test_without_resampler_cross_attention_keys_shrink(tmp_path, images):
    path = save_tiny_idefics(tmp_path / "no_resampler", use_resampler=False, with_text_tower=False)
    backend = load_backend(str(path), device="cpu")
    full = backend.answer(images, QUESTIONS, AtpConfig(enabled=False), max_new_tokens=3)
    assert full.generated_ids == backend.reference_generate(images, QUESTIONS, max_new_tokens=3)
    with _Inputs(keys=backend.model.model.gated_cross_attn_layers[0].cross_attn.k_proj) as rec:
        result = backend.answer(images, QUESTIONS, AtpConfig(keep_tokens=8), max_new_tokens=3)
    assert all(keys.shape[:2] == (3, 1 + 8) for keys in rec.seen["keys"])  # prefill and every decode step
    assert result.flops["projector"] == 0.0 and result.flops["llm_prefill"] < full.flops["llm_prefill"]
    with pytest.raises(ValueError, match="resampler"):
        backend.answer(images, QUESTIONS, AtpConfig(mass=0.5), max_new_tokens=1)


def test_bad_inputs_raise_model_load_error(tmp_path, ckpt):
    with pytest.raises(ModelLoadError):
        load_backend(str(tmp_path / "does_not_exist"))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(ckpt / "config.json", no_weights / "config.json")
    with pytest.raises(ModelLoadError):
        load_backend(str(no_weights))
    with pytest.raises(ModelLoadError, match="text tower"):
        load_backend(str(ckpt), text_encoder_id=str(tmp_path / "no_tower_here"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_dtype_exact(ckpt, images):
    backend = load_backend(str(ckpt))  # auto: CUDA, bf16 (or fp16)
    assert backend.device.type == "cuda" and backend.dtype in (torch.bfloat16, torch.float16)
    reference = backend.reference_generate(images, QUESTIONS, max_new_tokens=MAX_NEW)
    disabled = backend.answer(images, QUESTIONS, AtpConfig(enabled=False), max_new_tokens=MAX_NEW)
    assert disabled.generated_ids == reference
    result = backend.answer(images, QUESTIONS, AtpConfig(mass=0.5), max_new_tokens=MAX_NEW)
    assert all(int(result.keep_mask(b).sum()) == k for b, k in enumerate(result.visual_tokens_kept))
    assert result.timings.prefill > 0 and result.timings.decode > 0
