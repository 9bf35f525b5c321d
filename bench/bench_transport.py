"""Frames that arrive: a 30 Hz camera into the node over Fast DDS, with and without the shipped profile.

For 640x480, 1280x720 and 1920x1080 rgb8 frames, a camera publisher (this script's child
process, as a driver would be) streams ``--frames`` frames at 30 Hz into the installed node
(warehouse-tiny, a standing question), once with Fast DDS's defaults on both sides ("driver
untouched") and once with ``config/fastdds_large_frames.xml`` on both sides. Reported per run:
frames the node received / sent, answered / sent, the node's ``frames_lost`` count (the
message-lost event) and stamp-to-answer latency p50/p95 (the camera's stamp to the answer's
arrival back at the camera's process, one machine, one clock). Each mode runs in its own process
because Fast DDS reads its profile once per process. Writes ``bench/results/transport.json``.

    python bench/bench_transport.py [--frames 150] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {"640x480": (480, 640), "1280x720": (720, 1280), "1920x1080": (1080, 1920)}
MODES = {"defaults": "0", "profile": "1"}  # ATP_ROS_DDS_PROFILE for the node and the camera
QUESTION = "is the aisle clear?"


def child(size: str, frames: int, log: Path) -> dict:
    """One run in this process: start the node, stream the frames, collect answers and diagnostics."""
    import numpy as np
    from atp_ros.ros.client import NodeClient
    from atp_ros.ros.messages import find_status, image_msg, stamp_ns, status_values
    from atp_ros.ros.process import start_node, stop_node
    from atp_ros.warehouse.scenes import render_scene
    from std_msgs.msg import String

    from atp_ros_msgs.msg import VlmAnswer

    h, w = SIZES[size]
    ns = f"/transport_{os.getpid()}"
    proc = start_node(ns, {"model_id": "warehouse-tiny", "max_new_tokens": 2, "atp.keep_ratio": 0.25}, log=log)
    client = NodeClient("camera", ns)
    try:
        arrived: list[tuple[int, int]] = []  # (frame stamp, arrival time), both wall clock ns
        client.subscribe(
            VlmAnswer, "atp_vlm/answer", lambda a: arrived.append((stamp_ns(a.header), time.time_ns())), 200
        )
        diags = client.record_diagnostics()
        image, query = client.image_publisher("image"), client.query_publisher()
        client.wait_ready(proc, log, timeout=180, also=lambda: client.node.count_subscribers(f"{ns}/image") > 0)
        query.publish(String(data=QUESTION))
        time.sleep(1.0)
        rgb = render_scene(3, h, w).rgb
        sent: set[int] = set()
        start = time.monotonic()
        for i in range(frames):
            stamp = time.time_ns()
            image.publish(image_msg(rgb, stamp))
            sent.add(stamp)
            time.sleep(max(0.0, start + (i + 1) / 30 - time.monotonic()))
        time.sleep(3.0)  # the last answers and two diagnostics periods
        got = dict(client.snapshot(arrived))
        lat = np.array([(at - stamp) / 1e6 for stamp, at in got.items() if stamp in sent])
        statuses = [find_status(d, f"{ns}/atp_vlm") for d in client.snapshot(diags)]
        values = next((status_values(s) for s in reversed(statuses) if s is not None), {})
        return {
            "sent": frames,
            "received": int(values.get("frames_received", 0)),
            "answered": int(lat.size),
            "frames_lost": int(values.get("frames_lost", 0)),
            "stamp_to_answer_ms_p50": round(float(np.percentile(lat, 50)), 1) if lat.size else None,
            "stamp_to_answer_ms_p95": round(float(np.percentile(lat, 95)), 1) if lat.size else None,
        }
    finally:
        stop_node(proc)
        client.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=150, help="frames per run at 30 Hz")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--child", nargs=3, metavar=("SIZE", "FRAMES", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        size, frames, out = args.child
        Path(out).write_text(json.dumps(child(size, int(frames), Path(out).with_suffix(".log"))))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in SIZES:
            for mode, flag in MODES.items():
                out = Path(tmp) / f"{size}-{mode}.json"
                env = os.environ.copy() | {"ATP_ROS_DDS_PROFILE": flag}
                for var in ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE"):
                    env.pop(var, None)
                cmd = [sys.executable, __file__, "--child", size, str(args.frames), str(out)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
                if proc.returncode != 0:
                    print(f"{size} {mode}: failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
                    continue
                row = {"size": size, "mode": mode} | json.loads(out.read_text())
                rows.append(row)
                print(f"{size:>9} {mode:>8}: received {row['received']}/{row['sent']}, answered {row['answered']}/"
                      f"{row['sent']}, lost {row['frames_lost']}, stamp->answer p50 {row['stamp_to_answer_ms_p50']} ms",
                      flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"frames_per_run": args.frames, "rate_hz": 30, "model": "warehouse-tiny", "load": os.getloadavg()}
    (args.out / "transport.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
