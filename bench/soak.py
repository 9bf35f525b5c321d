"""``make soak``: the atp_vlm node under a 30 Hz 640x480 camera for minutes: memory, crashes, answers, drops.

Starts the installed ``vlm_node`` (warehouse-tiny, ``max_new_tokens:=8``) in its own process
and, from a publisher node in this process, streams pre-rendered synthetic warehouse frames
(restamped at every send) at ``--rate`` over Fast DDS ``LARGE_DATA``, with a standing question
from the warehouse question set that changes every ``--query-every-s`` seconds. Records every
``/diagnostics`` status of the node (RSS, counters, stage percentiles) and every ``VlmAnswer``,
samples the node's ``VmRSS`` from ``/proc/<pid>/status`` as a cross-check, then stops the
stream, waits for the worker to go idle and SIGINTs the node like Ctrl-C.

Targets (each a PASS/FAIL line in ``soak.md``; exit code 0 only when all pass):

- memory: resident memory at the end at most ``--max-growth`` (5%) above the value after warm-up,
  by the node's own ``memory_rss_mb`` and by ``/proc`` alike;
- crashes: none: the node is alive until the SIGINT and then exits with code 0 (not killed);
- answers: at least one answer in every ``--window-s`` window of the stream;
- counters: while streaming, ``received - processed - dropped - skipped - errors`` stays within
  the frames the one-slot worker can hold between its counters, and it is exactly 0 once idle;
- rate: after warm-up, frames processed per second are at most what one inference at a time
  allows (processed/s x mean inference <= 1: the one-slot worker never runs two) and at least
  ``--min-busy`` of the lesser of the arrival rate and 1000 / mean inference ms (a frame waits
  in the slot whenever the worker finishes, so it idles only for its own per-frame overhead or
  when frames arrive slower than it answers). The mean, not the p50: on a shared machine the
  inference time has a long tail, and the time the worker spends is the sum, not the median.

Writes ``soak.json`` (figures and time series), ``soak.md`` (table + PASS/FAIL) and ``soak.png``
(RSS over time, answers per window) to ``--out``.

    python bench/soak.py --minutes 10 --rate 30 --width 640 --height 480 --out bench/results/soak
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import stamp

# Standing questions a planner keeps asking (atp_ros.warehouse.scenes.STANDING_KINDS with their parameters).
QUESTION_PARAMS: tuple[dict, ...] = (
    {"kind": "gripper"},
    {"kind": "aisle"},
    {"kind": "count", "color": "red"},
    {"kind": "exists", "color": "blue", "object_kind": "box"},
)
# Frames that can sit between the worker's counters at one diagnostics reading while frames
# stream: one counted as received but not yet in the slot (put_frame counts first), one in the
# one-frame slot, one taken by the worker and not yet counted as processed. The reading is not
# atomic (counters first, then the slot's dropped count), so a replacement between the two reads
# shows as -1. Once the stream stops and the worker is idle, the difference is exactly 0.
PENDING_MIN, PENDING_MAX = -1, 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line; the short (CI) version defaults to a 10-s warm-up, the long one to 1 minute."""
    ap = argparse.ArgumentParser(prog="python bench/soak.py", description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="streaming time")
    ap.add_argument("--rate", type=float, default=30.0, help="camera rate in Hz")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--out", default="bench/results/soak", help="where soak.json / soak.md / soak.png go")
    ap.add_argument("--log", default="", help="the node's output (default: out/soak/node.log, not under --out)")
    ap.add_argument("--model", default="warehouse-tiny", help="bundled name, checkpoint dir or hub id")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--scenes", type=int, default=50, help="distinct frames rendered once and cycled")
    ap.add_argument("--query-every-s", type=float, default=10.0, help="seconds per standing question")
    ap.add_argument("--warmup-s", type=float, default=None, help="RSS baseline time (default 60, 10 when < 2 min)")
    ap.add_argument("--window-s", type=float, default=None, help="answer-count window (default 60, 20 when < 2 min)")
    ap.add_argument("--max-growth", type=float, default=0.05, help="RSS growth allowed after warm-up (fraction)")
    ap.add_argument(
        "--min-busy", type=float, default=0.5, help="lowest processed/s over min(received/s, 1000/mean inference)"
    )
    ap.add_argument(
        "--transport",
        default="",
        help="FASTDDS_BUILTIN_TRANSPORTS of both processes (default: LARGE_DATA sized for a frame)",
    )
    ap.add_argument(
        "--discovery-range", default="SUBNET", help="ROS_AUTOMATIC_DISCOVERY_RANGE of both processes (see run())"
    )
    args = ap.parse_args(argv)
    short = args.minutes < 2
    args.warmup_s = args.warmup_s if args.warmup_s is not None else (10.0 if short else 60.0)
    args.window_s = args.window_s if args.window_s is not None else (20.0 if short else 60.0)
    if args.minutes <= 0 or args.rate <= 0 or args.scenes < 1 or args.query_every_s <= 0 or args.window_s <= 0:
        ap.error("--minutes, --rate, --query-every-s, --window-s must be > 0 and --scenes >= 1")
    if not 0 <= args.warmup_s < args.minutes * 60:
        ap.error("--warmup-s must be in [0, the streaming time)")
    if not args.transport:
        # LARGE_DATA's default message size makes a ~1 MB best-effort frame travel in fragments, and
        # a lost fragment loses the frame: measured here, 0 of 300 frames arrived. One message per
        # frame (shared memory) gets them through.
        frame_bytes = args.width * args.height * 3 + 4096
        args.transport = f"LARGE_DATA?max_msg_size={-(-frame_bytes // 1_000_000)}MB"
    return args


