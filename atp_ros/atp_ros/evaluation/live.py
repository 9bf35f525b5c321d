"""Live replay: the bag through the installed ``vlm_node`` over DDS, what it publishes recorded to an mcap.

What offline runs cannot show: frames the node drops at camera rate (it answers the newest frame
when it is free), stamp-to-answer latency through DDS, answers matched to the right frame by
header stamp. The node is started with the setting under test (or ``--attach`` names a running
one); frames go out on ``--image-topic`` and questions on ``--query-topic`` at the recorded rate
(times ``--rate``); ``~/answer``, ``~/keep_mask``, ``~/overlay`` and ``/diagnostics`` are
recorded into ``OUT/live/node_outputs`` (mcap, opens in Foxglove) and the answers are scored.
The only module of the evaluation that imports rclpy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from atp_ros.evaluation import metrics
from atp_ros.evaluation.sweep import Setting

READY_TIMEOUT_S = 120.0
QUIET_S = 3.0  # after the last frame: stop once no answer arrived for this long
DRAIN_MAX_S = 30.0
OUTPUTS = (  # what is recorded: the target node's topic (relative to it, or absolute) and its type
    ("answer", "atp_ros_msgs/msg/VlmAnswer"),
    ("keep_mask", "sensor_msgs/msg/Image"),
    ("overlay", "sensor_msgs/msg/Image"),
    ("/diagnostics", "diagnostic_msgs/msg/DiagnosticArray"),
)


class LiveError(RuntimeError):
    """The live replay could not run (no ROS, node did not start, ...); the message says why."""


def _node_params(args, setting: Setting, compressed: bool) -> dict[str, Any]:
    return {
        "model_id": args.model,
        "text_encoder_id": args.text_encoder,
        "device": args.device,
        "dtype": args.dtype,
        "max_new_tokens": args.max_new_tokens,
        "image_transport": "compressed" if compressed else "raw",
        "processing.max_rate_hz": 0.0,
        **setting.node_params(),
    }


def _typestore():
    """rosbags types of everything recorded, VlmAnswer registered from its installed .msg file."""
    from ament_index_python.packages import get_package_share_directory
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    ts = get_typestore(Stores.ROS2_HUMBLE)
    msg = Path(get_package_share_directory("atp_ros_msgs")) / "msg" / "VlmAnswer.msg"
    ts.register(get_types_from_msg(msg.read_text(), "atp_ros_msgs/msg/VlmAnswer"))
    return ts


class _Bag:
    """The input bag's frames and questions, as CDR ready for DDS (ROS 1 bags too)."""

    def __init__(self, args) -> None:
        from rosbags.highlevel import AnyReader
        from rosbags.typesys import Stores, get_typestore

        self.typestore = get_typestore(Stores.ROS2_HUMBLE)
        self.reader = AnyReader([Path(args.bag)], default_typestore=self.typestore)
        self.reader.open()
        self.conns = [c for c in self.reader.connections if c.topic in (args.image_topic, args.query_topic)]
        if not any(c.topic == args.query_topic for c in self.conns):
            self.reader.close()
            raise LiveError(f"the bag has no {args.query_topic}: the node would get no question (questions from a "
                            "truth file are used offline only)")  # fmt: skip
        self.compressed = any(c.topic == args.image_topic and "Compressed" in c.msgtype for c in self.conns)

    def messages(self) -> Iterator[tuple[str, int, Any, bytes]]:
        """``(topic, bag time ns, message, cdr)`` in bag order; undecodable ones are skipped (counted offline)."""
        for conn, t_ns, raw in self.reader.messages(connections=self.conns):
            try:
                msg = self.reader.deserialize(raw, conn.msgtype)
                cdr = bytes(self.typestore.serialize_cdr(msg, conn.msgtype))
            except Exception:
                continue
            yield conn.topic, t_ns, msg, cdr

    def close(self) -> None:
        self.reader.close()


