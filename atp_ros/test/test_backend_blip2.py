"""BLIP-2 backend on a tiny random checkpoint: exactness, Q-Former key pruning, text tower, errors.

The checkpoint (and its open_clip text tower) is built in-process, saved with
``save_pretrained`` and loaded back through ``atp_ros.backends.load_backend``.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip")

from atp_ros.backends import AtpConfig, ModelLoadError, load_backend
from atp_ros.backends.blip2 import Blip2Backend
from atp_ros.backends.openclip_tower import load_openclip_joint_space, save_openclip_tower
from atp_ros.tiny.blip2 import TEXT_TOWER_SUBDIR, save_tiny_blip2

MAX_NEW = 5
QUESTIONS = ["where is the red box?", "how many pallets are on the shelf?", "is the aisle empty?"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_blip2(tmp_path_factory.mktemp("blip2") / "tiny")


@pytest.fixture(scope="module")
def backend(ckpt) -> Blip2Backend:
    return load_backend(str(ckpt), device="cpu")


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    # Different frame sizes: the processor resizes every frame to the tower's 32 px.
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 50), (32, 32), (64, 48))]


class _KeyRecorder:
    """Forward hooks on every Q-Former cross-attention: the keys' input and the processed mask."""

    def __init__(self, model) -> None:
        self.inputs: list[torch.Tensor] = []
        self.masks: list[torch.Tensor | None] = []
        self.handles = []
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

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def test_loads_through_load_backend(backend):
    assert isinstance(backend, Blip2Backend)
    assert backend.family == "blip-2"
    assert backend.has_text_tower and backend.joint.vision_hidden == 32
    assert backend.grid == (8, 8) and backend.num_visual_tokens == 64
    assert backend.device.type == "cpu" and backend.dtype == torch.float32
    assert backend.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("atp", [AtpConfig(enabled=False), AtpConfig(keep_ratio=1.0)], ids=["disabled", "k_eq_n"])
def test_keep_all_matches_stock_generate(backend, images, atp):
    reference = backend.reference_generate(images, QUESTIONS, max_new_tokens=MAX_NEW)
    result = backend.answer(images, QUESTIONS, atp, max_new_tokens=MAX_NEW)
    assert result.generated_ids == reference
    assert result.visual_tokens_kept == [64, 64, 64]
    assert all(len(ids) >= 1 for ids in reference)


def test_qformer_sees_only_kept_keys(backend, images):
    k = 8
    captured = {}

    def keep_vit(_module, _args, out) -> None:  # returns None: the output is not replaced
        captured["vit"] = out.last_hidden_state

    handle = backend.model.vision_model.register_forward_hook(keep_vit)
    try:
        with _KeyRecorder(backend.model) as rec:
            result = backend.answer(images, QUESTIONS, AtpConfig(keep_tokens=k), max_new_tokens=MAX_NEW)
    finally:
        handle.remove()
    assert rec.inputs, "the Q-Former never cross-attended"
    vit = captured["vit"]  # (B, 1+N, Dv)
    for keys in rec.inputs:  # every cross-attention layer, every decoding step is LLM-only
        assert keys.shape == (3, 1 + k, 32)
    for b in range(3):
        expected = torch.cat([vit[b, :1], vit[b, 1 + result.selection.kept(b)]])  # CLS + selected patches
        torch.testing.assert_close(rec.inputs[0][b], expected)
    assert result.visual_tokens_kept == [k] * 3
    assert result.selection.extras["qformer_keys"] == [k + 1] * 3


def test_per_sample_budget_pads_and_masks_keys(backend, images):
    atp = AtpConfig(mass=0.5)
    outputs: list[torch.Tensor] = []

    def keep_output(_module, _args, out) -> None:
        outputs.append(out.last_hidden_state)

    handle = backend.model.qformer.register_forward_hook(keep_output)
    try:
        with _KeyRecorder(backend.model) as rec:
            result = backend.answer(images, "where is the red box?", atp, max_new_tokens=MAX_NEW)
        kept = result.visual_tokens_kept
        assert len(set(kept)) > 1, f"test needs different per-sample budgets, got {kept}"
        assert rec.inputs[0].shape[1] == 1 + max(kept)
        assert rec.attended(0).tolist() == [1 + k for k in kept]
        # Each sample alone with its own K (no padding) gives the same Q-Former output.
        for b, k in enumerate(kept):
            single = backend.answer([images[b]], "where is the red box?", AtpConfig(keep_tokens=k), max_new_tokens=1)
            assert torch.equal(single.selection.kept(0), result.selection.kept(b))
            torch.testing.assert_close(outputs[-1][0], outputs[0][b], atol=1e-5, rtol=1e-5)
    finally:
        handle.remove()