# ---------------------------------------------------------------------------------------------- recording


@dataclass
class Record:
    """Everything observed, in seconds since the stream started (``t0``, time.monotonic())."""

    t0: float = 0.0
    sent: int = 0
    late_ticks: int = 0  # sends the publisher made more than one period late (a loaded machine)
    diagnostics: list[dict[str, Any]] = field(default_factory=list)  # one per node status
    answers: list[tuple[float, float, float, str]] = field(default_factory=list)  # t, latency, inference, query
    proc_rss: list[tuple[float, float]] = field(default_factory=list)  # t, VmRSS MB from /proc
    load: list[tuple[float, float]] = field(default_factory=list)  # t, 1-min load average
    queries: list[tuple[float, str]] = field(default_factory=list)  # t, question published
    lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return time.monotonic() - self.t0


def proc_rss_mb(pid: int) -> float | None:
    """``VmRSS`` of ``pid`` in MB (2**20 bytes), None when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def diag_sample(t: float, values: dict[str, str], level: int, message: str) -> dict[str, Any]:
    """One diagnostics reading: counters, RSS, percentiles and error counts as numbers, state as text."""
    sample: dict[str, Any] = {"t": round(t, 3), "level": level, "message": message}
    for key, value in values.items():
        if key in ("lifecycle_state", "query"):
            sample[key] = value
        elif (
            key.startswith(("frames_", "errors.", "problems_", "asks_"))
            or key in ("memory_rss_mb", "in_flight_ms")
            or key.endswith(("_ms_p50", "_ms_p95"))
        ):
            sample[key] = _number(value)
    return sample


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


# ---------------------------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, record: Record, log: Path) -> dict[str, Any]:
    """Start the node, stream, record, stop it; returns how the node ended (and why the run stopped early)."""
    os.environ["FASTDDS_BUILTIN_TRANSPORTS"] = args.transport  # before this process's first DDS participant
    # Not LOCALHOST: with it, rmw_fastrtps sets up its own localhost transports and ignores
    # FASTDDS_BUILTIN_TRANSPORTS, and then most ~1 MB best-effort frames are lost (measured: 6 of
    # 300 arrived). Isolation from other runs comes from the domain id instead.
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = args.discovery_range
    if "ROS_DOMAIN_ID" not in os.environ:  # a domain of its own: other runs on this machine are not heard
        os.environ["ROS_DOMAIN_ID"] = str(1 + os.getpid() % 101)
    import rclpy
    from atp_ros.backends import images as image_io
    from atp_ros.ros.process import node_executable, stop_node
    from atp_ros.warehouse.scenes import render_scene, split_seed, standing_question
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from atp_ros_msgs.msg import VlmAnswer

    ns = f"/soak_{os.getpid()}"
    status_name = f"{ns}/atp_vlm: vlm pipeline"
    print(f"rendering {args.scenes} scenes at {args.width}x{args.height}...", flush=True)
    scenes = [render_scene(split_seed("test", 600_000 + i), args.height, args.width) for i in range(args.scenes)]
    frames = []
    for scene in scenes:
        msg = Image(**image_io.rgb_fields(scene.rgb))
        msg.header.frame_id = "soak_camera"
        frames.append(msg)
    questions = []
    for params in QUESTION_PARAMS:  # the template's text; a scene whose answer is out of vocabulary gives None
        q = next(q for s in scenes if (q := standing_question(s, **params)) is not None)
        questions.append(q.question)

    cmd = [
        str(node_executable()),
        "--ros-args",
        "-r",
        f"__ns:={ns}",
        "-p",
        f"model_id:={args.model}",
        "-p",
        f"max_new_tokens:={args.max_new_tokens}",
    ]
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"starting: {' '.join(cmd)} (ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']}, log {log})", flush=True)
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=os.environ.copy())
    ended: dict[str, Any] = {"pid": proc.pid, "namespace": ns, "died_at_s": None, "aborted": ""}

    context = rclpy.context.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("atp_soak_camera", namespace=ns, context=context)
    executor = SingleThreadedExecutor(context=context)
    streaming = threading.Event()
    stop_stream = threading.Event()

    def on_answer(msg: VlmAnswer) -> None:
        if streaming.is_set():
            with record.lock:
                record.answers.append((record.now(), msg.latency_ms, msg.inference_ms, msg.query))

    def on_diagnostics(msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name == status_name:
                level = int.from_bytes(status.level, "little") if isinstance(status.level, bytes) else status.level
                sample = diag_sample(record.now(), {kv.key: kv.value for kv in status.values}, level, status.message)
                with record.lock:
                    record.diagnostics.append(sample)

    reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
    node.create_subscription(VlmAnswer, "atp_vlm/answer", on_answer, reliable)
    node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 50)
    pub_image = node.create_publisher(Image, "image", qos_profile_sensor_data)
    standing = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    pub_query = node.create_publisher(String, "atp_vlm/query", standing)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()

    def publish_frames() -> None:
        # A fixed schedule: a late send does not cause a burst; sends more than a period late are counted.
        period = 1.0 / args.rate
        next_at = time.monotonic()
        i = 0
        while not stop_stream.is_set():
            now = time.monotonic()
            if now < next_at:
                stop_stream.wait(next_at - now)
                continue
            if now - next_at > period:
                record.late_ticks += 1
                next_at = now
            msg = frames[i % len(frames)]
            msg.header.stamp = node.get_clock().now().to_msg()
            pub_image.publish(msg)
            record.sent += 1
            i += 1
            next_at += period

    publisher = threading.Thread(target=publish_frames, daemon=True)
    try:
        print("waiting for the node (model loading, DDS discovery)...", flush=True)
        deadline = time.monotonic() + 180
        while not (node.count_publishers(f"{ns}/atp_vlm/answer") and _active(record)):
            if proc.poll() is not None or time.monotonic() > deadline:
                ended["aborted"] = f"the node did not start (exit code {proc.poll()}): {_tail(log)}"
                return ended
            time.sleep(0.1)
        with record.lock:
            record.diagnostics.clear()  # the series starts with the stream
        duration = args.minutes * 60
        record.t0 = time.monotonic()
        streaming.set()
        pub_query.publish(String(data=questions[0]))
        record.queries.append((0.0, questions[0]))
        publisher.start()
        next_sample = 0.0
        columns = (
            TextColumn("soak"),
            BarColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        with Progress(*columns) as progress:
            task = progress.add_task("soak", total=duration, info="")
            while (t := record.now()) < duration:
                if proc.poll() is not None:
                    ended["died_at_s"] = round(t, 1)
                    break
                if t >= next_sample:
                    rss = proc_rss_mb(proc.pid)
                    if rss is not None:
                        record.proc_rss.append((round(t, 2), round(rss, 2)))
                    record.load.append((round(t, 2), os.getloadavg()[0]))
                    next_sample += 5.0
                q = questions[int(t // args.query_every_s) % len(questions)]
                if q != record.queries[-1][1]:
                    pub_query.publish(String(data=q))
                    record.queries.append((round(t, 2), q))
                last = record.diagnostics[-1] if record.diagnostics else {}
                progress.update(
                    task,
                    completed=t,
                    info=f"sent {record.sent}  answers {len(record.answers)}  "
                    f"recv/proc/drop {last.get('frames_received', 0):.0f}/{last.get('frames_processed', 0):.0f}/"
                    f"{last.get('frames_dropped', 0):.0f}  rss {last.get('memory_rss_mb', 0):.0f} MB",
                )
                time.sleep(0.2)
            progress.update(task, completed=min(record.now(), duration))
        rss = proc_rss_mb(proc.pid)  # the end of the stream: the /proc figure the growth is measured at
        if rss is not None:
            record.proc_rss.append((round(record.now(), 2), round(rss, 2)))
        stop_stream.set()
        publisher.join(5)
        ended["stream_s"] = round(record.now(), 2)
        if ended["died_at_s"] is None:
            ended["idle"] = _wait_idle(record, proc)
            rss = proc_rss_mb(proc.pid)
            if rss is not None:
                record.proc_rss.append((round(record.now(), 2), round(rss, 2)))
    finally:
        stop_stream.set()
        alive = proc.poll() is None
        ended["alive_before_sigint"] = alive
        ended["exit_s"] = round(stop_node(proc, timeout=10.0), 2) if alive else None
        ended["exit_code"] = proc.returncode
        ended["killed"] = alive and proc.returncode == -9
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)
    return ended


def _active(record: Record) -> bool:
    with record.lock:
        return any(d.get("lifecycle_state") == "active" for d in record.diagnostics[-3:])


def _wait_idle(record: Record, proc: subprocess.Popen, timeout: float = 15.0) -> dict[str, Any]:
    """After the stream: until two diagnostics readings a second apart agree, nothing is in flight or pending."""
    deadline = time.monotonic() + timeout
    seen = len(record.diagnostics)
    previous = None
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
        with record.lock:
            fresh = record.diagnostics[seen:]
            seen = len(record.diagnostics)
        for sample in fresh:
            key = tuple(sample.get(k) for k in ("frames_received", "frames_processed", "frames_dropped"))
            if key == previous and not sample.get("in_flight_ms"):
                return {"reached": True, "after_s": round(record.now(), 2), "pending": pending(sample), **sample}
            previous = key
    last = record.diagnostics[-1] if record.diagnostics else {}
    return {"reached": False, "after_s": round(record.now(), 2), "pending": pending(last) if last else None, **last}


def _tail(log: Path, lines: int = 3) -> str:
    try:
        return " | ".join(log.read_text().strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------------------------- analysis


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _value_at(series: list[tuple[float, float]], t: float) -> tuple[float, float] | None:
    """The first (time, value) at or after ``t``, else None."""
    return next(((s, v) for s, v in series if s >= t and v is not None), None)


def analyse(args: argparse.Namespace, record: Record, ended: dict[str, Any]) -> dict[str, Any]:
    """Figures and PASS/FAIL per target from what was recorded."""
    duration = ended.get("stream_s") or record.now()
    diags = [d for d in record.diagnostics if d["t"] <= duration]
    final = ended.get("idle") or (diags[-1] if diags else {})
    answers = [a for a in record.answers if a[0] <= duration + 15]
    steady = [a for a in answers if args.warmup_s <= a[0] <= duration]

    # answers per window of the stream
    n_windows = max(round(duration / args.window_s), 1)
    per_window = [0] * n_windows
    for t, *_ in answers:
        k = int(t // args.window_s)
        if k < n_windows:
            per_window[k] += 1
    per_minute = [n * 60.0 / args.window_s for n in per_window]

    # memory: the node's own figure and /proc, at the end of warm-up and at the end of the stream
    diag_rss = [(d["t"], d.get("memory_rss_mb")) for d in diags if d.get("memory_rss_mb") is not None]
    proc_rss = [(t, v) for t, v in record.proc_rss if t <= duration]  # the one taken once idle is in the series
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

    # counters
    pend = [(d["t"], pending(d)) for d in diags if d.get("frames_received") is not None]
    out_of_range = [(t, p) for t, p in pend if not PENDING_MIN <= p <= PENDING_MAX]
    errors = {k: v for k, v in final.items() if k.startswith("errors.")}

    # rate: processed frames per second over the steady part vs the inference time per frame
    steady_diags = [d for d in diags if d["t"] >= args.warmup_s and d.get("frames_processed") is not None]
    processed_per_s = received_steady_per_s = None
    if len(steady_diags) > 1:
        a, b = steady_diags[0], steady_diags[-1]
        processed_per_s = (b["frames_processed"] - a["frames_processed"]) / (b["t"] - a["t"])
        received_steady_per_s = (b["frames_received"] - a["frames_received"]) / (b["t"] - a["t"])
    inference = [a[2] for a in steady]
    inf_p50 = _pct(inference, 50)
    inf_mean = float(np.mean(inference)) if inference else None
    busy_p50 = processed_per_s * inf_p50 / 1000 if processed_per_s and inf_p50 else None
    busy_mean = processed_per_s * inf_mean / 1000 if processed_per_s and inf_mean else None
    capacity = min(received_steady_per_s, 1000 / inf_mean) if received_steady_per_s and inf_mean else None
    of_capacity = processed_per_s / capacity if processed_per_s and capacity else None
    received = final.get("frames_received")
    received_per_s = received / duration if received else None

    growth = [memory[n]["growth"] for n in memory]
    targets = {
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
            "why": f"processed {_fmt(processed_per_s, '.2f')}/s x mean inference {_fmt(inf_mean, '.0f')} ms = "
            f"{_fmt(busy_mean, '.2f')} of the time inferring (at most 1); {_fmt(of_capacity, '.2f')} of "
            f"min(received {_fmt(received_steady_per_s, '.1f')}/s, 1000/mean inference "
            f"{_fmt(1000 / inf_mean if inf_mean else None, '.1f')}/s) (at least {args.min_busy:g}); "
            f"by the p50 ({_fmt(inf_p50, '.0f')} ms): {_fmt(busy_p50, '.2f')}",
        },
    }
    lat = [a[1] for a in steady]
    return {
        "meta": stamp()
        | {
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
        },
        "duration_s": round(duration, 2),
        "frames_sent": record.sent,
        "publisher_late_ticks": record.late_ticks,
        "frames_received": received,
        "frames_lost_in_transport": record.sent - received if received is not None else None,
        "frames_processed": final.get("frames_processed"),
        "frames_dropped": final.get("frames_dropped"),
        "frames_skipped_no_query": final.get("frames_skipped_no_query", 0),
        "errors": errors,
        "received_per_s": received_per_s,
        "processed_per_s_steady": processed_per_s,
        "drop_fraction": final.get("frames_dropped") / received if received else None,
        "received_per_s_steady": received_steady_per_s,
        "inference_ms_mean": inf_mean,
        "busy_p50": busy_p50,
        "busy_mean": busy_mean,
        "processed_of_capacity": of_capacity,
        "answers": len(answers),
        "answers_per_window": per_window,
        "answers_per_min": per_minute,
        "answers_per_min_min": min(per_minute),
        "answers_per_min_median": statistics.median(per_minute),
        "inference_ms_p50": inf_p50,
        "inference_ms_p95": _pct(inference, 95),
        "latency_ms_p50": _pct(lat, 50),
        "latency_ms_p95": _pct(lat, 95),
        "node_stage_ms_p50": {k[: -len("_ms_p50")]: v for k, v in final.items() if k.endswith("_ms_p50")},
        "node_stage_ms_p95": {k[: -len("_ms_p95")]: v for k, v in final.items() if k.endswith("_ms_p95")},
        "memory": memory,
        "load_avg_1min": {
            "min": min((v for _, v in record.load), default=None),
            "median": statistics.median([v for _, v in record.load]) if record.load else None,
            "max": max((v for _, v in record.load), default=None),
        },
        "node": ended,
        "crashes": 0 if targets["crashes"]["pass"] else 1,
        "targets": targets,
        "pass": all(t["pass"] for t in targets.values()),
        "series": {
            "diagnostics": [_slim(d) for d in diags],
            "proc_rss_mb": record.proc_rss,
            "load_avg_1min": record.load,
            "answers": {
                "t_s": [round(a[0], 2) for a in answers],
                "latency_ms": [round(a[1], 1) for a in answers],
                "inference_ms": [round(a[2], 1) for a in answers],
            },
            "queries": record.queries,
        },
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


def main(argv: list[str] | None = None) -> int:
    """Run the soak, write the three reports; 0 when every target passes, else 1 with one line why."""
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Path(args.log) if args.log else Path("out/soak/node.log")
    record = Record()
    ended = run(args, record, log)
    if ended.get("aborted"):
        print(f"FAIL: {ended['aborted']}")
        return 1
    fig = analyse(args, record, ended)
    (out / "soak.json").write_text(json.dumps(fig, indent=1))
    write_markdown(out / "soak.md", fig)
    write_plot(out / "soak.png", fig)
    print((out / "soak.md").read_text())
    print(f"wrote {out / 'soak.json'}, {out / 'soak.md'}, {out / 'soak.png'}; node log {log}")
    failed = [f"{name}: {t['why']}" for name, t in fig["targets"].items() if not t["pass"]]
    if failed:
        print("FAIL: " + "; ".join(failed))
        return 1
    print("PASS: every soak target met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
