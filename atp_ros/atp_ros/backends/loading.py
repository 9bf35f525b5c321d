"""Loading shared by the backends: the HF checkpoint and processor, and the joint-space text tower.

Every backend loads the same way: safetensors only, no remote code, SDPA attention, offline
from a local directory, frozen and in eval mode. The text tower for ``S_inter`` is looked up
in one order (:func:`find_text_tower`) and loaded by :func:`load_text_tower`, which decides
when a missing tower is an error and when it leaves the backend CLS-only.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from atp_ros.backends import ModelLoadError
from atp_ros.backends.base import resolve_device, resolve_dtype
from atp_ros.backends.text_towers import JointSpace

if TYPE_CHECKING:
    from transformers import PreTrainedModel

TEXT_TOWER_SUBDIR = "atp_text_tower"  # <model_dir>/atp_text_tower: the matching joint-space text tower


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
    try:
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


def find_text_tower(model_id: str, text_encoder_id: str = "", derived: str = "") -> tuple[str, str]:
    """Where the text tower comes from: ``(source, how)``; ``("", "none")`` when there is none.

    Order: the explicit ``text_encoder_id`` (``how="explicit"``), the ``atp_text_tower``
    subfolder of a local checkpoint (``"subfolder"``), the tower ``derived`` from the VLM
    (``"derived"``).
    """
    if text_encoder_id:
        return text_encoder_id, "explicit"
    sub = Path(model_id) / TEXT_TOWER_SUBDIR
    if Path(model_id).is_dir() and sub.is_dir():
        return str(sub), "subfolder"
    if derived:
        return derived, "derived"
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
    derived: str,
    load: Callable[[str], JointSpace],
    vision_hidden: int,
    kind: str = "",
    soft: Collection[str] = ("derived",),
) -> TextTower:
    """Find (:func:`find_text_tower`) and load the joint-space text tower of ``model_id``.

    ``load(source)`` builds the joint space (e.g. ``load_joint_space`` with the device and
    dtype bound); it must read patch states of width
    ``vision_hidden`` and, when ``kind`` is given, be of that kind. A tower found as a
    ``how`` listed in ``soft`` that fails (not cached offline, wrong width, ...) leaves the
    backend CLS-only, with :attr:`TextTower.reason` saying why; any other failing tower
    raises :class:`ModelLoadError` naming it.
    """
    source, how = find_text_tower(model_id, text_encoder_id, derived)
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
        if how not in soft:
            raise ModelLoadError(f"{model_id}: text tower {source!r}: {type(err).__name__}: {err}") from err
        return TextTower(None, reason=f"{how} text tower {source!r} unavailable ({type(err).__name__}: {err})")
    return TextTower(joint, source)
