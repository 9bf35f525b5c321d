"""``make demo``: the atp_vlm node answering questions about a warehouse camera stream over DDS.

Starts the installed ``vlm_node`` in its own process (exactly what ``ros2 run atp_ros
vlm_node`` starts), publishes synthetic warehouse frames on ``/demo/image`` and a
question on ``/demo/query``, and prints every ``VlmAnswer`` as it arrives. The last
overlay (pruned patches grayed out) is saved as a PNG.

Without ``--model`` it runs a tiny *random* LLaVA checkpoint built on the spot: the
pipeline (vision tower, ATP, projector, LLM, DDS) is real, the answers are noise. The
project's trained warehouse model replaces it in a later issue.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import rclpy
from ament_index_python.packages import get_package_prefix
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rich.console import Console
from sensor_msgs.msg import Image
from std_msgs.msg import String

from atp_ros import image_io
from atp_ros.scenes import render_scene
from atp_ros_msgs.msg import VlmAnswer

QUESTIONS = ("how many boxes are on the floor?", "what color is the tote?", "is there a cone near the shelf?")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m atp_ros.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="checkpoint dir or hub id (default: a tiny random LLaVA)")
    ap.add_argument("--frames", type=int, default=30, help="camera frames to publish")
    ap.add_argument("--rate", type=float, default=5.0, help="camera rate in Hz")
    ap.add_argument("--keep-ratio", type=float, default=0.25, help="ATP keep ratio")
    ap.add_argument("--out", default="out/demo", help="where the overlay PNG goes")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.model:
        model = args.model
        console.print(f"[bold]model:[/] {model}")
    else:
        from atp_ros.tiny.llava import save_tiny_llava

        model = str(save_tiny_llava(out / "tiny_llava"))
        console.print(
            f"[bold yellow]model: tiny RANDOM LLaVA[/] ({model}): real pipeline, untrained weights, "
            "so the answers are noise. The trained warehouse model comes in a later issue."
        )
    env = os.environ.copy()
    env.setdefault("ROS_DOMAIN_ID", "42")
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.update({k: env[k] for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE")})
    exe = Path(get_package_prefix("atp_ros")) / "lib" / "atp_ros" / "vlm_node"
    cmd = [
        str(exe),
        "--ros-args",
        "-r",
        "__ns:=/demo",
        "-p",
        f"model_id:={model}",
        "-p",
        f"atp.keep_ratio:={args.keep_ratio}",
        "-p",
        "max_new_tokens:=8",
    ]
    console.print(f"[bold]starting:[/] {' '.join(cmd)}")
    node_proc = subprocess.Popen(cmd, env=env)

    rclpy.init()
    node = rclpy.create_node("atp_demo_camera", namespace="/demo")
    answers: list[VlmAnswer] = []
    overlays: list[Image] = []
    node.create_subscription(VlmAnswer, "atp_vlm/answer", answers.append, 50)
    node.create_subscription(Image, "atp_vlm/overlay", overlays.append, 5)
    pub_image = node.create_publisher(Image, "image", qos_profile_sensor_data)
    standing = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    pub_query = node.create_publisher(String, "query", standing)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        console.print("waiting for the node (model loading, DDS discovery)...")
        deadline = time.monotonic() + 180
        while not node.count_publishers("/demo/atp_vlm/answer"):
            if node_proc.poll() is not None or time.monotonic() > deadline:
                console.print("[red]the node did not start[/]")
                return 1
            executor.spin_once(timeout_sec=0.1)
        shown = 0
        period = 1.0 / args.rate
        for i in range(args.frames):
            if i % max(args.frames // len(QUESTIONS), 1) == 0:
                pub_query.publish(String(data=QUESTIONS[(i * len(QUESTIONS)) // max(args.frames, 1)]))
            msg = Image(**image_io.rgb_fields(render_scene(i, 240, 320).rgb))
            msg.header.frame_id = "demo_camera"
            msg.header.stamp = node.get_clock().now().to_msg()
            pub_image.publish(msg)
            tick = time.monotonic()
            while time.monotonic() - tick < period:
                executor.spin_once(timeout_sec=0.01)
            for a in answers[shown:]:
                console.print(
                    f"[cyan]{a.header.stamp.sec % 1000}.{a.header.stamp.nanosec // 1_000_000:03d}[/] "
                    f"{a.query!r} -> {a.answer!r}  kept {a.visual_tokens_kept}/{a.visual_tokens_total}  "
                    f"inference {a.inference_ms:.0f} ms  latency {a.latency_ms:.0f} ms"
                )
                shown += 1
        end = time.monotonic() + 3
        while time.monotonic() < end and len(answers) == shown:
            executor.spin_once(timeout_sec=0.05)
        if not answers:
            console.print("[red]no answers arrived[/]")
            return 1
        lat = np.array([a.latency_ms for a in answers])
        console.print(
            f"{len(answers)} answers for {args.frames} frames at {args.rate} Hz; latency p50 "
            f"{np.percentile(lat, 50):.0f} ms, p95 {np.percentile(lat, 95):.0f} ms (frames arriving while the "
            "model is busy are dropped on purpose: newest frame wins)"
        )
        if overlays:
            from PIL import Image as PILImage

            last = overlays[-1]
            rgb = np.frombuffer(bytes(last.data), np.uint8).reshape(last.height, last.width, 3)
            PILImage.fromarray(rgb).save(out / "overlay.png")
            console.print(f"overlay of the last answered frame: {out / 'overlay.png'}")
        return 0
    finally:
        node_proc.send_signal(signal.SIGINT)
        try:
            node_proc.wait(10)
        except subprocess.TimeoutExpired:
            node_proc.kill()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())
