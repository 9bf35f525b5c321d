"""Training data of the cell model: rendered ``random_still`` frames (cached in ``--work``) and their questions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import Progress

from atp_ros.warehouse.cell.episodes import random_still
from atp_ros.warehouse.cell.model.recipe import GRID, IMAGE_SIZE, RENDER_SIZES, Recipe, pixels
from atp_ros.warehouse.cell.questions import Question, questions_for
from atp_ros.warehouse.cell.truth import CellTruth
from atp_ros.warehouse.scenes import evidence_mask

# Seeds of the splits' frames never overlap: frame i of split s is random_still(SPLIT_BASE[s] + i).
SPLIT_BASE = {"train": 0, "val": 10_000_000, "test": 20_000_000}


@dataclass
class Frames:
    """Frames of one split: squeezed pixels (uint8 ``(N, S, S, 3)``) and each frame's ground truth."""

    rgb: np.ndarray
    truths: list[CellTruth]

    def __len__(self) -> int:
        return len(self.truths)


def frame_seed(split: str, seed: int, i: int) -> int:
    """The ``random_still`` seed of frame ``i`` of ``split`` (the recipe seed shifts the training frames only)."""
    return SPLIT_BASE[split] + (seed * 1_000_003 if split == "train" else 0) + i


def render_frames(work: Path, split: str, count: int, r: Recipe, progress: Progress) -> Frames:
    """``count`` frames of ``split``, rendered in chunks saved under ``work/frames`` (a rerun loads them)."""
    folder = work / "frames"
    folder.mkdir(parents=True, exist_ok=True)
    rgb = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    truths: list[CellTruth] = []
    task = progress.add_task(f"render {split}", total=count, info="")
    for start in range(0, count, r.chunk):
        n = min(r.chunk, count - start)
        path = folder / f"{split}-{r.seed}-{start:07d}-{n}.npz"
        if not path.exists():
            part, meta = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8), []
            for j in range(n):
                i = start + j
                w, h = RENDER_SIZES[i % len(RENDER_SIZES)]
                frame = random_still(frame_seed(split, r.seed, i), width=w, height=h)
                part[j] = pixels(frame.rgb)
                meta.append(frame.truth.to_json())
                progress.advance(task)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, rgb=part, truth=np.array(json.dumps(meta)))
            tmp.replace(path)
        else:
            progress.advance(task, n)
        with np.load(path) as z:
            rgb[start : start + n] = z["rgb"]
            truths += [CellTruth.from_json(d) for d in json.loads(str(z["truth"]))]
    return Frames(rgb, truths)


def draw_questions(
    truth: CellTruth, rng: np.random.Generator, n: int, split: str, hard: tuple[str, ...], held_out: bool = False
) -> list:
    """``n`` distinct questions (by wording) of ``split``; ``hard`` kinds' questions drawn twice as often;
    ``held_out``: worded with the held-out phrasings only (test split)."""
    pool = questions_for(truth, rng, 3 * n, split, held_out_only=held_out)
    weighted = pool + [q for q in pool if q.kind in hard]
    out, seen = [], set()
    for k in rng.permutation(len(weighted)):
        q = weighted[int(k)]
        if q.question not in seen and len(out) < n:
            seen.add(q.question)
            out.append(q)
    return out


def patch_mask(q: Question, truth: CellTruth) -> np.ndarray:
    """The question's evidence patches on the ``GRID`` x ``GRID`` grid, flat bool ``(NUM_PATCHES,)``."""
    return evidence_mask(q.evidence, (truth.height, truth.width), (GRID, GRID)).reshape(-1)


def clip_texts(frames: Frames, idx: np.ndarray, rng: np.random.Generator, r: Recipe):
    """Captions (one per image: 2-3 answered questions) and region texts (questions with evidence) with
    their evidence patch masks, for the global and the region loss."""
    captions, region_texts, region_img, region_masks = [], [], [], []
    for b, i in enumerate(idx):
        truth = frames.truths[int(i)]
        qs = draw_questions(truth, rng, 6, "train", r.hard_kinds)
        k = int(rng.integers(2, 4))
        captions.append(" and ".join(f"{q.question} {q.answer}" for q in qs[:k]) or "a warehouse cell")
        for q in qs[:4]:
            mask = patch_mask(q, truth)
            if mask.any():
                # The answer goes with the question half the time: "the top one ... ? red" names the box too.
                region_texts.append(q.question + (f" {q.answer}" if rng.random() < 0.5 else ""))
                region_img.append(b)
                region_masks.append(mask)
    if not region_masks:
        region_masks = [np.ones(GRID * GRID, dtype=bool)]
        region_texts, region_img = [captions[0]], [0]
    return captions, region_texts, np.array(region_img), np.stack(region_masks)


__all__ = ["Frames", "clip_texts", "draw_questions", "frame_seed", "patch_mask", "render_frames"]
