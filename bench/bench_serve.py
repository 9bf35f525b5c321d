"""Ray Serve with dynamic batching: throughput and latency vs the number of camera streams.

One local Ray instance (this machine's cores) runs the atp-serve deployment: one replica with
every core (torch threads). Each camera stream is a client thread with its own
``RemoteBackend`` -- a node whose camera always has a newer frame, so its next request leaves
as soon as its answer arrives (closed loop, the node's newest-frame-wins). Streams 1, 2, 4, 8,
each with batching on (``max_batch_size`` 8, 10 ms wait) and off (``max_batch_size`` 1); the
batching settings change in place (Serve's ``user_config``, no model reload). Per run: answers
per second, client-side latency p50 / p99 (request sent to answer back, queueing included) and
the batch sizes Ray formed (the replica's own histogram). Models: the bundled warehouse-tiny
and the realistic-width random checkpoint of ``bench_realistic.py`` (CLIP ViT-B/16-224 + a
Qwen2-0.5B-shaped LLM, built once into ``out/bench/ckpt/``). Frames are 640x480, ATP keep 0.25.

Also the bytes per frame of a split deployment (ViT + ATP on the robot, the kept embeddings
sent to an LLM engine): all N vs K kept at the node's default keep ratio, for warehouse-tiny and
llava-1.5-7b, against the frame as JPEG and raw.

Writes ``bench/results/serve.json`` and ``serve.png`` (``--quick``: fewer requests, ``_quick``).

    PYTHONPATH=atp_ros python bench/bench_serve.py [--quick] [--requests 24]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from atp_ros.backends import AtpConfig, resolve_model_id
from atp_ros.ros.params import PARAMS
from atp_ros.serving.client import RemoteBackend
from atp_ros.serving.cluster import cluster_address, shutdown, start_ray
from atp_ros.serving.config import ServeConfig
from atp_ros.serving.payload import embedding_payload
from atp_ros.serving.server import deploy
from atp_ros.serving.wire import encode_image
from atp_ros.warehouse.scenes import questions_for_scene, render_scene, split_seed
from common import RESULTS, stamp
from rich.console import Console
from rich.table import Table

APP = "atp_vlm_bench"
STREAMS = (1, 2, 4, 8)
MODES = {"on": (8, 0.01), "off": (1, 0.0)}  # batching: (max_batch_size, batch_wait_timeout_s)
ATP = AtpConfig(keep_ratio=0.25)
MAX_NEW_TOKENS = 4
REALISTIC = "clip-b224-qwen2-0.5b"  # the cheaper of bench_realistic's two checkpoints: 8 streams fit in minutes
ARCHS = Path(__file__).parent / "archs"


def frames(count: int) -> list[tuple[np.ndarray, str]]:
    """Distinct 640x480 test-split frames with one question each."""
    out = []
    for i in range(count):
        scene = render_scene(split_seed("test", 800_000 + i), 480, 640)
        out.append((scene.rgb, questions_for_scene(scene, np.random.default_rng(i), 1)[0].question))
    return out


def batch_stats(before: dict[int, int], after: dict[int, int]) -> dict[int, int]:
    """The replica's batch-size histogram of one run (its counters after minus before)."""
    return {size: n - before.get(size, 0) for size, n in after.items() if n - before.get(size, 0) > 0}


