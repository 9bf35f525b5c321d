"""An open_clip model as ATP's joint image-text space: its text tower plus its visual head per patch.

BLIP-2's ViT-g is EVA-CLIP's visual tower (EVA01-CLIP-g/14), whose text side lives only
in open_clip (``EVA01-g-14``). :class:`OpenClipJointSpace` keeps that model's text
tower and the visual *head* -- the final norm and the projection into the joint space --
and drops the visual trunk (about 1B parameters for ViT-g that the VLM already runs).

Sources (``load_openclip_joint_space``):

* a local directory in open_clip's hub layout: ``open_clip_config.json`` (``{"model_cfg":
  ...}``) and ``open_clip_model.safetensors`` (what :func:`save_openclip_tower` writes;
  the ``<model_dir>/atp_text_tower`` convention);
* ``hf-hub:<org>/<repo>`` in that same layout;
* ``<open_clip model name>:<pretrained tag>``, e.g. ``EVA01-g-14:laion400m_s11b_b41k``.

Only safetensors weights are read from local directories. Hub sources go through
open_clip's own download cache (offline works once cached).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

OPENCLIP_CONFIG = "open_clip_config.json"
OPENCLIP_WEIGHTS = "open_clip_model.safetensors"
# BLIP-2 (all Salesforce/blip2-* checkpoints) froze EVA01-CLIP-g/14 trained on LAION-400M.
EVA01_G14 = "EVA01-g-14:laion400m_s11b_b41k"


class _MatmulProjection(nn.Module):
    """``x @ proj`` for open_clip's native towers, whose projection is a bare parameter."""

    def __init__(self, proj: nn.Parameter) -> None:
        super().__init__()
        self.proj = proj  # (width, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.proj


def visual_patch_head(visual: nn.Module) -> nn.Sequential:
    """The modules an open_clip visual tower applies after its blocks, usable per token.

    Native ``VisionTransformer``: ``ln_post`` then ``@ proj``. timm trunks (the EVA models):
    ``trunk.norm``, ``trunk.fc_norm``, ``trunk.head`` and the adapter's ``head``. Towers whose
    pooling mixes tokens (attention pooling) have no per-token head: ValueError.
    """
    if hasattr(visual, "trunk"):  # open_clip.timm_model.TimmModel
        trunk = visual.trunk
        if isinstance(visual.head, nn.Sequential) and "pool" in dict(visual.head.named_children()):
            raise ValueError("open_clip timm tower with attention pooling has no per-patch projection")
        parts = [getattr(trunk, name, None) for name in ("norm", "fc_norm", "head")]
        return nn.Sequential(*[p for p in parts if p is not None], visual.head)
    if hasattr(visual, "ln_post") and hasattr(visual, "proj"):  # open_clip.transformer.VisionTransformer
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError("open_clip VisionTransformer with attentional pooling has no per-patch projection")
        parts = [visual.ln_post]
        if visual.proj is not None:
            parts.append(_MatmulProjection(visual.proj))
        return nn.Sequential(*parts)
    raise ValueError(f"unsupported open_clip visual tower {type(visual).__name__}")


class OpenClipJointSpace(nn.Module):
    """Text tower + per-patch visual head of one open_clip model.

    ``encode_text(str) -> (E,)`` and ``project_patches((B, N, width)) -> (B, N, E)`` are the
    two calls a backend needs for ``S_inter``; both return float32.
    """

    def __init__(self, model: nn.Module, tokenizer, patch_head: nn.Sequential, source: str) -> None:
        super().__init__()
        self.model = model  # the open_clip model with its visual trunk removed
        self.tokenizer = tokenizer
        self.patch_head = patch_head
        self.source = source

    @property
    def device(self) -> torch.device:
        return next(self.patch_head.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.patch_head.parameters()).dtype

    @torch.inference_mode()
    def encode_text(self, text: str) -> Tensor:
        """Joint-space embedding ``(E,)`` of one query (float32, unnormalized)."""
        tokens = self.tokenizer([text]).to(self.device)  # (1, context_length)
        return self.model.encode_text(tokens)[0].float()

    @torch.inference_mode()
    def project_patches(self, states: Tensor) -> Tensor:
        """``(B, N, width)`` visual token states -> ``(B, N, E)`` joint-space embeddings (float32)."""
        return self.patch_head(states.to(self.device, self.dtype)).float()


def save_openclip_tower(model: nn.Module, model_cfg: dict, directory: str | Path) -> Path:
    """Write ``model`` in open_clip's hub layout (config json + safetensors) under ``directory``."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / OPENCLIP_CONFIG).write_text(json.dumps({"model_cfg": model_cfg}, indent=2))
    # Tied/shared tensors are cloned so safetensors accepts them.
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / OPENCLIP_WEIGHTS))
    return out


def _create(source: str) -> tuple[nn.Module, object]:
    import open_clip

    path = Path(source)
    if path.is_dir():
        weights = path / OPENCLIP_WEIGHTS
        if not (path / OPENCLIP_CONFIG).is_file() or not weights.is_file():
            raise FileNotFoundError(f"{source}: expected {OPENCLIP_CONFIG} and {OPENCLIP_WEIGHTS}")
        name = f"local-dir:{path}"
        # Build without weights, then read only the safetensors file (never a pickle).
        model = open_clip.create_model(name, load_weights=False)
        open_clip.load_checkpoint(model, str(weights))
        return model, open_clip.get_tokenizer(name)
    if source.startswith("hf-hub:"):
        return open_clip.create_model(source), open_clip.get_tokenizer(source)
    name, _, tag = source.partition(":")
    return open_clip.create_model(name, pretrained=tag or None), open_clip.get_tokenizer(name)


def load_openclip_joint_space(
    source: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> OpenClipJointSpace:
    """Load an open_clip model from ``source`` (see module doc) as an :class:`OpenClipJointSpace`."""
    model, tokenizer = _create(source)
    head = visual_patch_head(model.visual)
    model.visual = nn.Identity()  # the VLM runs its own copy of this trunk; keep only the head
    joint = OpenClipJointSpace(model, tokenizer, head, source)
    return joint.to(device=device, dtype=dtype).eval().requires_grad_(False)


__all__ = [
    "EVA01_G14",
    "OPENCLIP_CONFIG",
    "OPENCLIP_WEIGHTS",
    "OpenClipJointSpace",
    "load_openclip_joint_space",
    "save_openclip_tower",
    "visual_patch_head",
]
