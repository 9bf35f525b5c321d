"""BLIP-2 backend on a tiny random checkpoint: exactness, Q-Former key pruning, text tower, errors.

The checkpoint (and its open_clip text tower) is built in-process, saved with
``save_pretrained`` and loaded back through ``atp_ros.backends.load_backend``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip")

from atp_ros.backends import AtpConfig, load_backend
from atp_ros.backends.blip2 import Blip2Backend
from atp_ros.backends.openclip_tower import load_openclip_joint_space, save_openclip_tower
from atp_ros.testing.tiny.blip2 import TEXT_TOWER_SUBDIR, save_tiny_blip2
from backend_checks import (
    MAX_NEW,
    QUESTIONS,
    Hooks,
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


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_blip2(tmp_path_factory.mktemp("blip2") / "tiny")


@pytest.fixture(scope="module")
def backend(ckpt) -> Blip2Backend:
    return load_backend(str(ckpt), device="cpu")


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return frames()


class _KeyRecorder(Hooks):
    """Forward hooks on every Q-Former cross-attention: the keys' input and the processed mask."""

    def __init__(self, model) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []
        self.masks: list[torch.Tensor | None] = []
        for layer in model.qformer.encoder.layer:
            if layer.has_cross_attention:
                attn = layer.crossattention.attention
                self.handles.append(attn.key.register_forward_hook(lambda _m, args, _o: self.inputs.append(args[0])))
                self.handles.append(attn.register_forward_hook(self._mask, with_kwargs=True))

    def _mask(self, _module, _args, kwargs, _out) -> None:
        self.masks.append(kwargs.get("encoder_attention_mask"))

    def attended(self, i: int = 0) -> torch.Tensor:
        """``(B,)`` keys each sample may attend to, from the processed mask of cross-attention ``i``."""
        mask = self.masks[i]
        if mask is None:
            return torch.full((self.inputs[i].shape[0],), self.inputs[i].shape[1])
        allowed = mask if mask.dtype == torch.bool else mask == 0  # bool (SDPA) or additive float
        return allowed[:, 0, 0].sum(dim=-1)  # (B, 1, Q or 1, M): the first query row


def test_loads_through_load_backend(backend):
    assert isinstance(backend, Blip2Backend)
    assert backend.family == "blip-2"
    assert backend.has_text_tower and backend.joint.vision_hidden == 32
    assert backend.grid == (8, 8) and backend.num_visual_tokens == 64
    assert backend.device.type == "cpu" and backend.dtype == torch.float32
    assert backend.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("atp", [AtpConfig(enabled=False), AtpConfig(keep_ratio=1.0)], ids=["disabled", "k_eq_n"])
def test_keep_all_matches_stock_generate(backend, images, atp):
    check_keep_all_matches_stock(backend, images, atp)


def test_qformer_sees_only_kept_keys(backend, images):
    k = 8
    vit = backend.model.vision_model
    with outputs_of(vit, lambda out: out.last_hidden_state) as states, _KeyRecorder(backend.model) as rec:
        result = backend.answer(images, QUESTIONS, AtpConfig(keep_tokens=k), max_new_tokens=MAX_NEW)
    assert rec.inputs, "the Q-Former never cross-attended"
    for keys in rec.inputs:  # every cross-attention layer, every decoding step is LLM-only
        assert keys.shape == (3, 1 + k, 32)
    assert_cls_plus_kept(rec.inputs[0], states[-1], result.selection)  # states: (B, 1+N, Dv)
    assert result.visual_tokens_kept == [k] * 3
    assert result.consumer_tokens == [k + 1] * 3  # Q-Former keys: CLS + K


def test_per_sample_budget_pads_and_masks_keys(backend, images):
    question = "where is the red box?"
    with outputs_of(backend.model.qformer, lambda out: out.last_hidden_state) as outputs:
        with _KeyRecorder(backend.model) as rec:
            result = backend.answer(images, question, AtpConfig(mass=0.5), max_new_tokens=MAX_NEW)
        kept = result.visual_tokens_kept
        assert rec.inputs[0].shape[1] == 1 + max(kept)
        assert rec.attended(0).tolist() == [1 + k for k in kept]
        # Each sample alone with its own K (no padding) gives the same Q-Former output.
        check_each_alone_matches_batch(backend, images, question, result, outputs)


@pytest.mark.parametrize("atp", [AtpConfig(keep_tokens=8), AtpConfig(keep_ratio=0.3), AtpConfig(mass=0.6)])
def test_mask_sum_equals_kept(backend, images, atp):
    check_mask_sum_equals_kept(backend, images, atp)


def test_result_timings_flops_and_text_cache(backend, images):
    pruned, full = check_pruned_result(backend, images)  # llm_prefill: always num_query_tokens tokens
    assert pruned.flops["pipeline"] < full.flops["pipeline"] + pruned.flops["scoring"]


