"""Phase 1b of the cell model: grounding the CLIP's patch features in the cell's geometry.

After phase 1 the patch features know *what* is in a patch (a linear probe reads an object's
color from them at 0.99) but hardly *where* (its shelf level and slot at 0.50 of 12, the patch's
row at 0.34 of 16). The LLM finds the patch a question names ("the box in slot three of the top
level") by matching its query to the patches' keys, so that place has to be in the features.
This phase goes on training the CLIP with its two losses plus linear read-outs, from the
feature layer the LLaVA consumes, of each patch's row and column, of the shelf slot its object
stands in and of the letter on it. The read-outs are discarded afterwards: the checkpoint keeps
the stock ``CLIPModel``.

The same losses, plus a read-out of the object kind (box or tote) of each shelf-item patch, make
phase 5's tower touch-up (recipe ``dialog_tower_steps``): phase 1b left the kind only weakly in the
features (a linear probe of an item's patches reads it little better than the majority class), and
a question about the red box where a red tote also stands can be answered only from it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import Tensor

from atp_ros.warehouse.cell.model.clip_phase import clip_step
from atp_ros.warehouse.cell.model.data import Frames
from atp_ros.warehouse.cell.model.loop import Phase, run_phase
from atp_ros.warehouse.cell.model.recipe import GRID, NUM_PATCHES, Recipe, bf16_forward, normalize, plain_forward
from atp_ros.warehouse.cell.truth import LABELS, LEVELS, SLOTS, CellTruth
from atp_ros.warehouse.scenes import evidence_mask

NO_SLOT = len(LEVELS) * len(SLOTS)  # a patch showing no shelf object
NO_LABEL = len(LABELS)  # a shelf object without a readable letter
IGNORE = -100  # cross-entropy's ignore index
LABEL_MIN_VISIBLE = 0.6
SLOT_MIN_VISIBLE = 0.3
KIND_MIN_VISIBLE = 0.3  # an item less visible than this teaches no patch its kind
KINDS = {"box": 0, "tote": 1}  # the kind read-out's classes


class GroundHeads(torch.nn.Module):
    """Linear read-outs of a patch feature ``(..., D)``: row and column (``GRID`` each), slot (12 + none)
    and letter (6 + none); with ``kind``, also the shelf item's kind (:data:`KINDS`)."""

    def __init__(self, dim: int, kind: bool = False) -> None:
        super().__init__()
        self.row = torch.nn.Linear(dim, GRID)
        self.col = torch.nn.Linear(dim, GRID)
        self.slot = torch.nn.Linear(dim, NO_SLOT + 1)
        self.label = torch.nn.Linear(dim, NO_LABEL + 1)
        self.kind = torch.nn.Linear(dim, len(KINDS)) if kind else None


def kind_labels(truth: CellTruth, kind_ids: dict[str, int]) -> np.ndarray:
    """Per patch (flat, ``NUM_PATCHES``): the id ``kind_ids`` gives the object kind ("box", "tote") of the shelf
    item it shows, ``IGNORE`` where it shows none or items of both kinds."""
    labels = np.full(NUM_PATCHES, IGNORE, dtype=np.int64)
    seen = np.zeros((len(kind_ids), NUM_PATCHES), dtype=bool)
    kinds = list(kind_ids)
    for o in truth.objects:
        if o.place == "shelf" and o.kind in kind_ids and o.box is not None and o.visible_fraction >= KIND_MIN_VISIBLE:
            seen[kinds.index(o.kind)] |= evidence_mask([o.box], (truth.height, truth.width), (GRID, GRID)).reshape(-1)
    for k, kind in enumerate(kinds):
        labels[seen[k] & (seen.sum(0) == 1)] = kind_ids[kind]
    return labels


def letter_labels(truth: CellTruth) -> np.ndarray:
    """Per patch (flat, ``NUM_PATCHES``): the index in ``LABELS`` of the readable letter of the shelf box it shows,
    ``IGNORE`` elsewhere (the letter classes of :func:`patch_targets` without its "no letter" class)."""
    label = patch_targets(truth)[1]
    return np.where(label < NO_LABEL, label, IGNORE)


