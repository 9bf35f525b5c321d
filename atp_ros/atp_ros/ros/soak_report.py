"""The soak's figures and reports: PASS/FAIL per target from what :mod:`atp_ros.ros.soak` recorded,
``soak.md`` (table + PASS/FAIL lines) and ``soak.png`` (RSS over time, answers per window). No ROS imports."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

# Frames that can sit between the worker's counters at one diagnostics reading while frames
# stream: one counted as received but not yet in the slot (put_frame counts first), one in the
# one-frame slot, one taken by the worker and not yet counted as processed. The reading is not
# atomic (counters first, then the slot's dropped count), so a replacement between the two reads
# shows as -1. Once the stream stops and the worker is idle, the difference is exactly 0.
PENDING_MIN, PENDING_MAX = -1, 3


def pending(sample: dict[str, Any]) -> float:
    """Frames counted as received but not (yet) processed, dropped, skipped or failed."""
    errors = sum(v for k, v in sample.items() if k.startswith("errors.") and v is not None)
    return (
        sample.get("frames_received", 0)
        - sample.get("frames_processed", 0)
        - sample.get("frames_dropped", 0)
        - sample.get("frames_skipped_no_query", 0)
        - errors
    )


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _value_at(series: list[tuple[float, float]], t: float) -> tuple[float, float] | None:
    """The first (time, value) at or after ``t``, else None."""
    return next(((s, v) for s, v in series if s >= t and v is not None), None)


def analyse(args: argparse.Namespace, record: Any, ended: dict[str, Any]) -> dict[str, Any]:
    """Figures and PASS/FAIL per target from what was recorded (a :class:`atp_ros.ros.soak.Record`)."""
    duration = ended.get("stream_s") or record.now()
    diags = [d for d in record.diagnostics if d["t"] <= duration]
    final = ended.get("idle") or (diags[-1] if diags else {})
    answers = [a for a in record.answers if a[0] <= duration + 15]
    steady = [a for a in answers if args.warmup_s <= a[0] <= duration]
    per_window = _answers_per_window(answers, duration, args.window_s)
    memory = _memory(args, diags, [(t, v) for t, v in record.proc_rss if t <= duration])
    rate = _rate(args, diags, steady)
    pend = [(d["t"], pending(d)) for d in diags if d.get("frames_received") is not None]
    targets = _targets(args, memory, ended, per_window, pend, final, rate)
    received = final.get("frames_received")
    per_minute = [n * 60.0 / args.window_s for n in per_window]
    lat = [a[1] for a in steady]
    return {
        "meta": _meta(args),
        "duration_s": round(duration, 2),
        "frames_sent": record.sent,
        "publisher_late_ticks": record.late_ticks,
        "frames_received": received,
        "frames_lost_in_transport": record.sent - received if received is not None else None,
        "frames_processed": final.get("frames_processed"),
        "frames_dropped": final.get("frames_dropped"),
        "frames_skipped_no_query": final.get("frames_skipped_no_query", 0),
        "errors": {k: v for k, v in final.items() if k.startswith("errors.")},
        "received_per_s": received / duration if received else None,
        "processed_per_s_steady": rate["processed_per_s"],
        "drop_fraction": final.get("frames_dropped") / received if received else None,
        "received_per_s_steady": rate["received_per_s"],
        "inference_ms_mean": rate["inference_mean"],
        "busy_p50": rate["busy_p50"],
        "busy_mean": rate["busy_mean"],
        "processed_of_capacity": rate["of_capacity"],
        "answers": len(answers),
        "answers_per_window": per_window,
        "answers_per_min": per_minute,
        "answers_per_min_min": min(per_minute),
        "answers_per_min_median": statistics.median(per_minute),
        "inference_ms_p50": rate["inference_p50"],
        "inference_ms_p95": _pct(rate["inference"], 95),
        "latency_ms_p50": _pct(lat, 50),
        "latency_ms_p95": _pct(lat, 95),
        "node_stage_ms_p50": {k[: -len("_ms_p50")]: v for k, v in final.items() if k.endswith("_ms_p50")},
        "node_stage_ms_p95": {k[: -len("_ms_p95")]: v for k, v in final.items() if k.endswith("_ms_p95")},
        "memory": memory,
        "load_avg_1min": _spread([v for _, v in record.load]),
        "node": ended,
        "crashes": 0 if targets["crashes"]["pass"] else 1,
        "targets": targets,
        "pass": all(t["pass"] for t in targets.values()),
        "series": _series(record, diags, answers),
    }


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    """The machine, the date and the run's settings."""
    from atp_ros.evaluation.report import machine

    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), **machine()} | {
        "model": args.model,
        "max_new_tokens": args.max_new_tokens,
        "rate_hz": args.rate,
        "frame": f"{args.width}x{args.height} rgb8",
        "scenes": args.scenes,
        "transport": args.transport,
        "discovery_range": args.discovery_range,
        "ros_domain_id": os.environ.get("ROS_DOMAIN_ID"),
        "warmup_s": args.warmup_s,
        "window_s": args.window_s,
        "query_every_s": args.query_every_s,
    }


