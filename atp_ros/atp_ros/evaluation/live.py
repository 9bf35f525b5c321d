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

import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from atp_ros.evaluation import metrics
from atp_ros.evaluation.sweep import Setting
from atp_ros.ros.process import node_executable, stop_node

READY_TIMEOUT_S = 120.0
QUIET_S = 3.0  # after the last frame: stop once no answer arrived for this long
DRAIN_MAX_S = 30.0


class LiveError(RuntimeError):
    """The live replay could not run (no ROS, node did not start, ...); the message says why."""


def _node_command(args, setting: Setting, namespace: str, compressed: bool) -> list[str]:
    exe = node_executable()
    atp = setting.node_params()
    image_remap = f"image/compressed:={args.image_topic}" if compressed else f"image:={args.image_topic}"
    params = {
        "model_id": args.model,
        "text_encoder_id": args.text_encoder,
        "device": args.device,
        "dtype": args.dtype,
        "max_new_tokens": args.max_new_tokens,
        "image_transport": "compressed" if compressed else "raw",
        "processing.max_rate_hz": 0.0,
        **atp,
    }
    cmd = [str(exe), "--ros-args", "-r", f"__ns:={namespace}", "-r", image_remap, "-r", f"~/query:={args.query_topic}"]
    for name, value in params.items():
        if value == "":
            continue
        value = str(value).lower() if isinstance(value, bool) else value
        cmd += ["-p", f"{name}:={value}"]
    return cmd


def _typestore():
    """rosbags types of everything recorded, VlmAnswer registered from its installed .msg file."""
    from ament_index_python.packages import get_package_share_directory
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    ts = get_typestore(Stores.ROS2_HUMBLE)
    msg = Path(get_package_share_directory("atp_ros_msgs")) / "msg" / "VlmAnswer.msg"
    ts.register(get_types_from_msg(msg.read_text(), "atp_ros_msgs/msg/VlmAnswer"))
    return ts


