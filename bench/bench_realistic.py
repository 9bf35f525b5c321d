"""Measured latency at realistic widths: what ATP buys per frame, against the ideal the same run allows.

Two random LLaVA checkpoints with real widths (weights random, shapes real), built here once and
kept in ``out/bench/ckpt/``:

* ``clip-l336-qwen2-0.5b``: CLIP ViT-L/14 at 336 px (576 patches, llava-1.5's tower) + a
  Qwen2-0.5B-shaped LLM (24 layers, 896 wide, 14 heads / 2 KV heads, 151,936-token vocabulary);
* ``clip-b224-qwen2-0.5b``: CLIP ViT-B/16 at 224 px (196 patches) + the same LLM;
* ``qwen2.5-vl-vit-qwen2-0.5b``: Qwen2.5-VL's tower at its real shape (32 blocks of 1280, window
  attention, 2x2 merger; the 3B/7B models share it) + the same LLM, as a Qwen2.5-VL checkpoint: the
  640x480 frame is smart_resize'd to 224x308 px (``max_pixels`` 320x240) = 16x22 patches = 88 LLM
  tokens; no text tower (intra-only, as the real family). ``--only NAME`` measures one checkpoint
  (1 new token) and puts its runs into the existing ``realistic.json``.

Unpruned, ATP (alpha 0.5) at keep 0.6 / 0.4 / 0.25 / 0.11 and the random and DivPrune baselines at
0.25 run round-robin, frame by frame (one warm-up round, then ``--rounds``), with
``max_new_tokens`` 1 and 16. Per variant: stage medians (``setup`` is generate()'s own work before
the prefill forward), the measured speed-up of the frame, the *ideal* speed-up from the same run's
stage times (only projector + LLM prefill shrink, by the analytic prefill-FLOPs ratio), their ratio
(target >= 0.9) and ATP scoring's share of the frame (target <= 3%). Peak resident memory per keep
ratio comes from one fresh process per ratio. With CUDA present the GPU runs too (fp16).
Writes ``bench/results/realistic.json`` and ``realistic_stages.png``.

    PYTHONPATH=atp_ros python bench/bench_realistic.py [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from atp_ros.backends import STAGES, AtpConfig, load_backend
from atp_ros.testing.tiny.llava import save_tiny_llava
from atp_ros.testing.tiny.qwen2_5_vl import save_tiny_qwen2_5_vl
from atp_ros.warehouse.scenes import render_scene
from common import RESULTS, stamp
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

CKPT_ROOT = Path("out/bench/ckpt")
QWEN2_05B = {  # Qwen2-0.5B's decoder shape
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 4096,
}
CHECKPOINTS = {
    "clip-l336-qwen2-0.5b": {"image_size": 336, "patch_size": 14, "vision_hidden": 1024, "vision_layers": 24,
                             "vision_overrides": {"intermediate_size": 4096, "num_attention_heads": 16}},
    "clip-b224-qwen2-0.5b": {"image_size": 224, "patch_size": 16, "vision_hidden": 768, "vision_layers": 12,
                             "vision_overrides": {"intermediate_size": 3072, "num_attention_heads": 12}},
}  # fmt: skip
QWEN_CHECKPOINTS = {  # Qwen2.5-VL-3B/7B's tower (real shape) + the Qwen2-0.5B-shaped LLM
    "qwen2.5-vl-vit-qwen2-0.5b": {"patch_size": 14, "vision_hidden": 1280, "vision_layers": 32,
                                  "fullatt_blocks": (7, 15, 23, 31), "window_size": 112, "min_pixels": 56 * 56,
                                  "max_pixels": 320 * 240,
                                  "vision_overrides": {"intermediate_size": 3420, "num_heads": 16}},
}  # fmt: skip
VARIANTS = {
    "full": AtpConfig(enabled=False),
    "atp 0.6": AtpConfig(keep_ratio=0.6),
    "atp 0.4": AtpConfig(keep_ratio=0.4),
    "atp 0.25": AtpConfig(keep_ratio=0.25),
    "atp 0.11": AtpConfig(keep_ratio=0.11),
    "random 0.25": AtpConfig(selector="random", keep_ratio=0.25),
    "divprune 0.25": AtpConfig(selector="divprune", keep_ratio=0.25),
}
QUESTION = "how many boxes are on the top shelf?"


def checkpoint(name: str) -> Path:
    """The random realistic-width checkpoint ``name`` (built on first use, with its CLIP text tower)."""
    path = CKPT_ROOT / name
    if name in QWEN_CHECKPOINTS and not (path / "config.json").is_file():
        print(f"building {name} (random weights, real widths) in {path} ...", flush=True)
        save_tiny_qwen2_5_vl(
            path, text_hidden=896, text_layers=24, with_text_tower=False, text_overrides=QWEN2_05B,
            **QWEN_CHECKPOINTS[name],
        )  # fmt: skip
    if not (path / "config.json").is_file():
        print(f"building {name} (random weights, real widths) in {path} ...", flush=True)
        save_tiny_llava(
            path,
            tower="clip",
            text_model="qwen2",
            text_hidden=896,
            text_layers=24,
            text_overrides=QWEN2_05B,
            **CHECKPOINTS[name],
        )
    return path


def measure(name: str, device: str, rounds: int, max_new_tokens: int) -> list[dict]:
    """Round-robin over the variants, frame by frame; per-variant medians of the rounds after warm-up."""
    backend = load_backend(str(checkpoint(name)), device=device)
    frames = [render_scene(2_000_000 + i, 480, 640).rgb for i in range(rounds + 1)]
    runs: dict[str, list] = {v: [] for v in VARIANTS}
    for i, frame in enumerate(tqdm(frames, desc=f"{name} {device} new={max_new_tokens}", unit="round")):
        for variant, atp in VARIANTS.items():
            res = backend.answer([frame], QUESTION, atp, max_new_tokens)
            if i > 0:  # round 0 warms every shape up
                runs[variant].append(res)
    rows = []
    for variant, results in runs.items():
        first = results[0]
        rows.append(
            {
                "checkpoint": name,
                "device": device,
                "max_new_tokens": max_new_tokens,
                "variant": variant,
                "kept": first.visual_tokens_kept[0],
                "total": first.visual_tokens_total[0],
                "stage_ms": {s: statistics.median(getattr(r.timings, s) for r in results) for s in STAGES},
                "frame_ms": statistics.median(r.timings.total for r in results),
                "llm_prefill_flops": first.flops["llm_prefill"],
                "rounds": len(results),
            }
        )
    full = rows[0]
    prunable = full["stage_ms"]["projector"] + full["stage_ms"]["prefill"]
    for r in rows:
        ratio = r["llm_prefill_flops"] / full["llm_prefill_flops"]
        ideal_ms = full["frame_ms"] - prunable * (1.0 - ratio)
        r["measured_speedup"] = full["frame_ms"] / r["frame_ms"]
        r["ideal_speedup"] = full["frame_ms"] / ideal_ms
        r["of_ideal"] = r["measured_speedup"] / r["ideal_speedup"]
        r["scoring_share"] = r["stage_ms"]["scoring"] / r["frame_ms"]
        r["prefill_flops_ratio"] = ratio
    return rows


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory_probe(name: str, keep: float, device: str) -> None:
    """One process, one keep ratio: load, then answer two frames while a sampler watches the resident
    memory. Prints the process peak (set by loading the weights) and the inference working set (the
    highest RSS during the frames minus the RSS before them, after returning the load's free pages)."""
    import contextlib
    import ctypes
    import gc
    import threading
    import time

    backend = load_backend(str(checkpoint(name)), device=device)
    atp = AtpConfig(enabled=keep < 1.0, keep_ratio=keep)
    frames = [render_scene(2_000_000 + i, 480, 640).rgb for i in range(2)]
    backend.answer(frames[:1], QUESTION, atp, 1)  # first-call allocations (kernels, caches) happen here
    gc.collect()
    with contextlib.suppress(OSError):  # hand the load's freed pages back, so the baseline is real
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline, peak, stop = _rss_mib(), [0.0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for frame in frames:
            backend.answer([frame], QUESTION, atp, 16)
    finally:
        stop.set()
        sampler.join()
    out = {
        "keep_ratio": keep,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "rss_before_frames_mib": baseline,
        "inference_working_set_mib": max(peak[0] - baseline, 0.0),
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0,
    }
    print(json.dumps(out))


def memory(name: str, device: str) -> list[dict]:
    out = []
    for keep in (1.0, 0.6, 0.4, 0.25, 0.11):
        cmd = [sys.executable, __file__, "--memory-probe", str(keep), "--checkpoint", name, "--device", device]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def plot(rows: list[dict], flops: dict | None, path: Path) -> None:
    """Stacked stage times per variant (this machine), and the FLOPs split of llava-1.5-7b (a
    compute-bound GPU's time split) per keep ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    labels = [r["variant"] for r in rows]
    bottom = [0.0] * len(rows)
    for stage in STAGES:
        vals = [r["stage_ms"][stage] / 1e3 for r in rows]
        ax.bar(labels, vals, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_ylabel("seconds per frame")
    ax.set_title(f"{rows[0]['checkpoint']}, {rows[0]['device']}, max_new_tokens={rows[0]['max_new_tokens']}")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=7)
    ax = axes[1]
    if flops:
        sub = [r for r in flops["rows"] if r["model"] == "llava-1.5-7b"]
        labels = [f"keep {r['keep_ratio']:g}" for r in sub]
        bottom = [0.0] * len(sub)
        for part in ("vision_gflops", "scoring_gflops", "projector_gflops", "llm_prefill_gflops"):
            vals = [r[part] / 1e3 for r in sub]
            ax.bar(labels, vals, bottom=bottom, label=part.removesuffix("_gflops"))
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.set_ylabel("TFLOPs per frame")
        ax.set_title("llava-1.5-7b (analytic): where a compute-bound GPU spends the frame")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict]) -> None:
    t = Table(title=f"{rows[0]['checkpoint']} on {rows[0]['device']}, max_new_tokens={rows[0]['max_new_tokens']}")
    for col in ("variant", "K/N", *[f"{s} ms" for s in STAGES], "frame ms", "speed-up", "ideal", "of ideal", "ATP %"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            r["variant"],
            f"{r['kept']}/{r['total']}",
            *[f"{r['stage_ms'][s]:.0f}" for s in STAGES],
            f"{r['frame_ms']:.0f}",
            f"{r['measured_speedup']:.2f}",
            f"{r['ideal_speedup']:.2f}",
            f"{r['of_ideal']:.0%}",
            f"{r['scoring_share']:.1%}",
        )
    Console(width=200).print(t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds after the warm-up round")
    ap.add_argument("--quick", action="store_true", help="only the ViT-B/16 checkpoint, 2 rounds, 1 new token")
    ap.add_argument("--memory-probe", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--only", choices=[*CHECKPOINTS, *QWEN_CHECKPOINTS], help="one checkpoint, merged into the json")
    ap.add_argument("--checkpoint", default="clip-l336-qwen2-0.5b", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe is not None:
        memory_probe(args.checkpoint, args.memory_probe, args.device)
        return 0
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if not torch.cuda.is_available():
        print("no CUDA device here: the GPU part is skipped (it runs the same script on CUDA, fp16)")
    if args.only:
        return merge_one(args.only, devices, args.rounds)
    names = ["clip-b224-qwen2-0.5b"] if args.quick else [*CHECKPOINTS, *QWEN_CHECKPOINTS]
    rounds = 2 if args.quick else args.rounds
    new_tokens = (1,) if args.quick else (1, 16)
    results = []
    for device in devices:
        for name in names:
            for n in new_tokens:
                rows = measure(name, device, rounds, n)
                table(rows)
                results.append(rows)
    mem = {} if args.quick else {d: memory("clip-l336-qwen2-0.5b", d) for d in devices}
    RESULTS.mkdir(parents=True, exist_ok=True)
    flops_file = RESULTS / "flops.json"
    flops = json.loads(flops_file.read_text()) if flops_file.is_file() else None
    suffix = "_quick" if args.quick else ""
    plot(results[0], flops, RESULTS / f"realistic_stages{suffix}.png")  # the first checkpoint, 1 new token
    out = {"meta": stamp() | {"quick": args.quick, "rounds": rounds}, "runs": results, "memory": mem}
    (RESULTS / f"realistic{suffix}.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {RESULTS / f'realistic{suffix}.json'}")
    return 0


def merge_one(name: str, devices: list[str], rounds: int) -> int:
    """Measure ``name`` alone (1 new token) and replace its runs in ``realistic.json`` (the rest stays as measured)."""
    path = RESULTS / "realistic.json"
    out = json.loads(path.read_text()) if path.is_file() else {"meta": stamp(), "runs": [], "memory": {}}
    runs = [rows for rows in out["runs"] if rows[0]["checkpoint"] != name]
    for device in devices:
        rows = measure(name, device, rounds, 1)
        table(rows)
        runs.append(rows)
    out["runs"] = runs
    out["meta"].setdefault("merged", {})[name] = stamp() | {"rounds": rounds}
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