def _answers_per_window(answers: list[tuple], duration: float, window_s: float) -> list[int]:
    """Answers in each ``window_s`` window of the stream."""
    n_windows = max(round(duration / window_s), 1)
    per_window = [0] * n_windows
    for t, *_ in answers:
        k = int(t // window_s)
        if k < n_windows:
            per_window[k] += 1
    return per_window


def _memory(args: argparse.Namespace, diags: list[dict], proc_rss: list[tuple[float, float]]) -> dict[str, Any]:
    """The node's own RSS figure and /proc's, at the end of warm-up and at the end of the stream, and the trend."""
    diag_rss = [(d["t"], d.get("memory_rss_mb")) for d in diags if d.get("memory_rss_mb") is not None]
    memory: dict[str, Any] = {}
    for name, series in (("diagnostics", diag_rss), ("proc", proc_rss)):
        warm = _value_at(series, args.warmup_s)
        end = series[-1] if series else None
        after = [(t, v) for t, v in series if t >= args.warmup_s]
        slope = float(np.polyfit(*zip(*after, strict=True), 1)[0]) * 60 if len(after) > 2 else None
        memory[name] = {
            "warmup_t_s": warm[0] if warm else None,
            "warmup_mb": warm[1] if warm else None,
            "end_t_s": end[0] if end else None,
            "end_mb": end[1] if end else None,
            "max_after_warmup_mb": max(v for _, v in after) if after else None,
            "growth": (end[1] - warm[1]) / warm[1] if warm and end else None,
            "slope_mb_per_min": slope,
        }
    return memory


def _rate(args: argparse.Namespace, diags: list[dict], steady: list[tuple]) -> dict[str, Any]:
    """Processed frames per second over the steady part vs the inference time per frame."""
    steady_diags = [d for d in diags if d["t"] >= args.warmup_s and d.get("frames_processed") is not None]
    processed_per_s = received_per_s = None
    if len(steady_diags) > 1:
        a, b = steady_diags[0], steady_diags[-1]
        processed_per_s = (b["frames_processed"] - a["frames_processed"]) / (b["t"] - a["t"])
        received_per_s = (b["frames_received"] - a["frames_received"]) / (b["t"] - a["t"])
    inference = [a[2] for a in steady]
    inf_p50 = _pct(inference, 50)
    inf_mean = float(np.mean(inference)) if inference else None
    capacity = min(received_per_s, 1000 / inf_mean) if received_per_s and inf_mean else None
    return {
        "processed_per_s": processed_per_s,
        "received_per_s": received_per_s,
        "inference": inference,
        "inference_p50": inf_p50,
        "inference_mean": inf_mean,
        "busy_p50": processed_per_s * inf_p50 / 1000 if processed_per_s and inf_p50 else None,
        "busy_mean": processed_per_s * inf_mean / 1000 if processed_per_s and inf_mean else None,
        "of_capacity": processed_per_s / capacity if processed_per_s and capacity else None,
    }


def _targets(args, memory: dict, ended: dict, per_window: list[int], pend: list, final: dict, rate: dict) -> dict:
    """PASS/FAIL and why, per target (see :mod:`atp_ros.ros.soak`)."""
    out_of_range = [(t, p) for t, p in pend if not PENDING_MIN <= p <= PENDING_MAX]
    growth = [memory[n]["growth"] for n in memory]
    busy_mean, of_capacity, inf_mean = rate["busy_mean"], rate["of_capacity"], rate["inference_mean"]
    return {
        "memory": {
            "pass": all(g is not None and g <= args.max_growth for g in growth),
            "why": "RSS growth after warm-up "
            + ", ".join(f"{n} {_fmt_pct(memory[n]['growth'])}" for n in memory)
            + f" (at most {args.max_growth:.0%})",
        },
        "crashes": {
            "pass": ended.get("died_at_s") is None
            and bool(ended.get("alive_before_sigint"))
            and ended.get("exit_code") == 0
            and not ended.get("aborted"),
            "why": (
                ended["aborted"]
                or (f"node died at {ended['died_at_s']} s" if ended.get("died_at_s") is not None else "")
                or f"alive until SIGINT, exit code {ended.get('exit_code')} after {ended.get('exit_s')} s"
                + (" (killed: did not exit within 10 s)" if ended.get("killed") else "")
            ),
        },
        "answers": {
            "pass": bool(per_window) and min(per_window) > 0,
            "why": f"answers per {args.window_s:g}-s window: min {min(per_window)}, all {per_window}",
        },
        "counters": {
            "pass": bool(pend) and not out_of_range and final.get("pending") == 0,
            "why": f"received - processed - dropped - skipped - errors: in [{PENDING_MIN}, {PENDING_MAX}] in "
            f"{len(pend) - len(out_of_range)}/{len(pend)} readings while streaming"
            + (f" (outside: {out_of_range[:5]})" if out_of_range else "")
            + f", {final.get('pending')} once idle (must be 0)",
        },
        "rate": {
            # 1.02: the counters' window (diagnostics) and the answers' window differ by up to a second
            "pass": busy_mean is not None
            and of_capacity is not None
            and busy_mean <= 1.02
            and of_capacity >= args.min_busy,
            "why": f"processed {_fmt(rate['processed_per_s'], '.2f')}/s x mean inference {_fmt(inf_mean, '.0f')} ms "
            f"= {_fmt(busy_mean, '.2f')} of the time inferring (at most 1); {_fmt(of_capacity, '.2f')} of "
            f"min(received {_fmt(rate['received_per_s'], '.1f')}/s, 1000/mean inference "
            f"{_fmt(1000 / inf_mean if inf_mean else None, '.1f')}/s) (at least {args.min_busy:g}); "
            f"by the p50 ({_fmt(rate['inference_p50'], '.0f')} ms): {_fmt(rate['busy_p50'], '.2f')}",
        },
    }


def _spread(values: list[float]) -> dict[str, float | None]:
    return {
        "min": min(values, default=None),
        "median": statistics.median(values) if values else None,
        "max": max(values, default=None),
    }


def _series(record: Any, diags: list[dict], answers: list[tuple]) -> dict[str, Any]:
    return {
        "diagnostics": [_slim(d) for d in diags],
        "proc_rss_mb": record.proc_rss,
        "load_avg_1min": record.load,
        "answers": {
            "t_s": [round(a[0], 2) for a in answers],
            "latency_ms": [round(a[1], 1) for a in answers],
            "inference_ms": [round(a[2], 1) for a in answers],
        },
        "queries": record.queries,
    }


# What the per-second series keeps of each diagnostics reading (the stage percentiles are in the
# final reading, ``node.idle``; every second of them would make soak.json several times larger).
SERIES_KEYS = ("t", "level", "lifecycle_state", "memory_rss_mb", "in_flight_ms", "latency_ms_p50", "total_ms_p50")


def _slim(sample: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in sample.items() if k in SERIES_KEYS or k.startswith(("frames_", "errors."))}


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _fmt_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1%}"


