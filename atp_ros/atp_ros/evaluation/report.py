"""The evaluation's output folder: results.json, results.csv, report.md and PNG plots."""

from __future__ import annotations

import csv
import io
import json
import platform
from pathlib import Path

import numpy as np

from atp_ros.evaluation.files import write_atomic
from atp_ros.evaluation.sweep import quality
from atp_ros.method import KEEP_ALL

CSV_COLUMNS = (
    "setting", "selector", "keep_ratio", "mass", "alpha", "normalization", "perturbation", "reuse", "reuse_rate", "n",
    "accuracy", "accuracy_lo", "accuracy_hi", "fidelity", "fidelity_lo", "fidelity_hi", "evidence_recall",
    "tokens_kept_mean", "tokens_kept_p10", "tokens_kept_p90", "tokens_total", "flops_prefill", "flops_pipeline",
    "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "rss_mb", "peak_rss_mb", "cuda_peak_mb",
)  # fmt: skip


def machine() -> dict:
    """CPU, cores, Python and library versions, the accelerator if any."""
    import torch
    import transformers

    import atp_ros

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "atp_ros": atp_ros.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "",
    }


def _row(r: dict) -> dict:
    s, m = r["setting"], r["summary"]
    mem = r.get("memory", {})
    return {
        "setting": r["name"],
        "selector": s["selector"],
        "keep_ratio": s["keep_ratio"],
        "mass": s.get("mass", 0.0),
        "alpha": s["alpha"],
        "normalization": s["normalization"],
        "perturbation": s["perturbation"],
        "reuse": s.get("reuse", "none"),
        "reuse_rate": m.get("reuse_rate"),
        "n": m["n"],
        "accuracy": m["accuracy"]["mean"],
        "accuracy_lo": m["accuracy"]["ci"][0],
        "accuracy_hi": m["accuracy"]["ci"][1],
        "fidelity": m["fidelity"]["mean"],
        "fidelity_lo": m["fidelity"]["ci"][0],
        "fidelity_hi": m["fidelity"]["ci"][1],
        "evidence_recall": m["evidence_recall"],
        "tokens_kept_mean": m["tokens_kept"]["mean"],
        "tokens_kept_p10": m["tokens_kept"]["p10"],
        "tokens_kept_p90": m["tokens_kept"]["p90"],
        "tokens_total": m["tokens_kept"]["total"],
        "flops_prefill": m["flops_prefill"],
        "flops_pipeline": m["flops_pipeline"],
        "latency_p50_ms": m["latency_ms"]["total"]["p50"],
        "latency_p90_ms": m["latency_ms"]["total"]["p90"],
        "latency_p99_ms": m["latency_ms"]["total"]["p99"],
        "rss_mb": mem.get("rss_mb"),
        "peak_rss_mb": mem.get("peak_rss_mb"),
        "cuda_peak_mb": mem.get("cuda_peak_mb"),
    }