def run_streams(address: str, streams: int, requests: int, pool: list[tuple[np.ndarray, str]]) -> dict:
    """``streams`` closed-loop clients sending ``requests`` each; throughput, latency, batch sizes."""
    clients = [RemoteBackend(address, APP, timeout_s=600) for _ in range(streams)]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def stream(s: int, count: int, record: bool) -> None:
        for r in range(count):
            rgb, q = pool[(s * requests + r) % len(pool)]
            t0 = time.perf_counter()
            try:
                clients[s].answer([rgb], q, ATP, MAX_NEW_TOKENS)
            except Exception as err:  # a failed request is reported, never retried
                errors.append(f"{type(err).__name__}: {err}")
                continue
            if record:
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1e3)

    def burst(count: int, record: bool) -> float:
        threads = [threading.Thread(target=stream, args=(s, count, record), daemon=True) for s in range(streams)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0

    burst(1, record=False)  # warm-up: connections, this batch shape
    handle = clients[0].connect()
    before = handle.stats.remote().result(timeout_s=60)["batch_sizes"]
    wall = burst(requests, record=True)
    sizes = batch_stats(before, handle.stats.remote().result(timeout_s=60)["batch_sizes"])
    batches = sum(sizes.values())
    return {
        "streams": streams,
        "requests": len(latencies),
        "errors": errors[:3],
        "wall_s": wall,
        "answers_per_s": len(latencies) / wall,
        "latency_ms_p50": float(np.percentile(latencies, 50)) if latencies else None,
        "latency_ms_p99": float(np.percentile(latencies, 99)) if latencies else None,
        "batch_sizes": {str(k): v for k, v in sorted(sizes.items())},
        "mean_batch": sum(k * v for k, v in sizes.items()) / batches if batches else 0.0,
    }


def measure(label: str, model_id: str, requests: int, pool: list, console: Console) -> list[dict]:
    """Every (streams, batching mode) run of one model, on one deployment reconfigured in place.

    First a warm-up of every stream count with batching on (first calls of each batch shape are
    slow); then the modes alternate per stream count, so drift and other load hit both alike.
    """
    cores = os.cpu_count() or 1
    cfg = ServeConfig(app=APP, model_id=model_id, device="cpu", num_cpus=float(cores), max_ongoing_requests=16)
    configs = {mode: replace(cfg, max_batch_size=b, batch_wait_timeout_s=w) for mode, (b, w) in MODES.items()}
    deploy(configs["on"])
    for streams in STREAMS:
        run_streams(cluster_address(), streams, 1, pool)
    rows = []
    for streams in STREAMS:
        for mode in ("off", "on"):
            deploy(configs[mode])  # only user_config differs: the replica is reconfigured, not reloaded
            c = configs[mode]
            row = {"model": label, "batching": mode, "max_batch_size": c.max_batch_size}
            row |= {"batch_wait_ms": c.batch_wait_timeout_s * 1e3}
            row |= run_streams(cluster_address(), streams, requests, pool)
            console.print(
                f"{label} batching {mode} streams {streams}: {row['answers_per_s']:.2f} answers/s, "
                f"p50 {row['latency_ms_p50']:.0f} ms p99 {row['latency_ms_p99']:.0f} ms, batches {row['batch_sizes']}"
            )
            rows.append(row)
    return sorted(rows, key=lambda r: (r["batching"] == "off", r["streams"]))  # batching on first


# ----------------------------------------------------------------------------- split deployment bytes


def llava_dims(config: dict) -> tuple[int, int]:
    """(visual tokens N, width after the projector) of a LLaVA config: patches of the tower, the LLM's width."""
    vision = config["vision_config"]
    side = int(vision["image_size"]) // int(vision["patch_size"])
    return side * side, int(config["text_config"]["hidden_size"])


def payload_rows(keep_ratio: float) -> dict:
    """Bytes per frame sent to a remote LLM: embeddings of all N vs the K kept, vs the frame itself."""
    configs = {
        "warehouse-tiny": json.loads(Path(resolve_model_id("warehouse-tiny"), "config.json").read_text()),
        "llava-1.5-7b": json.loads((ARCHS / "llava-1.5-7b.json").read_text()),
    }
    sample = [render_scene(split_seed("test", 900_000 + i), 480, 640).rgb for i in range(8)]
    jpeg = float(np.mean([len(encode_image(f, "jpeg", 90)) for f in sample]))
    rows = []
    for name, config in configs.items():
        n, width = llava_dims(config)
        full, kept = embedding_payload(n, width), embedding_payload(n, width, keep_ratio)
        rows.append(
            {
                "model": name,
                "tokens": n,
                "width": width,
                "kept": kept.tokens,
                "all_bytes": full.total,
                "kept_bytes": kept.total,
                "kept_vs_all": kept.total / full.total,
                "kept_vs_jpeg": kept.total / jpeg,
            }
        )
    return {"keep_ratio": keep_ratio, "jpeg_q90_bytes": jpeg, "raw_rgb_bytes": 480 * 640 * 3, "rows": rows}


# ----------------------------------------------------------------------------- output


def plot(rows: list[dict], path: Path) -> None:
    """Per model: answers/s vs streams, and latency p50 (solid) / p99 (dashed), batching on vs off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.6 * len(models)), squeeze=False)
    for (ax_tp, ax_lat), model in zip(axes, models, strict=True):
        for mode, color in (("on", "tab:blue"), ("off", "tab:orange")):
            sub = [r for r in rows if r["model"] == model and r["batching"] == mode]
            xs = [r["streams"] for r in sub]
            label = f"batching {mode}" + (f" (<= {sub[0]['max_batch_size']})" if sub else "")
            ax_tp.plot(xs, [r["answers_per_s"] for r in sub], "o-", color=color, label=label)
            ax_lat.plot(xs, [r["latency_ms_p50"] for r in sub], "o-", color=color, label=f"{label} p50")
            ax_lat.plot(xs, [r["latency_ms_p99"] for r in sub], "s--", color=color, label=f"{label} p99")
        ax_tp.set(xlabel="camera streams", ylabel="answers / s", title=f"{model}: throughput", xticks=STREAMS)
        ax_lat.set(xlabel="camera streams", ylabel="ms", title=f"{model}: latency per request", xticks=STREAMS)
        ax_tp.legend(fontsize=8)
        ax_lat.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(rows: list[dict]) -> Table:
    t = Table(title="Ray Serve: answers/s and latency vs camera streams (640x480, keep 0.25, 4 new tokens)")
    for col in ("model", "batching", "streams", "answers/s", "p50 ms", "p99 ms", "mean batch", "batch sizes"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r["model"], r["batching"], str(r["streams"]), f"{r['answers_per_s']:.2f}", f"{r['latency_ms_p50']:.0f}",
            f"{r['latency_ms_p99']:.0f}", f"{r['mean_batch']:.2f}", str(r["batch_sizes"]),
        )  # fmt: skip
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests per stream")
    ap.add_argument(
        "--requests", type=int, default=0, help="requests per stream (0: 24 tiny / 3 realistic; --quick: 6 / 1)"
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    console = Console()
    from bench_realistic import checkpoint  # the script folder is on sys.path

    models = {"warehouse-tiny": ("warehouse-tiny", 24), REALISTIC: (str(checkpoint(REALISTIC)), 3)}
    keep = {p.name: p.default for p in PARAMS}["atp.keep_ratio"]
    # Other work on the same cores slows every figure here: the load average says how much there was.
    meta = stamp() | {"quick": args.quick, "loadavg_1m_start": os.getloadavg()[0]}
    out = {"meta": meta, "payload": payload_rows(keep), "rows": []}
    pool = frames(16)
    start_ray("", os.cpu_count() or 1)
    try:
        for label, (model_id, requests) in models.items():
            n = args.requests or (max(requests // 4, 1) if args.quick else requests)
            rows = measure(label, model_id, n, pool, console)
            out["rows"] += rows
    finally:
        shutdown(APP)
    meta["loadavg_1m_end"] = os.getloadavg()[0]
    console.print(table(out["rows"]))
    suffix = "_quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"serve{suffix}.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(out["rows"], args.out / f"serve{suffix}.png")
    console.print(f"wrote {args.out / f'serve{suffix}.json'} and serve{suffix}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
