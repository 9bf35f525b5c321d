"""The end-of-training report (``metrics.json``): test-split accuracy per kind through ``load_backend``,
with ATP at two keep ratios and the random selector, on the contrast questions apart (an item named by color and
object kind whose color the other kind shares on the racking), plus the frame latency at 640 x 480."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from atp_ros.evaluation.sources import Sample
from atp_ros.evaluation.sweep import answer_samples
from atp_ros.method import AtpConfig
from atp_ros.warehouse.cell.episodes import random_still
from atp_ros.warehouse.cell.model.data import frame_seed
from atp_ros.warehouse.cell.model.recipe import Recipe
from atp_ros.warehouse.cell.questions import is_contrast, questions_for

TEST_SIZE = (640, 480)  # the camera's frame
SETTINGS = {
    "full": AtpConfig(enabled=False),
    "atp_0.25": AtpConfig(keep_ratio=0.25),
    "atp_0.11": AtpConfig(keep_ratio=0.11),
    "random_0.11": AtpConfig(keep_ratio=0.11, selector="random"),
}


def test_samples(r: Recipe, progress: Progress) -> tuple[dict[str, list[Sample]], set[str]]:
    """Questions on test frames (seeds no training or validation frame uses) at 640 x 480: ``held_out``
    words every one with a phrasing training never saw, ``all`` draws from every test phrasing; and the keys
    of the questions that :func:`~atp_ros.warehouse.cell.questions.is_contrast`."""
    rng = np.random.default_rng([r.seed, 7])
    out: dict[str, list[Sample]] = {"held_out": [], "all": []}
    contrast: set[str] = set()
    task = progress.add_task("render test", total=r.test_images, info="")
    for i in range(r.test_images):
        frame = random_still(frame_seed("test", r.seed, i), width=TEST_SIZE[0], height=TEST_SIZE[1])
        for name, held in (("held_out", True), ("all", False)):
            for j, q in enumerate(questions_for(frame.truth, rng, r.test_per_image, "test", held_out_only=held)):
                boxes = tuple(tuple(float(v) for v in b) for b in q.evidence)
                key = f"test:{name}:{i}:{j}"
                out[name].append(Sample(key, frame.rgb, q.question, q.answers, boxes, kind=q.kind))
                if is_contrast(frame.truth, q.kind, q.slots):
                    contrast.add(key)
        progress.advance(task)
    return out, contrast


def score(backend, samples: list[Sample], atp: AtpConfig, contrast: frozenset[str] | set[str] = frozenset()) -> dict:
    """Accuracy overall, per kind and on the ``contrast`` keys' questions against the other questions of the
    same kinds, and the mean visual tokens kept, for one setting."""
    records = answer_samples(backend, samples, atp, max_new_tokens=3, batch=16, reseed_random=True)
    by_kind: dict[str, list[float]] = {}
    split: dict[str, list[float]] = {"contrast": [], "same_kinds_otherwise": []}
    kinds = {s.kind for s in samples if s.key in contrast}
    for rec, s in zip(records, samples, strict=True):
        by_kind.setdefault(s.kind, []).append(rec["accuracy"])
        if s.kind in kinds:
            split["contrast" if s.key in contrast else "same_kinds_otherwise"].append(rec["accuracy"])
    return {
        "accuracy": float(np.mean([rec["accuracy"] for rec in records])),
        "per_kind": {k: float(np.mean(v)) for k, v in sorted(by_kind.items())},
        "contrast": {k: {"accuracy": float(np.mean(v)) if v else None, "n": len(v)} for k, v in split.items()},
        "tokens_kept": float(np.mean([rec["kept"] for rec in records])),
        "n": len(records),
    }


def frame_latency_ms(backend, sample: Sample, repeats: int = 20) -> dict:
    """p50 / p90 of one ``answer`` call on one 640 x 480 frame (ATP keep 0.25), after a warm-up call."""
    cfg = SETTINGS["atp_0.25"]
    backend.answer([sample.image], [sample.question], cfg, max_new_tokens=3)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        backend.answer([sample.image], [sample.question], cfg, max_new_tokens=3)
        times.append((time.perf_counter() - t) * 1e3)
    return {
        "p50": float(np.percentile(times, 50)),
        "p90": float(np.percentile(times, 90)),
        "threads": torch.get_num_threads(),
    }


def evaluate(out: Path, r: Recipe, progress: Progress) -> dict:
    """Every setting of :data:`SETTINGS` on the test split through ``load_backend(out).answer``."""
    from atp_ros.backends import load_backend

    backend = load_backend(str(out), device="cpu")
    samples, contrast = test_samples(r, progress)
    held_out = samples["held_out"]
    task = progress.add_task("test", total=len(SETTINGS) + 1, info="")
    report: dict = {
        "split": "test: new frames at 640x480; settings on held-out phrasings only, full_all_phrasings on all",
        "settings": {},
    }
    for name, cfg in SETTINGS.items():
        report["settings"][name] = score(backend, held_out, cfg, contrast)
        progress.update(task, advance=1, info=f"{name} {report['settings'][name]['accuracy']:.3f}")
    report["full_all_phrasings"] = score(backend, samples["all"], SETTINGS["full"], contrast)
    acc = {name: row["accuracy"] for name, row in report["settings"].items()}
    report["summary"] = {
        "atp_0.25_over_full": acc["atp_0.25"] / max(acc["full"], 1e-9),
        "atp_0.11_over_full": acc["atp_0.11"] / max(acc["full"], 1e-9),
        "atp_0.11_minus_random_0.11": acc["atp_0.11"] - acc["random_0.11"],
        "worst_kind_full": min(report["settings"]["full"]["per_kind"].values(), default=0.0),
    }
    progress.advance(task)
    if held_out:
        report["frame_ms_640x480_atp_0.25"] = frame_latency_ms(backend, held_out[0], r.latency_repeats)
    return report