# ---------------------------------------------------------------------------------------------- reports


def write_markdown(path: Path, fig: dict[str, Any]) -> None:
    """``soak.md``: the table and one PASS/FAIL line per target."""
    m = fig["meta"]
    mem_d, mem_p = fig["memory"]["diagnostics"], fig["memory"]["proc"]
    node = fig["node"]
    load = fig["load_avg_1min"]
    f = fig
    lost = f["frames_lost_in_transport"]
    rows = [
        ("duration", f"{f['duration_s'] / 60:.1f} min ({f['duration_s']:.0f} s) at {m['rate_hz']:g} Hz"),
        ("frames sent", f"{f['frames_sent']} ({f['publisher_late_ticks']} sends over a period late)"),
        (
            "frames received",
            f"{f['frames_received']:.0f} ({_fmt(f['received_per_s_steady'], '.1f')}/s after warm-up; "
            f"lost in transport: {_fmt(lost, '.0f')})",
        ),
        ("frames processed", f"{f['frames_processed']:.0f} ({_fmt(f['processed_per_s_steady'], '.2f')}/s steady)"),
        ("frames dropped (newest frame wins)", f"{f['frames_dropped']:.0f} ({_fmt(f['drop_fraction'], '.1%')})"),
        ("frames skipped (no query)", f"{f['frames_skipped_no_query']:.0f}"),
        ("errors", ", ".join(f"{k} {v:.0f}" for k, v in f["errors"].items()) or "none"),
        ("answers", f"{f['answers']}"),
        ("answers/min min / median", f"{f['answers_per_min_min']:.0f} / {f['answers_per_min_median']:.0f}"),
        ("inference p50 / p95", f"{_fmt(f['inference_ms_p50'], '.0f')} / {_fmt(f['inference_ms_p95'], '.0f')} ms"),
        ("inference mean", f"{_fmt(f['inference_ms_mean'], '.0f')} ms"),
        (
            "latency (receipt to answer) p50 / p95",
            f"{_fmt(f['latency_ms_p50'], '.0f')} / {_fmt(f['latency_ms_p95'], '.0f')} ms",
        ),
        (
            "worker time inferring: processed/s x mean inference (x p50)",
            f"{_fmt(f['busy_mean'], '.2f')} ({_fmt(f['busy_p50'], '.2f')})",
        ),
        ("processed/s over min(received/s, 1000/mean inference)", _fmt(f["processed_of_capacity"], ".2f")),
        (
            f"RSS after warm-up ({m['warmup_s']:g} s), diagnostics / /proc",
            f"{_fmt(mem_d['warmup_mb'], '.0f')} / {_fmt(mem_p['warmup_mb'], '.1f')} MB",
        ),
        ("RSS at end, diagnostics / /proc", f"{_fmt(mem_d['end_mb'], '.0f')} / {_fmt(mem_p['end_mb'], '.1f')} MB"),
        ("RSS growth, diagnostics / /proc", f"{_fmt_pct(mem_d['growth'])} / {_fmt_pct(mem_p['growth'])}"),
        ("RSS trend after warm-up (/proc, linear fit)", f"{_fmt(mem_p['slope_mb_per_min'], '+.2f')} MB/min"),
        ("crashes", f"{f['crashes']}"),
        ("exit code after SIGINT", f"{node.get('exit_code')}"),
        ("seconds to exit", _fmt(node.get("exit_s"), ".2f")),
        (
            "machine load (1-min average) min / median / max",
            f"{_fmt(load['min'], '.1f')} / {_fmt(load['median'], '.1f')} / {_fmt(load['max'], '.1f')} "
            f"on {m.get('cores', '?')} cores",
        ),
    ]
    lines = [
        "# Soak: the atp_vlm node under a camera stream",
        "",
        f"_{m['date']}, {m.get('cpu', '?')}, {m.get('cores', '?')} cores; {m['model']}, "
        f"max_new_tokens={m['max_new_tokens']}, "
        f"{m['frame']} at {m['rate_hz']:g} Hz over Fast DDS {m['transport']}, {m['scenes']} scenes cycled, "
        f"question changed every {m['query_every_s']:g} s_",
        "",
        "| figure | value |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in rows),
        "",
    ]
    for name, t in fig["targets"].items():
        lines.append(f"- **{'PASS' if t['pass'] else 'FAIL'}** {name}: {t['why']}")
    lines += ["", f"**{'PASS' if fig['pass'] else 'FAIL'}**", "", "![soak](soak.png)", ""]
    path.write_text("\n".join(lines))


