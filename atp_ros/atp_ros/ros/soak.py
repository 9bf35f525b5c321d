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

The recording is here; the figures and reports are :mod:`atp_ros.ros.soak_report`; ``bench/soak.py``
is the command line of ``make soak``.

Writes ``soak.json`` (figures and time series), ``soak.md`` (table + PASS/FAIL) and ``soak.png``
(RSS over time, answers per window) to ``--out``.

    python bench/soak.py --minutes 10 --rate 30 --width 640 --height 480 --out bench/results/soak
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atp_ros.ros import soak_report
from atp_ros.ros.soak_report import pending

# Standing questions a planner keeps asking (atp_ros.warehouse.scenes.STANDING_KINDS with their parameters).
QUESTION_PARAMS: tuple[dict, ...] = (
    {"kind": "gripper"},
    {"kind": "aisle"},
    {"kind": "count", "color": "red"},
    {"kind": "exists", "color": "blue", "object_kind": "box"},
)


def parse_args(argv: list[str] | None, prog: str = "python -m atp_ros.ros.soak") -> argparse.Namespace:
    """Command line; the short (CI) version defaults to a 10-s warm-up, the long one to 1 minute."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
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
        "--discovery-range", default="SUBNET", help="ROS_AUTOMATIC_DISCOVERY_RANGE of both processes (see _soak_env())"
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
        # a lost fragment loses the frame: one message per frame (shared memory) gets them through.
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


# ---------------------------------------------------------------------------------------------- the run


def _soak_env(args: argparse.Namespace) -> None:
    """DDS settings of this process and the node it starts (set before the first DDS participant)."""
    os.environ["FASTDDS_BUILTIN_TRANSPORTS"] = args.transport
    # Not LOCALHOST: with it, rmw_fastrtps sets up its own localhost transports and ignores
    # FASTDDS_BUILTIN_TRANSPORTS, and then most ~1 MB best-effort frames are lost.
    # Isolation from other runs comes from the domain id instead.
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = args.discovery_range
    if "ROS_DOMAIN_ID" not in os.environ:  # a domain of its own: other runs on this machine are not heard
        os.environ["ROS_DOMAIN_ID"] = str(1 + os.getpid() % 101)


def _frames_and_questions(args: argparse.Namespace) -> tuple[list, list[str]]:
    """The pre-rendered camera messages (restamped at each send) and the standing questions' texts."""
    from atp_ros.ros.messages import image_msg
    from atp_ros.warehouse.scenes import render_scene, split_seed, standing_question

    print(f"rendering {args.scenes} scenes at {args.width}x{args.height}...", flush=True)
    scenes = [render_scene(split_seed("test", 600_000 + i), args.height, args.width) for i in range(args.scenes)]
    frames = [image_msg(scene.rgb, 0, "soak_camera") for scene in scenes]
    questions = []
    for params in QUESTION_PARAMS:  # the template's text; a scene whose answer is out of vocabulary gives None
        q = next(q for s in scenes if (q := standing_question(s, **params)) is not None)
        questions.append(q.question)
    return frames, questions