def test_selectors_and_intra_signals(backend, images):
    text_only = backend.answer(images, QUESTIONS, AtpConfig(selector="text_only", keep_tokens=6), max_new_tokens=1)
    assert text_only.alpha_used == 1.0 and text_only.visual_tokens_kept == [6] * 3
    cls_only = backend.answer(images, QUESTIONS, AtpConfig(alpha=0.0, keep_tokens=6), max_new_tokens=1)
    assert cls_only.alpha_used == 0.0
    received = backend.answer(images, QUESTIONS, AtpConfig(intra_signal="received", keep_tokens=6), max_new_tokens=1)
    assert received.visual_tokens_kept == [6] * 3
    assert not torch.equal(received.selection.s_intra, cls_only.selection.s_intra)
    rand = backend.answer(images, QUESTIONS, AtpConfig(selector="random", keep_tokens=6), max_new_tokens=1)
    assert rand.selection.method == "random" and rand.alpha_used == 0.0
    with pytest.raises(ValueError):
        backend.answer(images, QUESTIONS, AtpConfig(intra_signal="bogus"), max_new_tokens=1)
    with pytest.raises(ValueError):
        backend.answer(images, QUESTIONS[:2], AtpConfig(), max_new_tokens=1)


def test_concurrent_calls_match_sequential(backend, images):
    check_concurrent_calls_match_sequential(backend, images)


def test_missing_text_tower_notes_and_cls_only(ckpt, images, tmp_path_factory):
    check_missing_text_tower(ckpt, images, tmp_path_factory.mktemp("blip2_bare") / "tiny")


def test_text_tower_matches_open_clip(backend, ckpt):
    import open_clip

    model = open_clip.create_model(f"local-dir:{ckpt / TEXT_TOWER_SUBDIR}", load_weights=False)
    open_clip.load_checkpoint(model, str(ckpt / TEXT_TOWER_SUBDIR / "open_clip_model.safetensors"))
    tokens = open_clip.get_tokenizer(f"local-dir:{ckpt / TEXT_TOWER_SUBDIR}")(["where is the red box?"])
    with torch.no_grad():
        torch.testing.assert_close(backend.joint.encode_text("where is the red box?"), model.encode_text(tokens)[0])
        states = torch.randn(2, 5, 32)
        expected = model.visual.ln_post(states) @ model.visual.proj  # open_clip's own per-token head
        torch.testing.assert_close(backend.joint.patches_to_joint(states), expected)


def test_openclip_timm_eva_head_matches_encode_image(tmp_path):
    """The real BLIP-2 tower (EVA01-g-14) is a timm EVA trunk: its per-token head must match open_clip."""
    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 224,
            "timm_model_name": "eva02_tiny_patch14_224",
            "timm_model_pretrained": False,
            "timm_pool": "token",
            "timm_proj": None,
        },  # EVA01-g-14's vision_cfg, tiny trunk
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        "custom_text": True,
    }
    torch.manual_seed(0)
    model = open_clip.model.CustomTextCLIP(**{k: v for k, v in cfg.items() if k != "custom_text"}).eval()
    joint = load_openclip_joint_space(str(save_openclip_tower(model, cfg, tmp_path / "eva")))
    states = {}

    def keep(_module, _args, out) -> None:
        states["last"] = out  # last block output, before the trunk's final norm

    handle = model.visual.trunk.blocks[-1].register_forward_hook(keep)
    with torch.no_grad():
        pooled = model.encode_image(torch.randn(2, 3, 224, 224))
    handle.remove()
    assert joint.vision_hidden == 192 and joint.embed_dim == 16
    torch.testing.assert_close(joint.patches_to_joint(states["last"])[:, 0], pooled, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_model_load_error(tmp_path, ckpt):
    check_load_errors(tmp_path, ckpt)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_dtype_exact(ckpt, images):
    backend = check_cuda_auto_dtype_exact(ckpt, images)
    assert backend.model.qformer.layernorm.weight.dtype == torch.float32  # BLIP-2 keeps the Q-Former in fp32


def test_dense_readout_request_is_noted_not_silent(backend, images):
    """The dense S_inter read-outs are LLaVA-only: BLIP-2 reads out naively and says so."""
    res = backend.answer(images[:1], "where is the red box?", AtpConfig(alpha=0.5, inter_readout="maskclip"))
    assert any("inter_readout 'maskclip'" in n for n in res.notes)
    assert not backend.answer(images[:1], "where is the red box?", AtpConfig(alpha=0.5)).notes
    with pytest.raises(ValueError, match="inter_readout"):
        backend.answer(images[:1], "where is the red box?", AtpConfig(inter_readout="magic"))