def write_plot(path: Path, fig: dict[str, Any]) -> None:
    """``soak.png``: RSS over time (node's figure and /proc, warm-up and the growth limit) and answers per window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = fig["series"]
    m = fig["meta"]
    diag = [(d["t"], d["memory_rss_mb"]) for d in series["diagnostics"] if d.get("memory_rss_mb") is not None]
    f, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    if diag:
        ax1.plot([t / 60 for t, _ in diag], [v for _, v in diag], lw=1, label="memory_rss_mb (/diagnostics, 1 Hz)")
    if series["proc_rss_mb"]:
        t, v = zip(*series["proc_rss_mb"], strict=True)
        ax1.plot([x / 60 for x in t], v, ".", ms=3, label="VmRSS (/proc, every 5 s)")
    warm = fig["memory"]["proc"]["warmup_mb"] or fig["memory"]["diagnostics"]["warmup_mb"]
    ax1.axvline(m["warmup_s"] / 60, color="gray", ls=":", label=f"end of warm-up ({m['warmup_s']:g} s)")
    if warm:
        ax1.axhline(warm * (1 + 0.05), color="red", ls="--", lw=1, label="warm-up RSS + 5%")
    ax1.set_ylabel("node RSS (MB)")
    ax1.legend(fontsize=8, loc="lower right")
    ax1.set_title(
        f"soak: {m['model']}, {m['frame']} at {m['rate_hz']:g} Hz, {fig['duration_s'] / 60:.1f} min "
        f"({'PASS' if fig['pass'] else 'FAIL'})",
        fontsize=10,
    )
    w = m["window_s"]
    per_min = fig["answers_per_min"]
    ax2.bar([(i + 0.5) * w / 60 for i in range(len(per_min))], per_min, width=0.8 * w / 60, color="tab:green")
    ax2.set_ylabel(f"answers / min ({w:g}-s windows)")
    ax2.set_xlabel("minutes since the stream started")
    f.tight_layout()
    f.savefig(path, dpi=100)
    plt.close(f)