def patch_targets(truth: CellTruth) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch slot class (``level * 4 + slot``, ``NO_SLOT`` elsewhere) and letter class (``IGNORE`` off
    shelf objects, ``NO_LABEL`` on one without a readable letter), int64 ``(NUM_PATCHES,)`` each."""
    slot = np.full(NUM_PATCHES, NO_SLOT, dtype=np.int64)
    label = np.full(NUM_PATCHES, IGNORE, dtype=np.int64)
    # Larger boxes first, so a small object in front keeps its patches.
    shelf = [o for o in truth.objects if o.place == "shelf" and o.box and o.visible_fraction >= SLOT_MIN_VISIBLE]
    for o in sorted(shelf, key=lambda o: -(o.box[2] - o.box[0]) * (o.box[3] - o.box[1])):
        mask = evidence_mask((o.box,), (truth.height, truth.width), (GRID, GRID)).reshape(-1)
        slot[mask] = LEVELS.index(o.level) * len(SLOTS) + SLOTS.index(o.slot)
        readable = o.label is not None and o.visible_fraction >= LABEL_MIN_VISIBLE
        label[mask] = LABELS.index(o.label) if readable else (NO_LABEL if o.label is None else IGNORE)
    return slot, label


def ground_losses(
    clip, heads: GroundHeads, px: Tensor, truths: list[CellTruth], r: Recipe
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The read-out cross-entropies of one batch of frames (``px``: normalized ``(B, 3, S, S)``) and the
    slot, label, letter (and kind) read-outs' accuracy on shelf-object patches (the losses are dominated by empty
    patches)."""
    hs = clip.vision_model(pixel_values=px, output_hidden_states=True).hidden_states
    feats = hs[r.feature_layer][:, 1:]  # (B, N, D): what the LLaVA projector reads
    grid = torch.arange(NUM_PATCHES)
    targets = [patch_targets(t) for t in truths]
    slot = torch.as_tensor(np.stack([s for s, _ in targets]))
    label = torch.as_tensor(np.stack([lab for _, lab in targets]))
    flat = feats.reshape(-1, feats.shape[-1])
    out = {
        "row": F.cross_entropy(heads.row(feats).flatten(0, 1), (grid // GRID).repeat(len(truths))),
        "col": F.cross_entropy(heads.col(feats).flatten(0, 1), (grid % GRID).repeat(len(truths))),
        "slot": F.cross_entropy(heads.slot(flat), slot.reshape(-1)),
    }
    if (label != IGNORE).any():
        out["label"] = F.cross_entropy(heads.label(flat), label.reshape(-1), ignore_index=IGNORE)
    kind = None
    if heads.kind is not None:
        kind = torch.as_tensor(np.stack([kind_labels(t, KINDS) for t in truths]))
        if (kind != IGNORE).any():
            out["kind"] = F.cross_entropy(heads.kind(flat), kind.reshape(-1), ignore_index=IGNORE)
    with torch.no_grad():
        if kind is not None and (kind != IGNORE).any():
            on_item = kind != IGNORE
            acc = {"kind_acc": float((heads.kind(feats).argmax(-1) == kind)[on_item].float().mean())}
        else:
            acc = {}
        on, read = slot != NO_SLOT, label >= 0
        acc["slot_acc"] = float((heads.slot(feats).argmax(-1) == slot)[on].float().mean()) if on.any() else 0.0
        if read.any():
            named = heads.label(feats).argmax(-1) == label
            acc["label_acc"] = float(named[read].float().mean())
            # label_acc also counts the "no letter" class every tote shows; letter_acc is the letters alone.
            letters = read & (label != NO_LABEL)
            if letters.any():
                acc["letter_acc"] = float(named[letters].float().mean())
    return out, acc


class Grounding(torch.nn.Module):
    """The CLIP, the read-outs and the region loss's scale, saved and resumed as one state dict."""

    def __init__(self, clip, heads: GroundHeads, dense_scale: torch.nn.Parameter) -> None:
        super().__init__()
        self.clip, self.heads, self.dense_scale = clip, heads, dense_scale


def ground_clip(trainer, clip, frames: Frames, progress: Progress, checkpoint_every_s: float):
    """Phase 1b, resumed from ``trainer.state`` and checkpointed into it; returns the frozen, grounded CLIP."""
    r = trainer.r
    if r.ground_steps <= 0:
        return clip
    phase = Phase("ground", r.ground_steps, r.ground_lr, stream=2)
    return _ground(trainer, clip, frames, phase, False, progress, checkpoint_every_s)


def touch_up_tower(trainer, clip, frames: Frames, progress: Progress, checkpoint_every_s: float):
    """Phase 5's tower touch-up (``dialog_tower_steps``): phase 1b's losses (its letter read-out weighted
    ``dialog_tower_letter_weight``) plus the kind read-out, from phase 1b's read-outs where the state has them,
    resumed and checkpointed as ``retower``; trains ``clip`` in place and returns it frozen."""
    r = trainer.r
    if r.dialog_tower_steps <= 0:
        return clip
    phase = Phase("retower", r.dialog_tower_steps, r.dialog_tower_lr, stream=6)
    return _ground(trainer, clip, frames, phase, True, progress, checkpoint_every_s)


def _ground(trainer, clip, frames: Frames, phase: Phase, kind: bool, progress: Progress, checkpoint_every_s: float):
    r = trainer.r
    torch.manual_seed(r.seed + phase.stream - 1)
    clip.requires_grad_(True)
    scale = trainer.state["ground"]["dense_scale"] if kind and "ground" in trainer.state else None
    scale = float(scale) if scale is not None else float(trainer.state.get("dense_scale", np.log(10.0)))
    dense_scale = torch.nn.Parameter(torch.tensor(scale))
    module = Grounding(clip, GroundHeads(clip.config.vision_config.hidden_size, kind=kind), dense_scale)
    if kind and phase.name not in trainer.state and "ground" in trainer.state:
        # Phase 1b's read-outs, trained on these features, so their first gradients into the tower are not noise.
        saved = {k.removeprefix("heads."): v for k, v in trainer.state["ground"].items() if k.startswith("heads.")}
        module.heads.load_state_dict(saved, strict=False)
    opt = torch.optim.AdamW(module.parameters(), lr=phase.lr, weight_decay=0.05)
    bf16_forward(clip.vision_model, r)
    bf16_forward(clip.text_model, r)

    def one_step(rng: np.random.Generator, step: int):
        g_loss, r_loss = clip_step(clip, trainer.tok, frames, rng, r, dense_scale)
        idx = np.sort(rng.choice(len(frames), size=min(max(r.clip_batch // 2, 1), len(frames)), replace=False))
        truths = [frames.truths[int(i)] for i in idx]
        parts, acc = ground_losses(clip, module.heads, normalize(frames.rgb[idx]), truths, r)
        aux = sum(parts.values())
        if phase.name == "retower" and "label" in parts:
            aux = aux + (r.dialog_tower_letter_weight - 1.0) * parts["label"]
        logged = {"global_loss": g_loss.item(), "region_loss": r_loss.item()} | {k: v.item() for k, v in parts.items()}
        logged |= acc
        text = f"region {r_loss.item():.3f} " + " ".join(f"{k} {v:.2f}" for k, v in logged.items() if "acc" in k)
        return g_loss + r_loss + r.ground_weight * aux, logged, text

    run_phase(trainer, phase, module, opt, one_step, progress, checkpoint_every_s)
    plain_forward(clip.vision_model)
    plain_forward(clip.text_model)
    return clip.requires_grad_(False)


__all__ = [
    "KINDS",
    "GroundHeads",
    "Grounding",
    "ground_clip",
    "ground_losses",
    "kind_labels",
    "letter_labels",
    "patch_targets",
    "touch_up_tower",
]
