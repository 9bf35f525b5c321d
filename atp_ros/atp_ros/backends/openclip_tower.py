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

Only safetensors weights are ever read, from local directories and from the hub alike: the model
is built without weights and then given the safetensors file (a source published only as a pickle,
``*.bin`` / ``*.pt``, is refused: :class:`atp_ros.backends.errors.ModelLoadError`). Hub files go through
the Hugging Face cache (offline works once cached).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from atp_ros.backends.errors import ModelLoadError
from atp_ros.backends.loading import require_safetensors
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


def _build(name: str, weights: Path) -> nn.Module:
    """The open_clip model ``name`` built without weights, then given the safetensors file ``weights``."""
    import open_clip

    if weights.suffix != ".safetensors":  # open_clip.load_checkpoint would torch.load (unpickle) anything else
        raise ModelLoadError(f"{weights}: not a safetensors file (pickle files are never loaded)")
    # pretrained_text/_image=False: no tower weights fetched on the side (an HF text tower's own
    # pytorch_model.bin). open_clip logs "initialized randomly" for the empty build; false here.
    with _quiet_root_log("No pretrained weights loaded"):
        model = open_clip.create_model(name, load_weights=False, pretrained_text=False, pretrained_image=False)
    open_clip.load_checkpoint(model, str(weights))
    return model


def hub_weight_candidates(filename: str = "") -> list[str]:
    """Safetensors names to look for in an open_clip hub repository whose pickle weights are ``filename``.

    ``""`` is open_clip's default ``open_clip_pytorch_model.bin``, published in safetensors as
    ``open_clip_model.safetensors``; ``foo.bin`` / ``foo.pth`` -> ``foo.safetensors`` first.
    """
    names = [filename] if filename.endswith(".safetensors") else []
    if filename.endswith((".bin", ".pth")) and filename != "open_clip_pytorch_model.bin":
        names.append(filename.rsplit(".", 1)[0] + ".safetensors")
    names.append(OPENCLIP_WEIGHTS)
    return list(dict.fromkeys(names))


def _hub_weights(repo_id: str, filename: str = "") -> Path:
    """The first safetensors weights of ``repo_id`` found (downloaded, or in the HF cache)."""
    from huggingface_hub import hf_hub_download

    names = hub_weight_candidates(filename)
    for name in names:
        try:
            return Path(hf_hub_download(repo_id, name))
        except Exception:  # not in the repository / not cached offline: the next name
            continue
    raise ModelLoadError(
        f"hf-hub:{repo_id} has no safetensors weights ({' or '.join(names)} neither cached nor downloadable); "
        "convert it to safetensors once where you trust its origin (pickle files are never loaded)"
    )


def _create(source: str) -> tuple[nn.Module, object]:
    import open_clip

    path = Path(source)
    if path.is_dir():
        require_safetensors(path)
        weights = path / OPENCLIP_WEIGHTS
        if not (path / OPENCLIP_CONFIG).is_file() or not weights.is_file():
            raise FileNotFoundError(f"{source}: expected {OPENCLIP_CONFIG} and {OPENCLIP_WEIGHTS}")
        name = f"local-dir:{path}"
        return _build(name, weights), open_clip.get_tokenizer(name)
    if source.startswith("hf-hub:"):
        from huggingface_hub import hf_hub_download

        repo_id = source.removeprefix("hf-hub:")
        weights = _hub_weights(repo_id)
        # The config beside the weights in the cache's snapshot folder: then it builds like a local dir.
        config = Path(hf_hub_download(repo_id, OPENCLIP_CONFIG))
        name = f"local-dir:{config.parent}"
        if weights.parent != config.parent:
            raise ModelLoadError(f"{source}: {weights.name} and {OPENCLIP_CONFIG} are from different revisions")
        return _build(name, weights), open_clip.get_tokenizer(name)
    name, _, tag = source.partition(":")
    cfg = open_clip.get_pretrained_cfg(name, tag) if tag else {}
    if not cfg.get("hf_hub"):
        known = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ModelLoadError(f"{source}: not an open_clip name:tag with hub weights (tags of {name}: {known})")
    repo_id, filename = cfg["hf_hub"].rstrip("/"), ""
    if not cfg["hf_hub"].endswith("/"):  # 'org/repo/file.bin': a file named by the tag
        repo_id, _, filename = cfg["hf_hub"].rpartition("/")
    return _build(name, _hub_weights(repo_id, filename)), open_clip.get_tokenizer(name)


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
    "hub_weight_candidates",
    "load_openclip_joint_space",
    "save_openclip_tower",
    "visual_patch_head",
]
