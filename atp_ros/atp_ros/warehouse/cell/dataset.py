"""Datasets and bags of the rendered cell: what ``warehouse generate/bag --world cell`` write.

``generate`` writes independent stills with questions (the data contract of ``samples.jsonl``:
``image``, ``question``, ``answer``, ``answers``, ``kind``, ``evidence``, ``seed`` and ``slots``,
the question's structured meaning). ``write_bag`` records a continuous episode as a rosbag2
(mcap) with a standing question that changes every few frames; each frame's ground truth is
the standing question re-answered on that frame (the arm moves, boxes leave, the aisle clears).
Splits are disjoint seed ranges (``scenes.SPLITS``), shared with the flat world.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from atp_ros.warehouse.cell.episodes import Episode, random_still
from atp_ros.warehouse.cell.questions import Question, accepted_answers, candidates, questions_for, render_question
from atp_ros.warehouse.cell.truth import CellTruth
from atp_ros.warehouse.scenes import split_seed

# Standing questions of a bag: the kinds a planner keeps asking while the arm works.
STANDING_KINDS = ("holding", "gripper", "aisle", "count_level", "empty_slot", "where", "color_at", "count")


def generate(
    split: str, count: int, seed: int, out: Path, size: tuple[int, int], questions: int, held_out_only: bool = False
) -> int:
    """Write ``count`` stills and up to ``questions`` questions each; returns the number of samples."""
    from atp_ros.warehouse.cli import write_samples

    def sample(still_seed: int) -> tuple:
        frame = random_still(still_seed, width=size[1], height=size[0])
        rng = np.random.default_rng([still_seed, 3])
        return frame.rgb, questions_for(frame.truth, rng, questions, split, held_out_only=held_out_only)

    return write_samples(split, count, seed, out, sample)


def standing_answer(truth: CellTruth, kind: str, slots: dict) -> tuple[str, list] | None:
    """``(answer, evidence)`` of a standing question on this frame, or None when it is not determined now."""
    for cand_slots, answer, evidence in candidates(truth, kind):
        if cand_slots == slots:
            return answer, [list(b) for b in evidence]
    return None


def pick_standing(truth: CellTruth, rng: np.random.Generator, split: str) -> tuple[str, dict, str] | None:
    """A standing question answerable on this frame: ``(kind, slots, text)``."""
    for kind in rng.permutation(STANDING_KINDS):
        pool = candidates(truth, str(kind))
        if pool:
            slots = pool[int(rng.integers(len(pool)))][0]
            return str(kind), slots, render_question(str(kind), slots, rng, split)
    return None


def episode_frames(split: str, seed: int, size: tuple[int, int], rate: float) -> Iterator:
    """The frames of the split's episode ``seed`` (endless; close it by exhausting or dropping)."""
    episode = Episode(split_seed(split, seed), width=size[1], height=size[0], rate_hz=rate)
    try:
        yield from episode
    finally:
        episode.close()


def write_bag(
    out: Path,
    split: str,
    count: int,
    seed: int,
    rate: float,
    size: tuple[int, int],
    question_every: int,
    jpeg: int = 0,
) -> int:
    """Record ``count`` frames of one episode, standing questions and the ground-truth sidecar (``jpeg`` > 0:
    frames as JPEG ``CompressedImage`` of that quality)."""
    from atp_ros.warehouse.cli import IMAGE_TOPIC, QUERY_TOPIC, TRUTH_FILE, BagWriter

    rng = np.random.default_rng([split_seed(split, seed), 17])
    standing: tuple[str, dict, str] | None = None
    truth_lines = []
    with BagWriter(out, IMAGE_TOPIC, QUERY_TOPIC, jpeg) as bag:
        frames = episode_frames(split, seed, size, rate)
        for i, frame in zip(tqdm(range(count), desc="cell bag frames", unit="frame"), frames, strict=False):
            stamp = bag.stamp(i, rate)
            if i % question_every == 0 or standing is None:
                standing = pick_standing(frame.truth, rng, split) or standing
                if standing is not None:
                    bag.write_query(standing[2], stamp - 1_000_000)
            bag.write_image(frame.rgb, stamp)
            truth = {"stamp": stamp, "sec": stamp // 10**9, "nanosec": stamp % 10**9,
                     "seed": int(split_seed(split, seed)), "frame": frame.index}  # fmt: skip
            answered = standing_answer(frame.truth, standing[0], standing[1]) if standing else None
            if standing is None or answered is None:  # no determined answer on this frame: fidelity only
                truth |= {"question": standing[2] if standing else "", "answer": "", "answers": [], "evidence": []}
            else:
                q = Question(standing[2], answered[0], accepted_answers(answered[0]), standing[0], standing[1],
                             tuple(tuple(b) for b in answered[1]))  # fmt: skip
                truth |= q.as_dict()
            truth_lines.append(json.dumps(truth))
    (out / TRUTH_FILE).write_text("\n".join(truth_lines) + "\n")
    return len(truth_lines)
