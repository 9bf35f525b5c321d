"""Loading shared by the backends: the HF checkpoint and processor, and the joint-space text tower.

Every backend loads the same way: safetensors only (a local checkpoint with only pickle weights
is refused before anything is read: :func:`require_safetensors`), no remote code
(``trust_remote_code=False``: a config's ``auto_map`` is ignored and the stock transformers class
is used), SDPA attention, offline from a local directory, frozen and in eval mode. The text
tower for ``S_inter`` is looked up in one order (:func:`find_text_tower`) and loaded by
:func:`load_text_tower`, which decides when a missing tower is an error and when it leaves the
backend CLS-only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from atp_ros.backends.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from atp_ros.backends.text_towers import JointSpace

TEXT_TOWER_SUBDIR = "atp_text_tower"  # <model_dir>/atp_text_tower: the matching joint-space text tower

# Published VLM -> the contrastive checkpoint its vision tower was taken from (the text side of S_inter).
# BLIP-2's ViT-g is EVA01-CLIP-g/14 minus its last block; IDEFICS froze OpenCLIP ViT-H/14.
EVA01_G14 = "EVA01-g-14:laion400m_s11b_b41k"  # an open_clip name:tag (see openclip_tower)
CLIP_VIT_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
KNOWN_TEXT_TOWERS: dict[str, str] = {
    "llava-hf/llava-1.5-7b-hf": "openai/clip-vit-large-patch14-336",
    "llava-hf/llava-1.5-13b-hf": "openai/clip-vit-large-patch14-336",
    "llava-hf/llava-interleave-qwen-0.5b-hf": "google/siglip-so400m-patch14-384",
    "llava-hf/llava-interleave-qwen-7b-hf": "google/siglip-so400m-patch14-384",
    "Salesforce/blip2-opt-2.7b": EVA01_G14,
    "Salesforce/blip2-opt-6.7b": EVA01_G14,
    "Salesforce/blip2-flan-t5-xl": EVA01_G14,
    "Salesforce/blip2-flan-t5-xxl": EVA01_G14,
    "HuggingFaceM4/idefics-9b": CLIP_VIT_H14,
    "HuggingFaceM4/idefics-9b-instruct": CLIP_VIT_H14,
    "HuggingFaceM4/idefics-80b": CLIP_VIT_H14,
    "HuggingFaceM4/idefics-80b-instruct": CLIP_VIT_H14,
}


# Weight files that are Python pickles (torch.save, numpy, joblib): loading one can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".npy", ".npz", ".joblib")


def require_safetensors(model_id: str | Path) -> None:
    """Refuse a local checkpoint directory whose weights exist only as pickle files.

    :class:`ModelLoadError` with one line naming the directory and what to do; nothing is read.
    Directories with ``*.safetensors`` pass (pickles beside them are ignored by every loader here),
    and so do hub ids and directories without weights (the loader reports those itself).
    """
    path = Path(model_id)
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in path.iterdir() if f.is_file() and f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{model_id} has no safetensors weights (only {', '.join(pickles)}); convert it to safetensors "
            "once, on a machine where you trust its origin (load it, then save_pretrained(...), which writes "
            "model.safetensors) (pickle files are never loaded)"
        )


def checkpoint_name(model_id: str) -> str:
    """The published name a checkpoint is recognised by: a hub id as it is, a local directory by
    its last two path parts (``/models/llava-hf/llava-1.5-7b-hf`` -> ``llava-hf/llava-1.5-7b-hf``).

    The one rule for anything decided by which checkpoint this is (its text tower, its prompt style).
    """
    path = Path(model_id)
    if not path.is_dir():
        return model_id
    parts = path.resolve().parts
    return "/".join(parts[-2:])


def release_cuda_cache() -> None:
    """Hand cached CUDA blocks back to the driver (after a failed step or a released model); no-op on CPU."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; anything else is passed to torch."""
    if device in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA with bf16 support, float16 on other CUDA, float32 on CPU."""
    if dtype in ("", "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def load_checkpoint(
    model_cls: type[PreTrainedModel], model_id: str, device: str = "auto", dtype: str = "auto"
) -> tuple[PreTrainedModel, Any, torch.device, torch.dtype]:
    """``(model, processor, device, dtype)`` of an HF VLM checkpoint (hub id or local dir).

    ``model_cls`` is the family's ``*ForConditionalGeneration``-style class. The model comes
    back on the resolved device, in eval mode, without gradients. Raises
    :class:`ModelLoadError` naming ``model_id`` on any failure.
    """
    from transformers import AutoProcessor

    try:
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
    except ValueError as err:
        raise ModelLoadError(f"{model_id}: {err}") from err
    local = Path(model_id).is_dir()  # a local checkpoint never reaches for the hub
    require_safetensors(model_id)
    try:
        # use_safetensors=True: transformers never falls back to pytorch_model.bin (a pickle), also on the
        # hub; trust_remote_code=False: an auto_map in config.json never imports code from the checkpoint.
        model = model_cls.from_pretrained(
            model_id,
            dtype=dt,
            attn_implementation="sdpa",
            use_safetensors=True,
            trust_remote_code=False,
            local_files_only=local,
        )
        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=False, local_files_only=local)
    except Exception as err:
        raise ModelLoadError(f"{model_id}: cannot load {model_cls.__name__} ({type(err).__name__}: {err})") from err
    return model.to(dev).eval().requires_grad_(False), processor, dev, dt


def find_text_tower(model_id: str, text_encoder_id: str = "") -> tuple[str, str]:
    """Where the text tower comes from: ``(source, how)``; ``("", "none")`` when there is none.

    The one discovery rule of every family, in order: the explicit ``text_encoder_id``
    (``how="explicit"``), the ``atp_text_tower`` subfolder of a local checkpoint
    (``"subfolder"``), the :data:`KNOWN_TEXT_TOWERS` entry of :func:`checkpoint_name` (``"known"``).
    """
    if text_encoder_id:
        return text_encoder_id, "explicit"
    sub = Path(model_id) / TEXT_TOWER_SUBDIR
    if Path(model_id).is_dir() and sub.is_dir():
        return str(sub), "subfolder"
    known = KNOWN_TEXT_TOWERS.get(checkpoint_name(model_id), "")
    if known:
        return known, "known"
    return "", "none"


@dataclass(frozen=True)
class TextTower:
    """The text tower a backend ended up with: ``joint`` is None when it runs CLS-only."""

    joint: JointSpace | None
    source: str = ""  # where it was loaded from; "" when there is none
    reason: str = ""  # why there is none; "" when there is one


def load_text_tower(
    model_id: str,
    text_encoder_id: str,
    load: Callable[[str], JointSpace],
    vision_hidden: int,
    kind: str = "",
) -> TextTower:
    """Find (:func:`find_text_tower`) and load the joint-space text tower of ``model_id``.

    ``load(source)`` builds the joint space (e.g. ``load_joint_space`` with the device and
    dtype bound); it must read patch states of width ``vision_hidden`` and, when ``kind`` is
    given, be of that kind. An explicit ``text_encoder_id`` that fails raises
    :class:`ModelLoadError` naming it (the user asked for it); a bundled or known tower that
    fails (not cached offline, wrong width, ...) leaves the backend CLS-only, with
    :attr:`TextTower.reason` saying why.
    """
    source, how = find_text_tower(model_id, text_encoder_id)
    if how == "none":
        return TextTower(None, reason="no joint-space text tower is known for this checkpoint")
    try:
        joint = load(source)
        if (kind and joint.kind != kind) or joint.vision_hidden != vision_hidden:
            raise ValueError(
                f"{joint.kind} space of width {joint.vision_hidden} does not match the "
                f"{kind or 'VLM'} vision tower of width {vision_hidden}"
            )
    except Exception as err:
        if how == "explicit":
            raise ModelLoadError(f"{model_id}: text tower {source!r}: {type(err).__name__}: {err}") from err
        return TextTower(None, reason=f"{how} text tower {source!r} unavailable ({type(err).__name__}: {err})")
    return TextTower(joint, source)
