"""Node throughput over DDS with warehouse-tiny: what a camera at 30 Hz gets from ``atp_vlm``.

A 640x480 rgb8 warehouse bag recorded at 30 Hz is replayed through the installed node (the
``evaluate --live`` machinery: the node in its own process, frames over Fast DDS, outputs
recorded). Reported: frames answered per second sustained, stamp-to-answer latency p50/p99, the
node's own overhead per frame (receipt to publish minus inference: conversion, queueing, message
building) and its resident memory, for Fast DDS's default transport, for
``FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA`` (shared memory + TCP for large samples) and for the shipped
profile (``config/fastdds_large_frames.xml``), each in its own process. Writes ``bench/results/node.json``.

    python bench/bench_node.py [--frames 150] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

from common import RESULTS, stamp


def run_once(bag: Path, out: Path) -> dict:
    """One live replay in this process; the node's overhead from the VlmAnswers it published."""
    import numpy as np
    from atp_ros.evaluation import live
    from atp_ros.evaluation.sweep import Setting
    from rclpy.serialization import deserialize_message
    from rosbags.highlevel import AnyReader

    from atp_ros_msgs.msg import VlmAnswer

    args = SimpleNamespace(
        bag=bag, out=out, image_topic="/camera/image_raw", query_topic="/atp_vlm/query", model="warehouse-tiny",
        text_encoder="", device="cpu", dtype="auto", max_new_tokens=8, rate=1.0, live_frames=0, attach="",
    )  # fmt: skip
    figures = live.replay(args, Setting("atp", 0.25, 1.0), {}, [])
    overhead, inference, stamps = [], [], []
    with AnyReader([Path(figures["output_bag"])]) as reader:
        answers = [c for c in reader.connections if c.topic.endswith("/answer")]
        for _conn, t_ns, raw in reader.messages(connections=answers):
            msg = deserialize_message(raw, VlmAnswer)
            overhead.append(msg.latency_ms - msg.inference_ms)
            inference.append(msg.inference_ms)
            stamps.append(t_ns)
    span_s = (max(stamps) - min(stamps)) / 1e9 if len(stamps) > 1 else float("nan")
    rss = queue_age = None  # the node's resident memory and queue age (slot wait), from its last /diagnostics
    with AnyReader([Path(figures["output_bag"])]) as reader:
        from diagnostic_msgs.msg import DiagnosticArray

        conns = [c for c in reader.connections if c.topic == "/diagnostics"]
        for _conn, _t, raw in reader.messages(connections=conns):
            for status in deserialize_message(raw, DiagnosticArray).status:
                values = {kv.key: kv.value for kv in status.values}
                if "memory_rss_mb" in values:
                    rss = float(values["memory_rss_mb"])
                    queue_age = float(values.get("queue_age_ms_p50", "nan"))
    return {
        "frames_sent": figures["frames_sent"],
        "frames_answered": figures["frames_answered"],
        "frames_lost_in_transport": figures.get("frames_lost_in_transport"),
        "frames_dropped_busy": figures.get("node_frames_dropped_busy"),
        "answers_per_s": (len(stamps) - 1) / span_s if span_s == span_s and span_s > 0 else None,
        "stamp_to_answer_ms_p50": figures["stamp_to_answer_ms_p50"],
        "stamp_to_answer_ms_p99": figures["stamp_to_answer_ms_p99"],
        "node_overhead_ms_p50": float(np.median(overhead)) if overhead else None,
        "node_overhead_ms_p99": float(np.percentile(overhead, 99)) if overhead else None,
        "inference_ms_p50": float(np.median(inference)) if inference else None,
        "queue_age_ms_p50": queue_age,  # waiting in the latest-frame slot for the worker: part of the overhead
        "node_rss_mb": rss,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=150, help="frames in the 30 Hz bag")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for node.json")
    ap.add_argument("--child", nargs=2, metavar=("BAG", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_once(Path(args.child[0]), Path(args.child[1]))))
        return 0
    from atp_ros.warehouse.cli import write_bag

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        bag = Path(tmp) / "bag30"
        write_bag(bag, "test", args.frames, 0, 30.0, (480, 640), 10)
        for transport in ("default", "LARGE_DATA", "profile"):
            env = {
                k: v for k, v in os.environ.items() if "PROFILES_FILE" not in k and k != "FASTDDS_BUILTIN_TRANSPORTS"
            }
            env["ATP_ROS_DDS_PROFILE"] = "1" if transport == "profile" else "0"  # the shipped profile, both sides
            if transport == "LARGE_DATA":
                env["FASTDDS_BUILTIN_TRANSPORTS"] = transport
            out = Path(tmp) / transport
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(bag), str(out)], env=env, capture_output=True, text=True
            )
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
                return 1
            results[transport] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{transport}: {results[transport]}")
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"meta": stamp() | {"frames": args.frames, "rate_hz": 30, "frame": "640x480 rgb8"}, "transports": results}
    (args.out / "node.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out / 'node.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