def _recorder(args, target: str, compressed: bool):
    """A client node recording the target's outputs raw (for the mcap) and its answers by frame stamp."""
    try:
        from rclpy.serialization import deserialize_message

        from atp_ros.ros.client import NodeClient
        from atp_ros.ros.messages import stamp_ns
        from atp_ros_msgs.msg import VlmAnswer
    except ImportError as err:
        raise LiveError(f"ROS 2 is not available here ({err}); source your ROS and the workspace") from None
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import Image

    class Recorder(NodeClient):
        def __init__(self) -> None:
            super().__init__(f"atp_eval_replay_{os.getpid()}")
            self.recorded: list[tuple[str, str, bytes, int]] = []  # (topic, msgtype, cdr, receive ns)
            self.received: dict[int, tuple[float, bytes]] = {}  # answer stamp -> (receive monotonic, cdr)
            types = {"answer": VlmAnswer, "/diagnostics": DiagnosticArray}
            for name, msgtype in OUTPUTS:
                topic = name if name.startswith("/") else f"{target}/{name}"
                callback = self._keeper(topic, msgtype, name == "answer")
                self.subscribe(types.get(name, Image), topic, callback, depth=100, raw=True)
            self.pub_image = self.image_publisher(args.image_topic, compressed)
            self.pub_query = self.query_publisher(args.query_topic)

        def _keeper(self, topic: str, msgtype: str, answers: bool):
            def callback(raw: bytes) -> None:
                now_ns, now = time.time_ns(), time.monotonic()
                with self.lock:
                    self.recorded.append((topic, msgtype, raw, now_ns))
                    if answers:
                        stamp = stamp_ns(deserialize_message(raw, VlmAnswer).header)
                        self.received.setdefault(stamp, (now, raw))

            return callback

    return Recorder()


def replay(args: argparse.Namespace, setting: Setting, done: dict, samples: list) -> dict:
    """Replay ``args.bag`` through the node running ``setting``; returns the live figures."""
    out = args.out / "live"
    out.mkdir(parents=True, exist_ok=True)
    bag_out = out / "node_outputs"
    if bag_out.exists():
        shutil.rmtree(bag_out)  # a previous live run of this folder: replaced, like the report
    bag = _Bag(args)
    namespace = f"/atp_eval_{os.getpid()}"
    target = args.attach.rstrip("/") if args.attach else f"{namespace}/atp_vlm"
    recorder = proc = None
    try:
        recorder = _recorder(args, target, bag.compressed)
        proc = None if args.attach else _start(args, setting, namespace, bag.compressed, out / "node.log")
        _wait_ready(recorder, proc, target, out / "node.log")
        sent = _send(args, bag, recorder)
        _drain(recorder, sent)
    finally:
        _stop(proc, recorder)
        bag.close()
    with recorder.lock:
        rows = sorted(recorder.recorded, key=lambda r: r[3])
    _write_bag(bag_out, rows)
    return _live_figures(args, setting, {} if args.attach else done, samples, sent, recorder.received, rows, target)


def _start(args, setting: Setting, namespace: str, compressed: bool, log: Path):
    from atp_ros.ros.process import start_node

    image = f"image/compressed:={args.image_topic}" if compressed else f"image:={args.image_topic}"
    remaps = [image, f"~/query:={args.query_topic}"]
    return start_node(namespace, _node_params(args, setting, compressed), remaps, log)


def _wait_ready(recorder, proc, target: str, log: Path) -> None:
    """Until the node answers on ``target`` and listens to the frames."""
    from atp_ros.ros.client import NodeNotReady

    try:
        recorder.wait_ready(
            proc, log, READY_TIMEOUT_S, target, also=lambda: recorder.pub_image.get_subscription_count() > 0
        )
    except NodeNotReady as err:
        if proc is not None and proc.poll() is not None:
            raise LiveError(f"the node exited with {proc.returncode}: {log.read_text()[-600:]}") from None
        raise LiveError(f"no node answering on {target}/answer after {READY_TIMEOUT_S:.0f} s") from err


def _send(args, bag: _Bag, recorder) -> dict[int, float]:
    """Publish the bag's frames and questions at the recorded pace (times ``--rate``); frame stamp -> sent at."""
    sent: dict[int, float] = {}
    t0_bag = t0_wall = None
    for topic, t_ns, msg, cdr in bag.messages():
        if t0_bag is None:
            t0_bag, t0_wall = t_ns, time.monotonic()
        wait = t0_wall + (t_ns - t0_bag) / 1e9 / args.rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        if topic == args.query_topic:
            recorder.pub_query.publish(cdr)
            continue
        sent[int(msg.header.stamp.sec) * 10**9 + int(msg.header.stamp.nanosec)] = time.monotonic()
        recorder.pub_image.publish(cdr)
        if args.live_frames and len(sent) >= args.live_frames:
            break
    return sent