def replay(args, setting: Setting, done: dict, samples) -> dict:
    """Replay ``args.bag`` through the node running ``setting``; returns the live figures."""
    try:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
        from rclpy.serialization import deserialize_message
        from sensor_msgs.msg import CompressedImage, Image
        from std_msgs.msg import String

        from atp_ros_msgs.msg import VlmAnswer
    except ImportError as err:
        raise LiveError(f"ROS 2 is not available here ({err}); source your ROS and the workspace") from None
    from rosbags.highlevel import AnyReader
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    out = args.out / "live"
    out.mkdir(parents=True, exist_ok=True)
    bag_out = out / "node_outputs"
    if bag_out.exists():
        import shutil

        shutil.rmtree(bag_out)  # a previous live run of this folder: replaced, like the report
    in_ts = get_typestore(Stores.ROS2_HUMBLE)
    reader = AnyReader([Path(args.bag)], default_typestore=in_ts)
    reader.open()
    conns = [c for c in reader.connections if c.topic in (args.image_topic, args.query_topic)]
    if not any(c.topic == args.query_topic for c in conns):
        reader.close()
        raise LiveError(f"the bag has no {args.query_topic}: the node would get no question (questions from a truth "
                        "file are used offline only)")  # fmt: skip
    compressed = any(c.topic == args.image_topic and "Compressed" in c.msgtype for c in conns)
    image_type = CompressedImage if compressed else Image

    context = rclpy.context.Context()
    rclpy.init(context=context)
    node = executor = spin = proc = None
    namespace = f"/atp_eval_{os.getpid()}"
    target = args.attach.rstrip("/") if args.attach else f"{namespace}/atp_vlm"
    recorded: list[tuple[str, str, bytes, int]] = []  # (topic, msgtype, cdr, receive ns)
    received: dict[int, tuple[float, bytes]] = {}  # answer stamp -> (receive monotonic, cdr)
    lock = threading.Lock()
    log = out / "node.log"
    sent: dict[int, float] = {}

    def keep(topic: str, msgtype: str, answers: bool = False):
        def callback(raw: bytes) -> None:
            now_ns, now = time.time_ns(), time.monotonic()
            with lock:
                recorded.append((topic, msgtype, raw, now_ns))
                if answers:
                    msg = deserialize_message(raw, VlmAnswer)
                    received.setdefault(msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec, (now, raw))

        return callback

    try:
        node = rclpy.create_node(f"atp_eval_replay_{os.getpid()}", context=context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        outputs = [
            (f"{target}/answer", VlmAnswer, "atp_ros_msgs/msg/VlmAnswer", True),
            (f"{target}/keep_mask", Image, "sensor_msgs/msg/Image", False),
            (f"{target}/overlay", Image, "sensor_msgs/msg/Image", False),
            ("/diagnostics", DiagnosticArray, "diagnostic_msgs/msg/DiagnosticArray", False),
        ]
        for topic, cls, msgtype, is_answer in outputs:
            node.create_subscription(cls, topic, keep(topic, msgtype, is_answer), reliable, raw=True)
        pub_image = node.create_publisher(image_type, args.image_topic, qos_profile_sensor_data)
        standing = QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        )
        pub_query = node.create_publisher(String, args.query_topic, standing)
        spin = threading.Thread(target=executor.spin, daemon=True)
        spin.start()
        if not args.attach:
            cmd = _node_command(args, setting, namespace, compressed)
            with log.open("w") as log_file:  # the child keeps its own descriptor
                proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=os.environ.copy())
        deadline = time.monotonic() + READY_TIMEOUT_S
        while pub_image.get_subscription_count() == 0 or node.count_publishers(f"{target}/answer") == 0:
            if proc is not None and proc.poll() is not None:
                raise LiveError(f"the node exited with {proc.returncode}: {log.read_text()[-600:]}")
            if time.monotonic() > deadline:
                raise LiveError(f"no node answering on {target}/answer after {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.1)
        t0_bag = t0_wall = None
        frames = 0
        for conn, t_ns, raw in reader.messages(connections=conns):
            if t0_bag is None:
                t0_bag, t0_wall = t_ns, time.monotonic()
            wait = t0_wall + (t_ns - t0_bag) / 1e9 / args.rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                msg = reader.deserialize(raw, conn.msgtype)
                cdr = bytes(in_ts.serialize_cdr(msg, conn.msgtype))  # ROS 1 bags too: CDR for DDS
            except Exception:
                continue  # counted as skipped by the offline reader already
            if conn.topic == args.query_topic:
                pub_query.publish(cdr)
                continue
            stamp = int(msg.header.stamp.sec) * 10**9 + int(msg.header.stamp.nanosec)
            sent[stamp] = time.monotonic()
            pub_image.publish(cdr)
            frames += 1
            if args.live_frames and frames >= args.live_frames:
                break
        drain_end = time.monotonic() + DRAIN_MAX_S
        while time.monotonic() < drain_end:
            with lock:
                last = max((t for t, _ in received.values()), default=0.0)
                complete = len(set(received) & set(sent)) == len(sent)
            if complete or (time.monotonic() - max(last, max(sent.values(), default=0.0)) > QUIET_S):
                break
            time.sleep(0.1)
    finally:
        if proc is not None:
            stop_node(proc)
        if executor is not None:
            executor.shutdown()
        if spin is not None:
            spin.join(5)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown(context=context)
        reader.close()

    ts = _typestore()
    with Writer(bag_out, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        connections = {}
        with lock:
            rows = sorted(recorded, key=lambda r: r[3])
        for topic, msgtype, raw, t_ns in rows:
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, msgtype, typestore=ts)
            writer.write(connections[topic], t_ns, raw)
    if args.attach:  # the attached node runs its own parameters: no offline answers to compare with
        done = {}
    figures = _figures(setting, sent, received, done, samples, rows, bag_out, VlmAnswer, deserialize_message)
    if args.attach:
        figures["setting"] = f"the attached node's own parameters ({target})"
    # The node's own counters (last /diagnostics): frames it received vs frames lost on the way.
    for topic, _msgtype, raw, _t in reversed(rows):
        if topic != "/diagnostics":
            continue
        status = [st for st in deserialize_message(raw, DiagnosticArray).status if st.name.startswith(target)]
        if status:
            values = {kv.key: kv.value for kv in status[0].values}
            received_by_node = int(values.get("frames_received", 0))
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