def _soak_client(ns: str, record: Record, streaming: threading.Event):
    """The camera node: frames and questions out; answers (while streaming) and the node's status recorded."""
    from diagnostic_msgs.msg import DiagnosticArray

    from atp_ros.ros.client import NodeClient
    from atp_ros.ros.messages import status_level, status_values
    from atp_ros_msgs.msg import VlmAnswer

    status_name = f"{ns}/atp_vlm: vlm pipeline"

    def on_answer(msg: VlmAnswer) -> None:
        if streaming.is_set():
            with record.lock:
                record.answers.append((record.now(), msg.latency_ms, msg.inference_ms, msg.query))

    def on_diagnostics(msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name == status_name:
                sample = diag_sample(record.now(), status_values(status), status_level(status), status.message)
                with record.lock:
                    record.diagnostics.append(sample)

    client = NodeClient("atp_soak_camera", ns)
    client.subscribe(VlmAnswer, "atp_vlm/answer", on_answer)
    client.subscribe(DiagnosticArray, "/diagnostics", on_diagnostics)
    client.pub_image = client.image_publisher()
    client.pub_query = client.query_publisher()
    return client


def _publish_frames(args: argparse.Namespace, record: Record, client, frames: list, stop: threading.Event) -> None:
    """Send the frames on a fixed schedule: a late send does not cause a burst; sends over a period late are counted."""
    period = 1.0 / args.rate
    next_at = time.monotonic()
    i = 0
    while not stop.is_set():
        now = time.monotonic()
        if now < next_at:
            stop.wait(next_at - now)
            continue
        if now - next_at > period:
            record.late_ticks += 1
            next_at = now
        msg = frames[i % len(frames)]
        msg.header.stamp = client.node.get_clock().now().to_msg()
        client.pub_image.publish(msg)
        record.sent += 1
        i += 1
        next_at += period


def run(args: argparse.Namespace, record: Record, log: Path) -> dict[str, Any]:
    """Start the node, stream, record, stop it; returns how the node ended (and why the run stopped early)."""
    _soak_env(args)
    from atp_ros.ros.client import NodeNotReady
    from atp_ros.ros.process import log_tail, node_command, start_node, stop_node

    ns = f"/soak_{os.getpid()}"
    frames, questions = _frames_and_questions(args)
    params = {"model_id": args.model, "max_new_tokens": args.max_new_tokens}
    print(f"starting: {' '.join(node_command(ns, params))} (ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']}, log {log})",
          flush=True)  # fmt: skip
    proc = start_node(ns, params, log=log)
    ended: dict[str, Any] = {"pid": proc.pid, "namespace": ns, "died_at_s": None, "aborted": ""}
    streaming, stop_stream = threading.Event(), threading.Event()
    client = _soak_client(ns, record, streaming)
    publisher = threading.Thread(target=_publish_frames, args=(args, record, client, frames, stop_stream), daemon=True)
    try:
        print("waiting for the node (model loading, DDS discovery)...", flush=True)
        try:
            client.wait_ready(proc, log, 180, also=lambda: _active(record))
        except NodeNotReady:
            tail = " | ".join(log_tail(log).strip().splitlines()[-3:])
            ended["aborted"] = f"the node did not start (exit code {proc.poll()}): {tail}"
            return ended
        with record.lock:
            record.diagnostics.clear()  # the series starts with the stream
        record.t0 = time.monotonic()
        streaming.set()
        publisher.start()
        _stream(args, record, client, proc, questions, ended)
        stop_stream.set()
        publisher.join(5)
        ended["stream_s"] = round(record.now(), 2)
        if ended["died_at_s"] is None:
            ended["idle"] = wait_idle(record, proc)
            _sample_rss(record, proc.pid)
    finally:
        stop_stream.set()
        alive = proc.poll() is None
        ended["alive_before_sigint"] = alive
        ended["exit_s"] = round(stop_node(proc, timeout=10.0), 2) if alive else None
        ended["exit_code"] = proc.returncode
        ended["killed"] = alive and proc.returncode == -9
        client.close()
    return ended


def _sample_rss(record: Record, pid: int) -> None:
    rss = proc_rss_mb(pid)
    if rss is not None:
        record.proc_rss.append((round(record.now(), 2), round(rss, 2)))


def _stream(args: argparse.Namespace, record: Record, client, proc, questions: list[str], ended: dict) -> None:
    """The streaming time: change the question on schedule, sample /proc RSS and the load, show progress."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from std_msgs.msg import String

    duration = args.minutes * 60
    client.pub_query.publish(String(data=questions[0]))
    record.queries.append((0.0, questions[0]))
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
                _sample_rss(record, proc.pid)
                record.load.append((round(t, 2), os.getloadavg()[0]))
                next_sample += 5.0
            q = questions[int(t // args.query_every_s) % len(questions)]
            if q != record.queries[-1][1]:
                client.pub_query.publish(String(data=q))
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
    _sample_rss(record, proc.pid)  # the end of the stream: the /proc figure the growth is measured at


def _active(record: Record) -> bool:
    with record.lock:
        return any(d.get("lifecycle_state") == "active" for d in record.diagnostics[-3:])


def wait_idle(record: Record, proc: subprocess.Popen, timeout: float = 15.0) -> dict[str, Any]:
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


def main(argv: list[str] | None = None, prog: str = "python -m atp_ros.ros.soak") -> int:
    """Run the soak, write the three reports; 0 when every target passes, else 1 with one line why."""
    args = parse_args(argv, prog)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Path(args.log) if args.log else Path("out/soak/node.log")
    record = Record()
    ended = run(args, record, log)
    if ended.get("aborted"):
        print(f"FAIL: {ended['aborted']}")
        return 1
    fig = soak_report.analyse(args, record, ended)
    (out / "soak.json").write_text(json.dumps(fig, indent=1))
    soak_report.write_markdown(out / "soak.md", fig)
    soak_report.write_plot(out / "soak.png", fig)
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