def _drain(recorder, sent: dict[int, float]) -> None:
    """Until every frame is answered or no answer came for ``QUIET_S`` (at most ``DRAIN_MAX_S``)."""
    drain_end = time.monotonic() + DRAIN_MAX_S
    while time.monotonic() < drain_end:
        with recorder.lock:
            last = max((t for t, _ in recorder.received.values()), default=0.0)
            complete = len(set(recorder.received) & set(sent)) == len(sent)
        if complete or (time.monotonic() - max(last, max(sent.values(), default=0.0)) > QUIET_S):
            return
        time.sleep(0.1)


def _stop(proc, recorder) -> None:
    if proc is not None:
        from atp_ros.ros.process import stop_node

        stop_node(proc)
    if recorder is not None:
        recorder.close()


def _write_bag(bag_out: Path, rows: list[tuple[str, str, bytes, int]]) -> None:
    """What was recorded, as an mcap (opens in Foxglove)."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    ts = _typestore()
    with Writer(bag_out, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        connections = {}
        for topic, msgtype, raw, t_ns in rows:
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, msgtype, typestore=ts)
            writer.write(connections[topic], t_ns, raw)


def _live_figures(args, setting: Setting, done: dict, samples, sent, received, rows, target: str) -> dict:
    """The figures, and the node's own counters from its last /diagnostics: frames received vs lost on the way."""
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.serialization import deserialize_message

    from atp_ros.ros.messages import find_status, status_values
    from atp_ros_msgs.msg import VlmAnswer

    bag_out = args.out / "live" / "node_outputs"
    figures = _figures(setting, sent, received, done, samples, rows, bag_out, VlmAnswer, deserialize_message)
    if args.attach:  # the attached node runs its own parameters: no offline answers to compare with
        figures["setting"] = f"the attached node's own parameters ({target})"
    for topic, _msgtype, raw, _t in reversed(rows):
        status = find_status(deserialize_message(raw, DiagnosticArray), target) if topic == "/diagnostics" else None
        if status is not None:
            values = status_values(status)
            # The last /diagnostics (1 Hz) can predate the last frames; every frame answered did arrive.
            received_by_node = max(int(values.get("frames_received", 0)), int(figures.get("frames_answered", 0)))
            figures["node_frames_received"] = received_by_node
            figures["node_frames_dropped_busy"] = int(values.get("frames_dropped", 0))
            figures["frames_lost_in_transport"] = max(len(sent) - received_by_node, 0)
            break
    return figures


def _figures(setting, sent, received, done, samples, rows, bag_out, answer_type, deserialize) -> dict:
    """Frames answered and dropped, stamp-to-answer latency, accuracy and agreement with offline answers."""
    truth = {s.stamp_ns: s.answers for s in samples if s.stamp_ns is not None}
    offline = {r["key"]: r["answer"] for r in done.get(setting, {}).get("records", [])}
    matched = sorted(set(received) & set(sent))
    latency = [(received[s][0] - sent[s]) * 1e3 for s in matched]
    answers = {s: deserialize(received[s][1], answer_type) for s in matched}
    acc = [metrics.accuracy(answers[s].answer, truth[s]) for s in matched if truth.get(s)]
    agree = [metrics.agrees(answers[s].answer, offline[str(s)]) for s in matched if str(s) in offline]
    node_ms = [answers[s].latency_ms for s in matched]
    per_topic: dict[str, int] = {}
    for topic, *_ in rows:
        per_topic[topic] = per_topic.get(topic, 0) + 1
    lo, hi = metrics.bootstrap_ci(acc) if acc else (float("nan"), float("nan"))
    return {
        "setting": setting.name,
        "frames_sent": len(sent),
        "frames_answered": len(matched),
        "frames_dropped": len(sent) - len(matched),
        "answered_share": round(len(matched) / max(len(sent), 1), 3),
        "stamp_to_answer_ms_p50": round(metrics.percentiles(latency)["p50"], 2) if latency else None,
        "stamp_to_answer_ms_p90": round(metrics.percentiles(latency)["p90"], 2) if latency else None,
        "stamp_to_answer_ms_p99": round(metrics.percentiles(latency)["p99"], 2) if latency else None,
        "node_receipt_to_answer_ms_p50": round(float(np.median(node_ms)), 2) if node_ms else None,
        "accuracy": round(float(np.mean(acc)), 4) if acc else None,
        "accuracy_ci": [lo, hi],
        "agreement_with_offline": round(float(np.mean(agree)), 4) if agree else None,
        "answers_matched_by_stamp": all(
            answers[s].header.stamp.sec * 10**9 + answers[s].header.stamp.nanosec == s for s in matched
        ),
        "output_bag": str(bag_out),
        "recorded_messages": per_topic,
    }
