"""What one backend call returns: answers, the selection, token counts, timings, FLOPs, notes.

Everything here is frozen: a result is built once, at the end of
:meth:`atp_ros.backends.pipeline.VlmBackend.answer`, and read afterwards (the node, the
demo, the benchmarks); nothing is written back into it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from atp_ros.method import Selection

# The stages of one call, in the order the data moves through them (the only definition). "setup" is
# generate()'s own work before the prefill forward (input checks, expansion), so "prefill" is the forward
# (timed apart on the CPU; on CUDA it stays in "prefill", see timing.generate_timed).
STAGES: tuple[str, ...] = ("preprocess", "vision", "scoring", "projector", "setup", "prefill", "decode")


@dataclass(frozen=True)
class StageTimings:
    """Wall time per stage in milliseconds (CUDA-synchronized on GPU)."""

    preprocess: float = 0.0
    vision: float = 0.0
    scoring: float = 0.0
    projector: float = 0.0
    setup: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0

    @property
    def total(self) -> float:
        return sum(getattr(self, s) for s in STAGES)

    def as_dict(self) -> dict[str, float]:
        return {s: getattr(self, s) for s in STAGES} | {"total": self.total}


@dataclass(frozen=True)
class PixelBox:
    """The part of a camera frame the model's input covers, in frame pixels (x right, y down).

    Pixel edges, not centres: a full ``W x H`` frame is ``(0, 0, W, H)``. A processor that
    center-crops gives a box inside the frame; one that pads gives a box reaching past it.
    The patch grid tiles this box evenly, so patch ``(r, c)`` of an ``h x w`` grid saw
    :meth:`cell` ``(r, c)``.
    """

    x0: float
    y0: float
    x1: float
    y1: float

    def cell(self, row: int, col: int, grid: tuple[int, int]) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` of patch ``(row, col)`` of a ``grid = (h, w)`` patch grid."""
        h, w = grid
        cw, ch = (self.x1 - self.x0) / w, (self.y1 - self.y0) / h
        return self.x0 + col * cw, self.y0 + row * ch, self.x0 + (col + 1) * cw, self.y0 + (row + 1) * ch

    def as_tuple(self) -> tuple[float, float, float, float]:
        return self.x0, self.y0, self.x1, self.y1


@dataclass(frozen=True)
class ScoringInfo:
    """How the selection of one call was scored (the same for every image of the batch)."""

    selector: str  # the selector that ran: without a text tower a text-needing one becomes "cls_only"
    alpha: float  # text weight actually used (0 when S_inter was not used)
    intra_signal: str  # "cls" | "received" | "probe" (SigLIP pooling head) | "" when nothing was scored
    score_layer: int  # ViT layer whose attention gave S_intra
    inter_readout: str  # "naive" | "maskclip" | "clearclip"; "" when S_inter was not computed
    text_tower: str  # where the joint-space text tower came from; "" when the backend has none
    text_tower_note: str = ""  # why requested text scoring did not happen; "" when it did or was not asked


@dataclass(frozen=True)
class VlmResult:
    """Everything one batched call produced. Token counts and FLOPs are per image.

    Token counts mean the same in every family: ``visual_tokens_total[b]`` is N_b, the tokens
    the selector chose from for image ``b`` (a fixed N for families with one grid; per image for
    those whose grid follows the frame, e.g. Qwen2.5-VL, where a token is one LLM token, a 2x2
    merge group), and ``visual_tokens_kept[b]`` is K_b, the tokens it kept (the keep mask's sum).
    A CLS token that a family always passes along (BLIP-2, IDEFICS, LLaVA
    with the ``full`` feature strategy) is counted in neither; ``consumer_tokens[b]`` is what
    the family's consumer actually received (LLaVA: image positions in the LLM; BLIP-2:
    Q-Former keys; IDEFICS: resampler context), CLS included. ``views[b]`` is the frame region
    image ``b``'s patch grid covers (:class:`PixelBox`). ``flops`` holds ``llm_prefill`` and
    ``pipeline`` (vision + scoring + projector/resampler + LLM prefill), multiply-add = 2.
    """

    answers: list[str]
    selection: Selection
    visual_tokens_total: list[int]
    visual_tokens_kept: list[int]
    consumer_tokens: list[int]
    text_tokens: list[int]
    timings: StageTimings
    scoring: ScoringInfo
    views: list[PixelBox]
    flops: dict[str, float]
    generated_ids: list[list[int]]
    notes: list[str]  # everything the caller should know about this call (fallbacks, ignored options)

    @property
    def alpha_used(self) -> float:
        return self.scoring.alpha

    @property
    def grid(self) -> tuple[int, int]:
        """The token grid every image of the call shares; ValueError when they differ (use :meth:`grid_of`)."""
        return self.selection.grid

    def grid_of(self, b: int = 0) -> tuple[int, int]:
        """``(h, w)`` token grid of image ``b``."""
        return self.selection.grid_of(b)

    def keep_mask(self, b: int = 0) -> np.ndarray:
        """``(h, w)`` uint8 keep mask of image ``b`` (1 kept, 0 pruned) on its own grid."""
        return self.selection.mask_of(b).to(torch.uint8).cpu().numpy()

    def score_grid(self, b: int = 0) -> np.ndarray:
        """``(h, w)`` float32 fused score of image ``b`` on its own grid."""
        h, w = self.grid_of(b)
        return self.selection.scores[b, : h * w].reshape(h, w).float().cpu().numpy()

    def part(self, start: int, stop: int) -> VlmResult:
        """Images ``start:stop`` as a result of their own (a batch served to several callers, split back).

        Per-image fields are sliced (the selection's index padding trimmed to the part's longest
        row); per-call fields are shared: ``timings`` (the call's wall time), ``scoring``,
        ``notes`` and ``flops`` (the call's per-image mean).
        """
        if not 0 <= start < stop <= len(self.answers):
            raise ValueError(f"part {start}:{stop} of a result of {len(self.answers)} images")
        rows = slice(start, stop)
        sel = self.selection
        k_max = int(sel.lengths[rows].max())
        selection = replace(  # clones: a view would carry the whole batch's storage when pickled
            sel,
            indices=sel.indices[rows, :k_max].clone(),
            lengths=sel.lengths[rows].clone(),
            mask=sel.mask[rows].clone(),
            scores=sel.scores[rows].clone(),
            s_intra=None if sel.s_intra is None else sel.s_intra[rows].clone(),
            s_inter=None if sel.s_inter is None else sel.s_inter[rows].clone(),
            grids=None if sel.grids is None else sel.grids[rows],
        )
        return replace(
            self,
            answers=self.answers[rows],
            selection=selection,
            visual_tokens_total=self.visual_tokens_total[rows],
            visual_tokens_kept=self.visual_tokens_kept[rows],
            consumer_tokens=self.consumer_tokens[rows],
            text_tokens=self.text_tokens[rows],
            views=self.views[rows],
            flops=dict(self.flops),
            generated_ids=self.generated_ids[rows],
            notes=list(self.notes),
        )
