"""``make serve-demo``: three camera nodes sharing one batched ATP-gated VLM on Ray Serve.

Starts a local Ray instance with the atp-serve deployment (bundled ``warehouse-tiny``), then
three installed ``vlm_node`` processes in the namespaces ``/cam1`` .. ``/cam3``, each with
``backend:=ray`` pointing at that deployment. It streams three synthetic warehouse cameras
over DDS (``/camN/image``, standing questions on ``/camN/atp_vlm/query``), prints every
camera's answers with the frame's ground truth, and ends with the batch sizes Ray formed
from the three nodes' requests. Ctrl-C (or the end) stops the nodes, Serve and Ray.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import Counter

from rich.console import Console

from atp_ros.apps.demo import FRAME_SIZE, QUESTIONS
from atp_ros.evaluation import metrics
from atp_ros.ros.process import node_executable, stop_node
from atp_ros.serving.cluster import cluster_address, shutdown, start_ray
from atp_ros.serving.config import ServeConfig
from atp_ros.serving.server import deploy
from atp_ros.warehouse.scenes import render_scene, split_seed, standing_question

APP = "atp_vlm_demo"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m atp_ros.apps.serve_demo", description=__doc__.splitlines()[0])
    ap.add_argument("--cameras", type=int, default=3, help="camera nodes sharing the deployment")
    ap.add_argument("--frames", type=int, default=30, help="frames per camera")
    ap.add_argument("--rate", type=float, default=2.0, help="camera rate in Hz (all cameras tick together)")
    ap.add_argument("--keep-ratio", type=float, default=0.25, help="ATP keep ratio of every node")
    ap.add_argument("--question-every", type=int, default=10, help="frames per standing question")
    ap.add_argument("--max-batch-size", type=int, default=4, help="requests per batch Ray forms")
    ap.add_argument("--batch-wait-ms", type=float, default=50.0, help="how long a batch waits to fill")
    args = ap.parse_args(argv)
    if min(args.cameras, args.frames, args.question_every, args.max_batch_size) < 1 or args.rate <= 0:
        ap.error("--cameras, --frames, --question-every, --max-batch-size must be >= 1 and --rate > 0")
    if not 0 < args.keep_ratio <= 1 or args.batch_wait_ms < 0:
        ap.error("--keep-ratio must be in (0, 1] and --batch-wait-ms >= 0")
    return args


def node_command(camera: str, address: str, keep_ratio: float) -> list[str]:
    """The installed node in namespace ``/<camera>``, answering through the Ray deployment."""
    params = {
        "backend": "ray",
        "ray.address": address,
        "ray.app": APP,
        "atp.keep_ratio": keep_ratio,
        "max_new_tokens": 4,
    }
    cmd = [str(node_executable()), "--ros-args", "-r", f"__ns:=/{camera}"]
    for name, value in params.items():
        cmd += ["-p", f"{name}:={value}"]
    return cmd


def batch_summary(sizes: dict[int, int]) -> str:
    """``{size: batches}`` as one line: the histogram and the mean requests per batch."""
    batches = sum(sizes.values())
    if not batches:
        return "no batches"
    mean = sum(size * n for size, n in sizes.items()) / batches
    hist = ", ".join(f"{n} x {size}" for size, n in sorted(sizes.items()))
    return f"{batches} batches ({hist} requests), mean {mean:.2f} requests per batch"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    # The node processes inherit these. LARGE_DATA: three 921 KB raw frames per tick are lost far less
    # often over Fast DDS's shared memory + TCP than over UDP (bench_node: 13 vs 91 of 150 lost).
    for key, value in (
        ("ROS_DOMAIN_ID", "42"),
        ("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST"),
        ("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA"),
    ):
        os.environ.setdefault(key, value)
    cameras = [f"cam{i + 1}" for i in range(args.cameras)]
    cfg = ServeConfig(
        app=APP,
        num_cpus=float(os.cpu_count() or 1),  # the one replica gets the machine: torch threads
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_ms / 1e3,
    )
    procs: list[subprocess.Popen] = []
    try:
        console.print(f"[bold]starting Ray and the deployment[/] ({cfg.model_id}, batches of <= {cfg.max_batch_size})")
        start_ray("", int(cfg.num_cpus))
        handle = deploy(cfg)
        address = cluster_address()
        for cam in cameras:
            cmd = node_command(cam, address, args.keep_ratio)
            console.print(f"[bold]starting:[/] {' '.join(cmd)}")
            procs.append(subprocess.Popen(cmd))
        answers = stream(args, cameras, procs, console)
        sizes = handle.stats.remote().result(timeout_s=30)["batch_sizes"]
        console.print(f"[bold]batch sizes Ray formed:[/] {batch_summary(sizes)}")
        return 0 if answers else 1
    except KeyboardInterrupt:
        console.print("interrupted: stopping the nodes, Serve and Ray")
        return 130
    finally:
        for proc in procs:
            stop_node(proc)
        shutdown(APP)


def stream(args: argparse.Namespace, cameras: list[str], procs: list[subprocess.Popen], console: Console) -> int:
    """Publish every camera's frames and questions at ``args.rate``, print answers; how many arrived."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from atp_ros.backends import images as image_io
    from atp_ros_msgs.msg import VlmAnswer

    rclpy.init()
    node = rclpy.create_node("atp_serve_demo_cameras")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    standing = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    got: list[tuple[str, VlmAnswer]] = []
    pubs = {}
    for cam in cameras:
        node.create_subscription(VlmAnswer, f"/{cam}/atp_vlm/answer", lambda m, c=cam: got.append((c, m)), 50)
        pubs[cam] = (
            node.create_publisher(Image, f"/{cam}/image", qos_profile_sensor_data),
            node.create_publisher(String, f"/{cam}/atp_vlm/query", standing),
        )
    scenes: dict[tuple[str, int, int], object] = {}  # (camera, stamp) -> the frame's scene (ground truth)
    params_of: dict[str, dict] = {}
    correct: Counter[str] = Counter()
    answered: Counter[str] = Counter()
    try:
        console.print("waiting for the nodes (connecting to Ray, DDS discovery)...")
        deadline = time.monotonic() + 180
        while not all(node.count_publishers(f"/{cam}/atp_vlm/answer") for cam in cameras):
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                console.print("[red]a node did not start[/]")
                return 0
            executor.spin_once(timeout_sec=0.1)
        shown = 0
        for i in range(args.frames + int(3 * args.rate)):  # a few idle periods at the end for the last answers
            tick = time.monotonic()
            if i < args.frames:
                # Rendered first, published back to back: the cameras are synchronized, as on one robot.
                frame_scenes = [
                    render_scene(split_seed("test", 600_000 + 1000 * c + i), *FRAME_SIZE) for c in range(len(cameras))
                ]
                for c, (cam, scene) in enumerate(zip(cameras, frame_scenes, strict=True)):
                    image_pub, query_pub = pubs[cam]
                    if i % args.question_every == 0:
                        params = QUESTIONS[(i // args.question_every + 2 * c) % len(QUESTIONS)]
                        question = standing_question(scene, **params)
                        params_of[question.question] = params
                        query_pub.publish(String(data=question.question))
                    msg = Image(**image_io.rgb_fields(scene.rgb))
                    msg.header.frame_id = f"{cam}_camera"
                    msg.header.stamp = node.get_clock().now().to_msg()
                    scenes[(cam, msg.header.stamp.sec, msg.header.stamp.nanosec)] = scene
                    image_pub.publish(msg)
            while time.monotonic() - tick < 1.0 / args.rate:
                executor.spin_once(timeout_sec=0.01)
            for cam, a in got[shown:]:
                scene = scenes.get((cam, a.header.stamp.sec, a.header.stamp.nanosec))
                truth_q = standing_question(scene, **params_of[a.query]) if scene and a.query in params_of else None
                truth = truth_q.answer if truth_q is not None else "?"
                ok = metrics.correct(a.answer, [truth])
                answered[cam] += 1
                correct[cam] += ok
                console.print(
                    f"[cyan]{cam}[/] {a.query!r} -> [bold]{a.answer!r}[/] "
                    f"{'[green]ok[/]' if ok else f'[red]truth {truth!r}[/]'}  kept {a.visual_tokens_kept}/"
                    f"{a.visual_tokens_total}  inference {a.inference_ms:.0f} ms  latency {a.latency_ms:.0f} ms"
                )
            shown = len(got)
        for cam in cameras:
            console.print(f"[bold]{cam}:[/] {answered[cam]} answers for {args.frames} frames, {correct[cam]} right")
        return len(got)
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())
