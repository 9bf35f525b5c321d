"""Answer reuse on warehouse-cell episodes (issue 22): answers per second and accuracy vs per-frame ATP.

A fixed camera watches the arm work (``warehouse.cell.episodes.Episode``, 640x480 at 10 Hz). For
each standing question (the aisle, whether the arm holds something, what it holds) every frame
of the episode is answered three times, side by side in one run: per-frame ATP (the model on
every frame), ``reuse.mode answer`` and ``reuse.mode tokens`` (``backends.streaming``, as the
node's worker answers a stream, stream time from the frames' stamps). Reported per question:
the mean time per answered frame (change check included), the speed-up, accuracy against the
frame's own ground truth for each, the share of frames reused, the worst staleness (frames and
milliseconds since the full run) and ``stale_truth_changed``: reused frames whose true answer
differs from the one at the full run's frame (the answer should have been refreshed; what the
watched set missed).
Writes ``bench/results/reuse.json`` and ``reuse.png``.

    PYTHONPATH=atp_ros python bench/bench_reuse.py [--model DIR] [--frames 200] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from atp_ros.backends import AtpConfig, load_backend
from atp_ros.backends.streaming import answer_on_stream
from atp_ros.evaluation.metrics import correct
from atp_ros.stream import ReuseConfig, StreamCache
from atp_ros.warehouse.cell.episodes import Episode
from atp_ros.warehouse.cell.questions import accepted_answers, candidates
from common import RESULTS, stamp
from rich.progress import track

QUESTIONS = {
    "aisle": "is the aisle clear?",
    "gripper": "is the arm holding something?",
    "holding": "what is the arm holding?",
}


def truth_answer(truth, kind: str) -> str | None:
    """The frame's true answer to the standing question of ``kind`` (None when it is undetermined)."""
    pool = candidates(truth, kind)
    return pool[0][1] if pool else None


