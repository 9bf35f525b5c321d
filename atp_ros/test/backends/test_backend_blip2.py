"""What only BLIP-2 does: the Q-Former cross-attends to CLS + the kept patches only, and the open_clip
text tower. The contract every family keeps is checked in ``test_backend_contract.py``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("open_clip")

from atp_ros.backends import AtpConfig
from atp_ros.backends.openclip_tower import load_openclip_joint_space, save_openclip_tower
from atp_ros.testing.tiny.blip2 import TEXT_TOWER_SUBDIR
from backend_checks import MAX_NEW, QUESTIONS, Blip2Tester, Hooks, assert_cls_plus_kept, outputs_of


@pytest.fixture(scope="module")
def tester() -> Blip2Tester:
    return Blip2Tester()


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
    """Per-sample K pads the keys to 1 + max K and masks each sample's padding (each alone gives the
    same Q-Former output: the contract's batch-equals-singles check)."""
    with _KeyRecorder(backend.model) as rec:
        result = backend.answer(images, "where is the red box?", AtpConfig(mass=0.5), max_new_tokens=MAX_NEW)
    kept = result.visual_tokens_kept
    assert len(set(kept)) > 1, f"test needs different per-sample budgets, got {kept}"
    assert rec.inputs[0].shape[1] == 1 + max(kept)
    for i in range(len(rec.inputs)):  # every cross-attention layer
        assert rec.attended(i).tolist() == [1 + k for k in kept]


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
