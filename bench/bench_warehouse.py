"""warehouse-tiny on a 640x480 camera frame: per-frame latency per keep ratio, side by side in one run.

The speed target of the embedded model: at the default keep ratio (0.25) the node's model
step answers a 640x480 frame in at most 100 ms p50 on 2 CPU cores. Keep ratios run
round-robin per frame so machine noise hits all alike; batch 1, greedy, answers of up to
4 tokens (a word and EOS). Writes ``bench/results/warehouse.json`` and ``bench/results/warehouse.png``.

    PYTHONPATH=atp_ros python bench/bench_warehouse.py [--quick] [--model warehouse-tiny]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from atp_ros.backends import STAGES, AtpConfig, load_backend
from atp_ros.warehouse.scenes import questions_for_scene, render_scene, split_seed
from common import stamp
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

KEEPS = (1.0, 0.4, 0.25, 0.11)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="warehouse-tiny")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    frames_n = 8 if args.quick else args.frames
    be = load_backend(args.model, device=args.device)
    frames, questions = [], []
    for i in range(frames_n):
        scene = render_scene(split_seed("test", 900_000 + i), 480, 640)
        frames.append(scene.rgb)
        questions.append(questions_for_scene(scene, np.random.default_rng(i), 1)[0].question)
    cfgs = {k: AtpConfig(enabled=k < 1.0, keep_ratio=k) for k in KEEPS}
    for cfg in cfgs.values():  # warm-up
        be.answer(frames[:1], questions[0], cfg, max_new_tokens=4)
    runs: dict[float, list] = {k: [] for k in KEEPS}
    for frame, q in tqdm(list(zip(frames, questions, strict=True)), desc=f"{be.device}: keep ratios per frame"):
        for k, cfg in cfgs.items():
            runs[k].append(be.answer([frame], q, cfg, max_new_tokens=4))
    rows = []
    for k, results in runs.items():
        total = [r.timings.total for r in results]
        rows.append(
            {
                "keep_ratio": k,
                "kept": results[0].visual_tokens_kept[0],
                "total_tokens": results[0].visual_tokens_total[0],
                "p50_ms": float(np.percentile(total, 50)),
                "p95_ms": float(np.percentile(total, 95)),
                "stage_p50_ms": {s: float(np.median([getattr(r.timings, s) for r in results])) for s in STAGES},
            }
        )
    full = rows[0]["p50_ms"]
    table = Table(
        title=f"{args.model} on 640x480 frames ({be.device}, batch 1, {frames_n} frames, target p50 <= 100 ms)"
    )
    for col in ("keep", "K/N", "p50 ms", "p95 ms", "speed-up", *STAGES):
        table.add_column(col)
    for r in rows:
        table.add_row(
            f"{r['keep_ratio']:.2f}",
            f"{r['kept']}/{r['total_tokens']}",
            f"{r['p50_ms']:.1f}",
            f"{r['p95_ms']:.1f}",
            f"{full / r['p50_ms']:.2f}",
            *(f"{r['stage_p50_ms'][s]:.1f}" for s in STAGES),
        )
    Console().print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "warehouse.json").write_text(
        json.dumps({"meta": stamp(), "device": str(be.device), "rows": rows}, indent=1) + "\n"
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = np.zeros(len(rows))
    labels = [f"{r['keep_ratio']}" for r in rows]
    for s in STAGES:
        v = np.array([r["stage_p50_ms"][s] for r in rows])
        ax.bar(labels, v, bottom=bottom, label=s)
        bottom += v
    ax.axhline(100, color="r", ls="--", lw=1, label="target 100 ms")
    ax.set(xlabel="keep ratio", ylabel="ms per frame (stage medians)", title=f"{args.model}, 640x480, {be.device}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "warehouse.png", dpi=100)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
