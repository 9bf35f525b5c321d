"""End-to-end latency of the ATP-gated LLaVA pipeline per keep ratio, side by side in one run.

A random LLaVA with real proportions of the *token counts* (336 px / patch 14 -> 576 visual
tokens, LLaVA-1.5's) but small widths so it runs on a CPU: the ratios between keep ratios are
what matter, not the absolute milliseconds. For each keep ratio it reports per-stage medians,
the speed-up of the LLM prefill and of the whole frame against keep-all, the prefill FLOPs
ratio next to the linear ideal (K + text) / (N + text) (FLOPs fall faster: attention is
quadratic), and the share of the ATP step (scoring + selection) in the frame.
Writes ``bench/results/pipeline.json`` and ``bench/results/pipeline.png``.
On a CUDA machine it runs the same on the GPU as a second device.

    PYTHONPATH=atp_ros python bench/bench_pipeline.py [--quick] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from atp_ros.backends import STAGES, AtpConfig, load_backend
from atp_ros.testing.tiny.llava import save_tiny_llava
from atp_ros.warehouse.scenes import render_scene
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

KEEP_RATIOS = (1.0, 0.5, 0.25, 0.1)


def bench_device(model_dir: Path, device: str, repeats: int, max_new_tokens: int) -> list[dict]:
    backend = load_backend(str(model_dir), device=device)
    frames = [render_scene(i, 240, 320).rgb for i in range(repeats)]
    question = "how many boxes are on the floor?"
    configs = {ratio: AtpConfig(enabled=ratio < 1.0, keep_ratio=ratio) for ratio in KEEP_RATIOS}
    for atp in configs.values():  # warm-up every shape once
        backend.answer(frames[:1], question, atp, max_new_tokens)
    runs: dict[float, list] = {ratio: [] for ratio in KEEP_RATIOS}
    # Round-robin over keep ratios per frame: machine noise hits every ratio alike.
    for frame in tqdm(frames, desc=f"{device}: {len(KEEP_RATIOS)} keep ratios per frame"):
        for ratio, atp in configs.items():
            runs[ratio].append(backend.answer([frame], question, atp, max_new_tokens))
    rows = []
    for ratio, results in runs.items():
        first = results[0]
        rows.append(
            {
                "device": device,
                "keep_ratio": ratio,
                "kept": first.visual_tokens_kept[0],
                "total": first.visual_tokens_total[0],
                "text_tokens": first.text_tokens[0],
                "stage_ms": {s: statistics.median(getattr(r.timings, s) for r in results) for s in STAGES},
                "frame_ms": statistics.median(r.timings.total for r in results),
                "llm_prefill_flops": first.flops.get("llm_prefill", 0.0),
                "pipeline_flops": first.flops.get("pipeline", 0.0),
            }
        )
    base = rows[0]
    for row in rows:
        row["prefill_speedup"] = base["stage_ms"]["prefill"] / max(row["stage_ms"]["prefill"], 1e-9)
        row["frame_speedup"] = base["frame_ms"] / max(row["frame_ms"], 1e-9)
        row["prefill_flops_ratio"] = row["llm_prefill_flops"] / max(base["llm_prefill_flops"], 1e-9)
        row["ideal_prefill_ratio"] = (row["kept"] + row["text_tokens"]) / (row["total"] + row["text_tokens"])
        row["atp_share"] = row["stage_ms"]["scoring"] / max(row["frame_ms"], 1e-9)
    return rows


def main() -> None:
    """Measure every keep ratio on each device, print the table, write pipeline.json and pipeline.png."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few repeats (CI smoke)")
    ap.add_argument("--model", default="", help="checkpoint dir (default: random LLaVA, 576 visual tokens)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    repeats = 3 if args.quick else 10
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else _random_llava(Path(tmp) / "llava576")
        rows = [row for dev in devices for row in bench_device(model_dir, dev, repeats, max_new_tokens=8)]
    print_table(rows, repeats)
    (out / "pipeline.json").write_text(json.dumps(rows, indent=2))
    plot(rows, devices, out / "pipeline.png")
    print(f"wrote {out / 'pipeline.json'} and {out / 'pipeline.png'}")


def _random_llava(path: Path) -> Path:
    """A random LLaVA with CLIP-L/336's 576 visual tokens and a small LLM."""
    return save_tiny_llava(
        path, image_size=336, patch_size=14, vision_hidden=128, vision_layers=4, text_hidden=512, text_layers=4
    )


def print_table(rows: list[dict], repeats: int) -> None:
    """Stage latencies, speed-ups and FLOP ratios per device and keep ratio."""
    table = Table(title=f"ATP-gated LLaVA per frame (median of {repeats}; {torch.get_num_threads()} threads)")
    columns = ("device", "keep", "K/N", *[f"{s} ms" for s in STAGES], "frame ms", "prefill x", "frame x",
               "prefill FLOPs", "linear ideal", "ATP share")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["device"],
            f"{r['keep_ratio']:.2f}",
            f"{r['kept']}/{r['total']}",
            *[f"{r['stage_ms'][s]:.1f}" for s in STAGES],
            f"{r['frame_ms']:.1f}",
            f"{r['prefill_speedup']:.2f}",
            f"{r['frame_speedup']:.2f}",
            f"{r['prefill_flops_ratio']:.3f}",
            f"{r['ideal_prefill_ratio']:.3f}",
            f"{100 * r['atp_share']:.1f}% {'ok' if r['atp_share'] < 0.03 else '> 3%'}",
        )
    Console(width=220).print(table)


def plot(rows: list[dict], devices: list[str], path: Path) -> None:
    """Stage latency by keep ratio (stacked) and LLM prefill time / FLOPs vs the linear ideal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for dev in devices:
        dev_rows = [r for r in rows if r["device"] == dev]
        ratios = [r["keep_ratio"] for r in dev_rows]
        bottom = [0.0] * len(dev_rows)
        for stage in STAGES:
            vals = [r["stage_ms"][stage] for r in dev_rows]
            axes[0].bar([f"{dev} {k:.2f}" for k in ratios], vals, bottom=bottom, label=stage if dev == "cpu" else None)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        axes[1].plot(ratios, [r["prefill_flops_ratio"] for r in dev_rows], "o-", label=f"{dev} prefill FLOPs")
        axes[1].plot(ratios, [1 / r["prefill_speedup"] for r in dev_rows], "s--", label=f"{dev} prefill time")
        axes[1].plot(ratios, [r["ideal_prefill_ratio"] for r in dev_rows], "k:", label="linear ideal (K+T)/(N+T)")
    axes[0].set_ylabel("ms per frame")
    axes[0].set_title("stage latency by keep ratio")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("keep ratio")
    axes[1].set_ylabel("relative to keep-all")
    axes[1].set_title("LLM prefill: measured vs ideal")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
