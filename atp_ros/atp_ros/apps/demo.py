"""``make demo``: the atp_vlm node answering questions about a warehouse camera stream over DDS.

Starts the installed ``vlm_node`` in its own process (exactly what ``ros2 run atp_ros
vlm_node`` starts) with the bundled ``warehouse-tiny`` model, streams synthetic 640x480
warehouse frames (test split) on ``/demo/image`` at camera rate with a standing sequence
of questions on ``/demo/atp_vlm/query``, and prints every ``VlmAnswer`` with the frame's ground
truth, kept tokens and latency. Ends with accuracy and latency percentiles and writes the
overlays (kept patches in color, pruned ones grayed: the paper's Figure 3) to ``out/demo/``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rich.console import Console
from sensor_msgs.msg import Image
from std_msgs.msg import String

from atp_ros.backends import images as image_io
from atp_ros.ros.process import node_executable, stop_node
from atp_ros.warehouse.scenes import render_scene, split_seed, standing_question
from atp_ros_msgs.msg import VlmAnswer

# Standing questions a planner keeps asking while the arm moves along the shelves.
QUESTIONS: tuple[dict, ...] = (
    {"kind": "gripper"},
    {"kind": "aisle"},
    {"kind": "count", "color": "red"},
    {"kind": "exists", "color": "blue", "object_kind": "box"},
    {"kind": "count", "color": "yellow"},
    {"kind": "exists", "color": "green", "object_kind": "tote"},
)
FRAME_SIZE = (480, 640)  # a VGA camera


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m atp_ros.apps.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="warehouse-tiny", help="bundled name, checkpoint dir or hub id")
    ap.add_argument("--frames", type=int, default=60, help="camera frames to publish")
    ap.add_argument("--rate", type=float, default=5.0, help="camera rate in Hz")
    ap.add_argument("--keep-ratio", type=float, default=0.25, help="ATP keep ratio")
    ap.add_argument("--question-every", type=int, default=10, help="frames per standing question")
    ap.add_argument("--out", default="out/demo", help="where the overlay PNGs go")
    args = ap.parse_args(argv)
    if args.frames < 1 or args.rate <= 0 or args.question_every < 1 or not 0 < args.keep_ratio <= 1:
        ap.error("--frames and --question-every must be >= 1, --rate > 0, --keep-ratio in (0, 1]")
    return args


def _rgb(msg: Image) -> np.ndarray:
    return np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width, 3)


def save_overlays(out: Path, shots: list[tuple[VlmAnswer, Image, str]]) -> Path | None:
    """Every overlay as a PNG, and a grid of up to six with question / answer / truth (the paper's Figure 3)."""
    if not shots:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image as PILImage

    for i, (_, ov, _) in enumerate(shots):
        PILImage.fromarray(_rgb(ov)).save(out / f"overlay_{i:03d}.png")
    pick = shots[:: max(len(shots) // 6, 1)][:6]
    cols = min(3, len(pick))
    rows = (len(pick) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (a, ov, truth) in zip(axes.flat, pick, strict=False):
        ax.imshow(_rgb(ov))
        mark = "ok" if a.answer.strip() == truth else f"truth: {truth}"
        ax.set_title(
            f"{a.query}\n-> {a.answer!r} ({mark}), {a.visual_tokens_kept}/{a.visual_tokens_total} tokens", fontsize=8
        )
    fig.tight_layout()
    path = out / "overlays.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("overlay_*.png"):
        old.unlink()
    console.print(f"[bold]model:[/] {args.model}  keep ratio {args.keep_ratio}")
    env = os.environ.copy()
    env.setdefault("ROS_DOMAIN_ID", "42")
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.update({k: env[k] for k in ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE")})
    exe = node_executable()
    cmd = [
        str(exe),
        "--ros-args",
        "-r",
        "__ns:=/demo",
        "-p",
        f"model_id:={args.model}",
        "-p",
        f"atp.keep_ratio:={args.keep_ratio}",
        "-p",
        "max_new_tokens:=4",
    ]
    console.print(f"[bold]starting:[/] {' '.join(cmd)}")
    node_proc = subprocess.Popen(cmd, env=env)

    rclpy.init()
    node = rclpy.create_node("atp_demo_camera", namespace="/demo")
    answers: list[VlmAnswer] = []
    overlays: dict[tuple[int, int], Image] = {}
    node.create_subscription(VlmAnswer, "atp_vlm/answer", answers.append, 50)
    node.create_subscription(
        Image, "atp_vlm/overlay", lambda m: overlays.__setitem__((m.header.stamp.sec, m.header.stamp.nanosec), m), 50
    )
    pub_image = node.create_publisher(Image, "image", qos_profile_sensor_data)
    standing = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    pub_query = node.create_publisher(String, "atp_vlm/query", standing)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    scenes: dict[tuple[int, int], object] = {}  # stamp -> scene (the ground truth of that frame)
    params_of: dict[str, dict] = {}  # question text -> template parameters
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
        correct: list[bool] = []
        shots: list[tuple[VlmAnswer, Image, str]] = []
        pending: list[tuple[VlmAnswer, str]] = []
        for i in range(args.frames + int(3 * args.rate)):  # a few idle periods at the end for the last answers
            tick = time.monotonic()
            if i < args.frames:
                scene = render_scene(split_seed("test", 500_000 + i), *FRAME_SIZE)
                if i % args.question_every == 0:
                    params = QUESTIONS[(i // args.question_every) % len(QUESTIONS)]
                    q = standing_question(scene, **params)
                    params_of[q.question] = params
                    pub_query.publish(String(data=q.question))
                msg = Image(**image_io.rgb_fields(scene.rgb))
                msg.header.frame_id = "demo_camera"
                msg.header.stamp = node.get_clock().now().to_msg()
                scenes[(msg.header.stamp.sec, msg.header.stamp.nanosec)] = scene
                pub_image.publish(msg)
            while time.monotonic() - tick < period:
                executor.spin_once(timeout_sec=0.01)
            for a in answers[shown:]:
                key = (a.header.stamp.sec, a.header.stamp.nanosec)
                truth_q = standing_question(scenes[key], **params_of[a.query]) if key in scenes else None
                truth = truth_q.answer if truth_q is not None else "?"
                ok = a.answer.strip() == truth
                correct.append(ok)
                pending.append((a, truth))
                console.print(
                    f"[cyan]{a.header.stamp.sec % 1000}.{a.header.stamp.nanosec // 1_000_000:03d}[/] "
                    f"{a.query!r} -> [bold]{a.answer!r}[/] "
                    f"{'[green]ok[/]' if ok else f'[red]truth {truth!r}[/]'}  "
                    f"kept {a.visual_tokens_kept}/{a.visual_tokens_total}  "
                    f"inference {a.inference_ms:.0f} ms  latency {a.latency_ms:.0f} ms"
                )
                shown += 1
            still = []
            for a, truth in pending:  # the overlay of an answer may arrive a little later
                ov = overlays.get((a.header.stamp.sec, a.header.stamp.nanosec))
                if ov is not None:
                    shots.append((a, ov, truth))
                else:
                    still.append((a, truth))
            pending = still
        if not answers:
            console.print("[red]no answers arrived[/]")
            return 1
        lat = np.array([a.latency_ms for a in answers])
        inf = np.array([a.inference_ms for a in answers])
        console.print(
            f"[bold]{len(answers)} answers for {args.frames} frames at {args.rate} Hz: accuracy "
            f"{np.mean(correct):.1%} ({sum(correct)}/{len(correct)})[/]; inference p50 {np.percentile(inf, 50):.0f} ms "
            f"p95 {np.percentile(inf, 95):.0f} ms; latency (receipt to answer) p50 {np.percentile(lat, 50):.0f} ms "
            f"p95 {np.percentile(lat, 95):.0f} ms. Frames arriving while the model is busy are dropped on purpose "
            "(newest frame wins)."
        )
        grid = save_overlays(out, shots)
        if grid is not None:
            console.print(f"overlays (kept patches in color, pruned grayed): {out}/overlay_*.png and {grid}")
        return 0
    finally:
        stop_node(node_proc)
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())
