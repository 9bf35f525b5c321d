"""An open_clip model as ATP's joint image-text space: its text tower plus its visual head per patch.

BLIP-2's ViT-g is EVA-CLIP's visual tower (EVA01-CLIP-g/14), whose text side lives only
in open_clip (``EVA01-g-14``). :class:`OpenClipJointSpace` keeps that model's text
tower and the visual *head* -- the final norm and the projection into the joint space --
and drops the visual trunk (about 1B parameters for ViT-g that the VLM already runs). It
implements :class:`atp_ros.backends.text_towers.JointSpace`, like the HF CLIP/SigLIP spaces.

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
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from atp_ros.backends.text_towers import JointSpace

OPENCLIP_CONFIG = "open_clip_config.json"
OPENCLIP_WEIGHTS = "open_clip_model.safetensors"


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


class OpenClipJointSpace(JointSpace):
    """Text tower + per-patch visual head of one open_clip model (a :class:`JointSpace`).

    ``encode_text(str) -> (E,)`` and ``patches_to_joint((B, N, D)) -> (B, N, E)``, both float32;
    ``vision_hidden`` is the visual width D the head expects, ``embed_dim`` the joint width E.
    Patch states are the raw residual stream *before* the tower's final norm (the head applies it).
    """

    kind = "open_clip"

    def __init__(
        self,
        model_id: str,
        model: nn.Module,
        tokenizer,
        patch_head: nn.Sequential,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        first = patch_head[0]
        width = int(first.normalized_shape[0] if hasattr(first, "normalized_shape") else first.in_features)
        with torch.no_grad():
            embed_dim = int(patch_head(torch.zeros(1, 1, width)).shape[-1])
        super().__init__(model_id, tokenizer, device, dtype, width, embed_dim)
        self.model = model.to(device, dtype).eval().requires_grad_(False)  # visual trunk already removed
        self.patch_head = patch_head.to(device, dtype).eval().requires_grad_(False)

    @torch.inference_mode()
    def encode_text(self, text: str) -> Tensor:
        tokens = self.tokenizer([text]).to(self.device)  # (1, context_length)
        return self.model.encode_text(tokens)[0].float()  # (E,)

    @torch.inference_mode()
    def patches_to_joint(self, states: Tensor) -> Tensor:
        return self.patch_head(self._check_states(states)).float()  # (B, N, E)


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


@contextmanager
def _quiet_root_log(prefix: str) -> Iterator[None]:
    """Drop root-logger records starting with ``prefix`` while the block runs."""

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith(prefix)

    flt = _Drop()
    logging.getLogger().addFilter(flt)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(flt)


def _create(source: str) -> tuple[nn.Module, object]:
    import open_clip

    path = Path(source)
    if path.is_dir():
        weights = path / OPENCLIP_WEIGHTS
        if not (path / OPENCLIP_CONFIG).is_file() or not weights.is_file():
            raise FileNotFoundError(f"{source}: expected {OPENCLIP_CONFIG} and {OPENCLIP_WEIGHTS}")
        name = f"local-dir:{path}"
        # Build without weights, then read only the safetensors file (never a pickle). open_clip
        # logs "initialized randomly" for the empty build; that line would be false here.
        with _quiet_root_log("No pretrained weights loaded"):
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
    return OpenClipJointSpace(source, model, tokenizer, head, torch.device(device), dtype)


__all__ = [
    "OPENCLIP_CONFIG",
    "OPENCLIP_WEIGHTS",
    "OpenClipJointSpace",
    "load_openclip_joint_space",
    "save_openclip_tower",
    "visual_patch_head",
]
