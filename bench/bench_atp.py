"""Micro-benchmark of the ATP core on CPU: scoring + selection per frame, CLS attention, adaptive budget.

What is timed (median of many repeats after a warm-up, ``torch.inference_mode``):

* ``score+select`` -- ``ATPSelector(alpha=0.5).select`` with keep ratio 0.25: min-max
  normalization of both signals, fusion, top-K, the ascending index list and the keep
  mask. The inputs are the per-patch signals a backend hands over, so the joint-space
  projection of the patches and the text tower are *not* included.
* ``adaptive`` -- the same with the adaptive budget (``tau = 0.9``) instead of a ratio.
* ``cls_attention`` -- :func:`atp_ros.method.cls_attention` for one ViT-L-like layer
  (H=16 heads, D=64, L=N+1 keys with the CLS token).

N in {196, 576, 729, 2304} (ViT-B/16 224 px, ViT-L/14 336 px, SigLIP 384 px, 672 px
tiles), B=1 and B=8 (a B=8 time is for the whole batch of 8 frames). The target is
scoring + selection under 1 ms for one frame at N=576. Writes ``bench/results/atp_core.json``
and ``bench/results/atp_core.png``. On a CPU shared with other work, ``--threads 1`` gives
the steadiest numbers: these ops are too small to gain from intra-op threads.

    PYTHONPATH=atp_ros python bench/bench_atp.py [--quick] [--threads T] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from atp_ros.method import ATPSelector, Budget, ScoreInputs, cls_attention
from rich.console import Console
from rich.table import Table

NUM_TOKENS = (196, 576, 729, 2304)
BATCHES = (1, 8)
KEEP_RATIO = 0.25
TAU = 0.9
HEADS, HEAD_DIM = 16, 64  # ViT-L/14
TARGET_N, TARGET_MS = 576, 1.0
ROUNDS = 5  # sweeps over all cases; see run()
STAGES = ("score+select", "adaptive", "cls_attention")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def summarize(samples: list[float]) -> dict[str, float]:
    """Median / p10 / p90 of per-call times in milliseconds."""
    samples = sorted(samples)
    return {
        "median_ms": statistics.median(samples),
        "p10_ms": samples[int(0.1 * (len(samples) - 1))],
        "p90_ms": samples[int(0.9 * (len(samples) - 1))],
        "repeats": len(samples),
    }


def signals(batch: int, n: int, gen: torch.Generator) -> ScoreInputs:
    """Realistic per-patch signals: softmax-like CLS attention and CLIP-like cosines."""
    s_intra = (torch.randn(batch, n, generator=gen) * 2).softmax(dim=1)
    s_inter = torch.rand(batch, n, generator=gen) * 0.6 - 0.1
    return ScoreInputs(s_intra=s_intra, s_inter=s_inter)


def run(quick: bool = False) -> list[dict]:
    """Time every stage for every N and batch size; one dict per (stage, N, B)."""
    warmup, repeats = (5, 40) if quick else (50, 400)
    gen = torch.Generator().manual_seed(0)
    selector = ATPSelector(alpha=0.5)
    ratio, adaptive = Budget(keep_ratio=KEEP_RATIO), Budget(mass=TAU)
    cases: list[tuple[dict, Callable[[], object], int]] = []  # (row, call, repeats)
    for n in NUM_TOKENS:
        for batch in BATCHES:
            inputs = signals(batch, n, gen)
            cls_q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen)
            keys = torch.randn(batch, HEADS, n + 1, HEAD_DIM, generator=gen)
            with torch.inference_mode():
                kept_ratio = selector.select(inputs, ratio).lengths.float().mean().item()
                kept_adaptive = selector.select(inputs, adaptive).lengths.float().mean().item()
            row = {"n": n, "batch": batch}
            cases += [
                (row | {"stage": "score+select", "kept": kept_ratio}, partial(selector.select, inputs, ratio), repeats),
                (
                    row | {"stage": "adaptive", "kept": kept_adaptive},
                    partial(selector.select, inputs, adaptive),
                    repeats,
                ),
                # ~100x heavier at N=2304, B=8 (75 MB of keys): fewer repeats.
                (row | {"stage": "cls_attention", "kept": math.nan}, partial(cls_attention, cls_q, keys), repeats // 4),
            ]
    samples: list[list[float]] = [[] for _ in cases]
    with torch.inference_mode():
        for _, call, _ in cases:
            for _ in range(warmup):
                call()
        # The repeats of a case are split over ROUNDS sweeps of all cases: a burst of load
        # from other processes then lands on every case alike instead of wrecking one
        # median. Within a sweep a case runs back to back (warm caches, like a node that
        # scores every frame); the first call after switching cases is not timed.
        for _ in range(ROUNDS):
            for (_, call, reps), times in zip(cases, samples, strict=True):
                call()
                for _ in range(max(1, reps // ROUNDS)):
                    start = time.perf_counter_ns()
                    call()
                    times.append((time.perf_counter_ns() - start) / 1e6)
    return [row | summarize(times) for (row, _, _), times in zip(cases, samples, strict=True)]


def target_met(rows: list[dict]) -> bool:
    """Scoring + selection of one N=576 frame under the target."""
    row = next(r for r in rows if r["stage"] == "score+select" and r["n"] == TARGET_N and r["batch"] == 1)
    return row["median_ms"] < TARGET_MS


def render_table(rows: list[dict], title: str) -> Table:
    """Rich table: one line per (stage, N); median and p90 for B=1 and B=8 side by side."""
    table = Table(title=title)
    table.add_column("stage", no_wrap=True, min_width=13)
    table.add_column("N", justify="right")
    table.add_column("K", justify="right")  # tokens kept at B=1 (mean over the batch)
    for batch in BATCHES:
        table.add_column(f"B={batch} ms", justify="right")
        table.add_column(f"B={batch} p90", justify="right")
    table.add_column(f"target < {TARGET_MS:g} ms (N={TARGET_N})", justify="center")
    for stage in STAGES:
        for n in NUM_TOKENS:
            by_batch = {r["batch"]: r for r in rows if r["stage"] == stage and r["n"] == n}
            one = by_batch[1]
            cells = []
            for batch in BATCHES:
                cells += [f"{by_batch[batch]['median_ms']:.3f}", f"{by_batch[batch]['p90_ms']:.3f}"]
            if stage == "score+select" and n == TARGET_N:
                verdict = "[green]PASS[/green]" if one["median_ms"] < TARGET_MS else "[red]FAIL[/red]"
            else:
                verdict = "·"
            kept = "-" if math.isnan(one["kept"]) else f"{one['kept']:.0f}"
            table.add_row(stage, str(n), kept, *cells, verdict)
        table.add_section()
    return table


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Median time vs N (log-log), one line per stage and batch size, the target as a line."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on CI or the robot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    colors = dict(zip(STAGES, ("tab:blue", "tab:orange", "tab:green"), strict=True))
    for stage in STAGES:
        for batch, style in zip(BATCHES, ("-o", "--s"), strict=True):
            pts = sorted((r["n"], r["median_ms"]) for r in rows if r["stage"] == stage and r["batch"] == batch)
            ax.plot(*zip(*pts, strict=True), style, color=colors[stage], label=f"{stage}, B={batch}")
    ax.axhline(TARGET_MS, color="red", linestyle=":", linewidth=1, label=f"target {TARGET_MS:g} ms (N={TARGET_N}, B=1)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(NUM_TOKENS, [str(n) for n in NUM_TOKENS])
    ax.minorticks_off()
    ax.set_xlabel("patch tokens N")
    ax.set_ylabel("median time per call [ms]")
    ax.set_title(title.replace(" - ", "\n"), fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print the table, write JSON + PNG; exit code 0."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few repeats (CI smoke, < 20 s)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: bench/results)")
    # run_all.py passes its arguments to every benchmark; ignore the ones meant for others.
    args, ignored = ap.parse_known_args(argv)
    console = Console()
    if ignored:
        console.print(f"[yellow]ignoring arguments for other benchmarks: {' '.join(ignored)}[/yellow]")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = run(quick=args.quick)
    threads = torch.get_num_threads()
    title = (
        f"ATP core on CPU ({platform.processor() or platform.machine()}, threads={threads}, torch {torch.__version__})"
        f" - keep ratio {KEEP_RATIO}, tau {TAU}, cls_attention H={HEADS} D={HEAD_DIM}"
    )
    console.print(render_table(rows, title))
    passed = target_met(rows)
    console.print(
        f"score+select at N={TARGET_N}, B=1: "
        + ("[green]meets[/green]" if passed else "[red]misses[/red]")
        + f" the < {TARGET_MS:g} ms target"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "quick": args.quick,
        "keep_ratio": KEEP_RATIO,
        "tau": TAU,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "excluded": "joint-space projection of patches and the text tower (inputs are per-patch signals)",
        "wall_s": round(time.perf_counter() - started, 2),
    }
    target = {"n": TARGET_N, "batch": 1, "stage": "score+select", "ms": TARGET_MS, "passed": passed}
    (args.out / "atp_core.json").write_text(json.dumps({"meta": meta, "target": target, "results": rows}, indent=2))
    plot(rows, args.out / "atp_core.png", title)
    console.print(f"wrote {args.out / 'atp_core.json'} and {args.out / 'atp_core.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