@pytest.mark.parametrize("atp", [AtpConfig(keep_tokens=8), AtpConfig(keep_ratio=0.3), AtpConfig(mass=0.6)])
def test_mask_sum_equals_kept(backend, images, atp):
    result = backend.answer(images, QUESTIONS, atp, max_new_tokens=2)
    assert result.visual_tokens_total == 64 and result.grid == (8, 8)
    for b in range(3):
        mask = result.keep_mask(b)
        assert mask.shape == (8, 8) and mask.dtype == np.uint8
        assert int(mask.sum()) == result.visual_tokens_kept[b] == int(result.selection.lengths[b])


def test_result_timings_flops_and_text_cache(backend, images):
    pruned = backend.answer(images, QUESTIONS, AtpConfig(keep_tokens=8), max_new_tokens=MAX_NEW)
    full = backend.answer(images, QUESTIONS, AtpConfig(enabled=False), max_new_tokens=MAX_NEW)
    assert pruned.alpha_used == 0.5 and pruned.notes == []
    assert pruned.selection.s_inter is not None and pruned.selection.s_intra is not None
    assert len(pruned.answers) == 3 and all(isinstance(a, str) for a in pruned.answers)
    assert pruned.text_tokens == full.text_tokens and all(t > 0 for t in pruned.text_tokens)
    for stage in ("preprocess", "vision", "scoring", "projector", "prefill", "decode"):
        assert getattr(pruned.timings, stage) > 0, stage
    f, g = pruned.flops, full.flops
    assert f["projector"] < f["projector_keep_all"] == g["projector"]
    assert f["llm_prefill"] == g["llm_prefill"]  # the LLM always gets num_query_tokens tokens
    assert f["pipeline"] == pytest.approx(f["vision"] + f["scoring"] + f["projector"] + f["llm_prefill"])
    assert f["pipeline"] < g["pipeline"] + f["scoring"]
    misses = backend.text_cache.misses
    backend.answer(images, QUESTIONS, AtpConfig(keep_tokens=8), max_new_tokens=1)
    assert backend.text_cache.misses == misses  # same questions: the text tower did not run again


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


def test_missing_text_tower_notes_and_cls_only(ckpt, images, tmp_path_factory):
    bare = tmp_path_factory.mktemp("blip2_bare") / "tiny"
    shutil.copytree(ckpt, bare, ignore=shutil.ignore_patterns(TEXT_TOWER_SUBDIR))
    backend = load_backend(str(bare), device="cpu")
    assert not backend.has_text_tower
    result = backend.answer(images, QUESTIONS, AtpConfig(alpha=0.5, keep_tokens=8), max_new_tokens=2)
    assert result.alpha_used == 0.0
    assert len(result.notes) == 1 and "CLS-only" in result.notes[0]
    assert result.selection.s_inter is None and result.visual_tokens_kept == [8] * 3
    # An explicit text tower overrides the (missing) bundled one.
    with_tower = load_backend(str(bare), text_encoder_id=str(ckpt / TEXT_TOWER_SUBDIR), device="cpu")
    assert with_tower.has_text_tower
    assert with_tower.answer(images, QUESTIONS, AtpConfig(keep_tokens=8), max_new_tokens=1).notes == []


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
    with pytest.raises(ModelLoadError):
        load_backend(str(tmp_path / "does_not_exist"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError):
        load_backend(str(empty))
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
    assert backend.model.qformer.layernorm.weight.dtype == torch.float32  # BLIP-2 keeps the Q-Former in fp32
    reference = backend.reference_generate(images, QUESTIONS, max_new_tokens=MAX_NEW)
    disabled = backend.answer(images, QUESTIONS, AtpConfig(enabled=False), max_new_tokens=MAX_NEW)
    assert disabled.generated_ids == reference
    result = backend.answer(images, QUESTIONS, AtpConfig(mass=0.5), max_new_tokens=MAX_NEW)
    assert all(int(result.keep_mask(b).sum()) == k for b, k in enumerate(result.visual_tokens_kept))
    assert result.timings.prefill > 0 and result.timings.decode > 0