def _fmt(v, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return f"{100 * v:.1f}" if pct else (f"{v:.3g}" if isinstance(v, float) else str(v))


def _tokens(t: dict) -> str:
    """Mean kept / N, with the p10-p90 range when the budget adapts per frame."""
    spread = f" ({t['p10']:.0f}–{t['p90']:.0f})" if t["p10"] != t["p90"] else ""
    return f"{t['mean']:.1f}/{t['total']}{spread}"


def _ci(stat: dict) -> str:
    if stat["mean"] is None:
        return "–"
    lo, hi = stat["ci"]
    return f"{100 * stat['mean']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def write(out: Path, results: dict) -> None:
    """results.json, results.csv (one row per setting), report.md and the plots; each file whole or not at all."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.json", json.dumps(results, indent=1))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(_row(r) for r in results["settings"])
    write_atomic(out / "results.csv", table.getvalue())
    plots = _plots(out, results)
    write_atomic(out / "report.md", _markdown(results, plots))


def _markdown(results: dict, plots: list[str]) -> str:
    meta = results["meta"]
    lines = [f"# ATP replay evaluation: {meta['model']}", ""]
    lines += [f"- source: {meta['source']} ({meta['samples']} samples)"]
    lines += [f"- command: `{meta['command']}`", f"- machine: {json.dumps(meta['machine'])}", f"- date: {meta['date']}"]
    if meta.get("input_problems"):
        lines += ["- input problems (skipped, or no ground truth): " + "; ".join(meta["input_problems"])]
    if not results.get("complete", True):
        lines += ["- **incomplete**: interrupted; the table holds the settings that finished"]
    rec = results.get("recommended")
    metric = results.get("metric", "accuracy")
    lines += ["", "## Recommended operating point", ""]
    if rec:
        m = rec["summary"]
        lines += [
            f"**{rec['name']}**: {metric} {_ci(m[metric])} (reference {_fmt(results.get('reference_quality'), True)}),"
            f" {m['tokens_kept']['mean']:.1f}/{m['tokens_kept']['total']} visual tokens,"
            f" p50 {m['latency_ms']['total']['p50']:.1f} ms per frame — the setting with the fewest visual tokens"
            f" within {100 * meta['tolerance']:.1f} points of the unpruned model"
            " (ties: higher quality, then lower latency).",
        ]
    else:
        lines += [f"No pruned setting came within {100 * meta['tolerance']:.1f} points of the unpruned {metric}."]
    lines += ["", "## Settings", ""]
    lines += [
        "Latency is measured setting after setting on this machine; for speed-ups measured side by side",
        "(interleaved rounds) use `make bench`. Fidelity: agreement with the unpruned answer to the same input.",
        "",
    ]
    head = "| setting | accuracy % [95% CI] | fidelity % [95% CI] | evidence recall % | tokens kept | "
    head += "prefill GFLOPs | p50 / p90 / p99 ms |"
    lines += [head, "|" + " --- |" * 7]
    for r in results["settings"]:
        if r["setting"]["perturbation"]:
            continue
        m = r["summary"]
        lat = m["latency_ms"]["total"]
        name = r["name"] + (f" ({m['reuse_rate']:.0%} reused)" if m.get("reuse_rate") is not None else "")
        lines.append(
            f"| {name} | {_ci(m['accuracy'])} | {_ci(m['fidelity'])} | {_fmt(m['evidence_recall'], True)} | "
            f"{_tokens(m['tokens_kept'])} | {m['flops_prefill'] / 1e9:.3f} | "
            f"{lat['p50']:.1f} / {lat['p90']:.1f} / {lat['p99']:.1f} |"
        )
    if results.get("robustness"):
        lines += ["", "## Robustness (accuracy and fidelity change vs clean input, points)", ""]
        lines += ["| perturbation | full acc Δ | ATP acc Δ | full fid Δ | ATP fid Δ |", "|" + " --- |" * 5]
        for r in results["robustness"]:
            lines.append(
                f"| {r['perturbation']} | {_fmt(r['full']['accuracy_delta'], True)} | "
                f"{_fmt(r['atp']['accuracy_delta'], True)} | {_fmt(r['full']['fidelity_delta'], True)} | "
                f"{_fmt(r['atp']['fidelity_delta'], True)} |"
            )
    if results.get("live"):
        lv = results["live"]
        lines += ["", "## Live replay through the node over DDS", ""]
        lines += [f"- {k}: {v}" for k, v in lv.items() if not isinstance(v, (dict, list))]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _plots(out: Path, results: dict) -> list[str]:
    """The report's PNG plots in ``out``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean = [r for r in results["settings"] if not r["setting"]["perturbation"]]
    ref = next((r for r in clean if r["setting"]["selector"] == KEEP_ALL), None)
    written = [_plot_quality_vs_keep(plt, out, clean, ref), _plot_pareto(plt, out, results, clean, ref)]
    if results.get("robustness"):
        written.append(_plot_robustness(plt, out, results))
    if (out / "overlays.png").is_file():
        written.append("overlays.png")
    return written


def _save(plt, fig, out: Path, name: str) -> str:
    """``fig`` laid out and written to ``out/name``, then closed; returns ``name``."""
    fig.tight_layout()
    write_atomic(out / name, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return name


def _plot_quality_vs_keep(plt, out: Path, clean: list[dict], ref: dict | None) -> str:
    """Accuracy and fidelity vs keep ratio, one line per selector (ATP per alpha)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, name in zip(axes, ("accuracy", "fidelity"), strict=True):
        lines: dict[str, list] = {}
        for r in clean:
            s = r["setting"]
            if s["selector"] == KEEP_ALL or r["summary"][name]["mean"] is None:
                continue
            label = f"ATP a={s['alpha']:g}" if s["selector"] == "atp" else s["selector"]
            label += f" {s['normalization']}" if s["normalization"] != "minmax" else ""
            x = s["keep_ratio"]
            if s.get("mass"):  # adaptive: at the keep ratio it reached on average
                label += " adaptive"
                x = r["summary"]["tokens_kept"]["mean"] / r["summary"]["tokens_kept"]["total"]
            lines.setdefault(label, []).append((x, r["summary"][name]["mean"]))
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # up to 20 distinct lines (ATP alphas + baselines)
        for label, pts in sorted(lines.items()):
            pts.sort()
            style = {"marker": "o", "ls": "-"} if label.startswith("ATP") else {"marker": "s", "ls": "--"}
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
        if ref and ref["summary"][name]["mean"] is not None:
            ax.axhline(ref["summary"][name]["mean"], color="k", ls="--", lw=1, label="unpruned")
        ax.set_xlabel("keep ratio (adaptive: mean kept share)")
        ax.set_ylabel(name)
        ax.set_title(f"{name} vs keep ratio")
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=7)
    return _save(plt, fig, out, "quality_vs_keep.png")


def _plot_pareto(plt, out: Path, results: dict, clean: list[dict], ref: dict | None) -> str:
    """Quality vs p50 latency: the Pareto front, the recommended setting starred."""
    metric = results.get("metric", "accuracy")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    pts = [(r["summary"]["latency_ms"]["total"]["p50"], quality(r["summary"])[1], r) for r in clean]
    pts = [p for p in pts if p[1] is not None]
    for t, q, r in pts:
        ax.scatter(t, q, s=18, color="tab:blue" if r["setting"]["selector"] == "atp" else "tab:gray")
    front = results.get("pareto", [])
    if front:
        ax.plot([f["latency_p50_ms"] for f in front], [f["quality"] for f in front], color="tab:orange", lw=1.5)
    rec = results.get("recommended")
    if rec:
        ax.scatter(
            rec["summary"]["latency_ms"]["total"]["p50"],
            quality(rec["summary"])[1],
            s=140,
            marker="*",
            color="tab:red",
            label=f"recommended: {rec['name']}",
            zorder=5,
        )
    if ref:
        ax.scatter(ref["summary"]["latency_ms"]["total"]["p50"], quality(ref["summary"])[1], marker="s", color="k")
        ax.annotate("unpruned", (ref["summary"]["latency_ms"]["total"]["p50"], quality(ref["summary"])[1]))
    ax.set_xlabel("p50 latency per frame (ms)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs latency (blue: ATP, gray: baselines, orange: Pareto front)", fontsize=9)
    ax.grid(alpha=0.3)
    if rec:
        ax.legend(fontsize=7)
    return _save(plt, fig, out, "pareto.png")


def _plot_robustness(plt, out: Path, results: dict) -> str:
    """Per perturbation, the change vs clean input of the unpruned run and the robustness ATP setting."""
    metric = results.get("metric", "accuracy")
    rob = results["robustness"]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rob)), 4))
    x = np.arange(len(rob))
    key = f"{metric}_delta"
    full = [100 * (r["full"][key] or 0) for r in rob]
    atp = [100 * (r["atp"][key] or 0) for r in rob]
    ax.bar(x - 0.2, full, 0.4, label="unpruned")
    ax.bar(x + 0.2, atp, 0.4, label=results.get("robust_setting", "ATP"))
    ax.set_xticks(x, [r["perturbation"] for r in rob], rotation=30, ha="right", fontsize=7)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel(f"{metric} change (points)")
    ax.set_title("robustness: change vs clean input")
    ax.legend(fontsize=7)
    return _save(plt, fig, out, "robustness.png")


def overlay_grid(out: Path, shots: list[tuple[np.ndarray, str, str, str]], title: str = "") -> None:
    """A grid of keep-mask overlays (the paper's Figure 3): ``(overlay rgb, question, answer, truth)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not shots:
        return
    cols = min(3, len(shots))
    rows = (len(shots) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, question, answer, truth) in zip(axes.flat, shots, strict=False):
        ax.imshow(img)
        ax.set_title(f"{question}\n-> {answer!r}" + (f" (truth {truth!r})" if truth else ""), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    write_atomic(out / "overlays.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