def run_stream(backend, frames, question: str, kind: str, atp: AtpConfig, reuse: ReuseConfig | None) -> dict:
    """Answer every frame in order (``backends.streaming``, as the node's worker); per-frame ATP when ``reuse``
    is None."""
    cache = StreamCache(reuse if reuse is not None else ReuseConfig())
    times, right, scored, reused, stale_frames, stale_ms, stale_changed = [], 0, 0, 0, [], [], 0
    full_truth = None
    for f in frames:
        t = time.perf_counter()
        step = answer_on_stream(backend, cache, f.rgb, question, atp, 3, f.stamp_s)
        answer = step.result.answers[0]
        times.append((time.perf_counter() - t) * 1e3)
        gold = truth_answer(f.truth, kind)
        if step.reuse is not None:
            reused += 1
            stale_frames.append(step.reuse.frames_since_full)
            stale_ms.append(step.reuse.age_s * 1e3)
            stale_changed += int(gold is not None and full_truth is not None and gold != full_truth)
        else:
            full_truth = gold
        if gold is not None:
            scored += 1
            right += int(correct(answer, accepted_answers(gold)))
    return {
        "ms_per_frame": float(np.mean(times)),
        "accuracy": right / max(scored, 1),
        "scored": scored,
        "reuse_rate": reused / len(frames),
        "worst_stale_frames": int(max(stale_frames, default=0)),
        "worst_stale_ms": float(max(stale_ms, default=0.0)),
        "stale_truth_changed": stale_changed,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="warehouse-tiny", help="checkpoint (bundled name or directory)")
    ap.add_argument("--frames", type=int, default=200, help="frames per episode (10 Hz)")
    ap.add_argument("--episodes", type=int, default=2)
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 12 frames of one episode")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.quick:
        args.frames, args.episodes = 12, 1
    backend = load_backend(args.model, device="cpu")
    atp = AtpConfig(keep_ratio=args.keep)
    reuse = ReuseConfig(mode="answer")
    tokens = ReuseConfig(mode="tokens")  # answer reuse + token reuse (eventful)
    frames = []
    for e in range(args.episodes):
        episode = Episode(9_000 + e, width=640, height=480, rate_hz=10.0)
        try:
            frames.append([next(episode) for _ in track(range(args.frames), description=f"render episode {e}")])
        finally:
            episode.close()
    backend.answer([frames[0][0].rgb], [QUESTIONS["aisle"]], atp, max_new_tokens=3)  # warm-up
    rows = []
    for kind, question in track(list(QUESTIONS.items()), description="questions"):
        per = [run_stream(backend, ep, question, kind, atp, None) for ep in frames]
        rep = [run_stream(backend, ep, question, kind, atp, reuse) for ep in frames]
        tok = [run_stream(backend, ep, question, kind, atp, tokens) for ep in frames]

        def mean(runs, key):
            return float(np.mean([r[key] for r in runs]))

        rows.append(
            {
                "question": question,
                "per_frame_ms": mean(per, "ms_per_frame"),
                "reuse_ms": mean(rep, "ms_per_frame"),
                "speedup": mean(per, "ms_per_frame") / mean(rep, "ms_per_frame"),
                "per_frame_accuracy": mean(per, "accuracy"),
                "reuse_accuracy": mean(rep, "accuracy"),
                "reuse_rate": mean(rep, "reuse_rate"),
                "worst_stale_frames": max(r["worst_stale_frames"] for r in rep),
                "worst_stale_ms": max(r["worst_stale_ms"] for r in rep),
                "stale_truth_changed": sum(r["stale_truth_changed"] for r in rep),
                "scored_frames": sum(r["scored"] for r in per),
                "tokens_ms": mean(tok, "ms_per_frame"),
                "tokens_speedup": mean(per, "ms_per_frame") / mean(tok, "ms_per_frame"),
                "tokens_accuracy": mean(tok, "accuracy"),
                "tokens_reuse_rate": mean(tok, "reuse_rate"),
            }
        )
    print("| question | per-frame ms | reuse ms | speed-up | accuracy per-frame / reuse | reused | worst stale "
          "| stale, truth changed | tokens ms | speed-up | accuracy |")  # fmt: skip
    print("|" + " --- |" * 11)
    for r in rows:
        print(
            f"| {r['question']} | {r['per_frame_ms']:.1f} | {r['reuse_ms']:.1f} | {r['speedup']:.2f}x "
            f"| {r['per_frame_accuracy']:.3f} / {r['reuse_accuracy']:.3f} | {r['reuse_rate']:.0%} "
            f"| {r['worst_stale_frames']} frames, {r['worst_stale_ms']:.0f} ms | {r['stale_truth_changed']} "
            f"| {r['tokens_ms']:.1f} | {r['tokens_speedup']:.2f}x | {r['tokens_accuracy']:.3f} |"
        )
    report = {
        "what": __doc__.splitlines()[0],
        "model": args.model,
        "keep_ratio": args.keep,
        "reuse": reuse.__dict__,
        "episodes": [9_000 + e for e in range(args.episodes)],
        "frames_per_episode": args.frames,
        "rows": rows,
        **stamp(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (out / f"reuse{suffix}.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(rows, out / f"reuse{suffix}.png", args.model)
    return 0


def plot(rows: list[dict], path: Path, model: str) -> None:
    """Speed-up and accuracy per standing question and reuse level (per-frame, answer, answer + tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [r["question"] for r in rows]
    x = np.arange(len(rows))
    a.bar(x - 0.2, [r["speedup"] for r in rows], 0.4, color="tab:green", label="answer reuse")
    a.bar(x + 0.2, [r.get("tokens_speedup", 0.0) for r in rows], 0.4, color="tab:olive", label="answer + token reuse")
    a.axhline(1.0, color="gray", lw=0.8)
    a.set_xticks(x, names, rotation=15, ha="right", fontsize=8)
    a.set_ylabel("answers/s vs per-frame ATP")
    a.set_title("speed-up per reuse level")
    a.legend(fontsize=8)
    b.bar(x - 0.27, [r["per_frame_accuracy"] for r in rows], 0.27, label="per-frame ATP")
    b.bar(x, [r["reuse_accuracy"] for r in rows], 0.27, label="answer reuse")
    b.bar(x + 0.27, [r.get("tokens_accuracy", 0.0) for r in rows], 0.27, label="answer + token reuse")
    b.set_xticks(x, names, rotation=15, ha="right", fontsize=8)
    b.set_ylim(0, 1)
    b.set_ylabel("accuracy vs the frame's truth")
    b.legend(fontsize=8)
    fig.suptitle(f"warehouse-cell episodes, {model}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
