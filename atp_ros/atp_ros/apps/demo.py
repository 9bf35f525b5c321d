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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from sensor_msgs.msg import Image
from std_msgs.msg import String

from atp_ros.evaluation import metrics
from atp_ros.ros.client import NodeClient, NodeNotReady
from atp_ros.ros.messages import image_msg, stamp_ns
from atp_ros.ros.process import node_command, start_node, stop_node
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
        mark = "ok" if metrics.correct(a.answer, [truth]) else f"truth: {truth}"
        ax.set_title(
            f"{a.query}\n-> {a.answer!r} ({mark}), {a.visual_tokens_kept}/{a.visual_tokens_total} tokens", fontsize=8
        )
    fig.tight_layout()
    path = out / "overlays.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


@dataclass
class Stream:
    """What the demo sent and saw: frames' ground truth, answers judged, overlays matched to answers."""

    scenes: dict[int, object] = field(default_factory=dict)  # frame stamp (ns) -> its scene (the ground truth)
    params_of: dict[str, dict] = field(default_factory=dict)  # question text -> template parameters
    correct: list[bool] = field(default_factory=list)
    shots: list[tuple[VlmAnswer, Image, str]] = field(default_factory=list)  # answer, overlay, truth
    pending: list[tuple[VlmAnswer, str]] = field(default_factory=list)  # answers whose overlay has not arrived
    shown: int = 0  # answers printed so far


class Camera(NodeClient):
    """The demo's camera and planner: frames on ``/demo/image``, questions, the node's answers and overlays."""

    def __init__(self) -> None:
        super().__init__("atp_demo_camera", "/demo")
        self.pub_image = self.image_publisher()
        self.pub_query = self.query_publisher()
        self.answers: list[VlmAnswer] = self.record(VlmAnswer, "atp_vlm/answer")
        self.overlays: list[Image] = self.record(Image, "atp_vlm/overlay")


def main(argv: list[str] | None = None) -> int:
    """Start the node, stream, print every answer, summarise; 1 when the node did not start or never answered."""
    args = parse_args(argv)
    console = Console()
    out = _fresh_out(Path(args.out))
    console.print(f"[bold]model:[/] {args.model}  keep ratio {args.keep_ratio}")
    for key, value in (("ROS_DOMAIN_ID", "42"), ("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")):
        os.environ.setdefault(key, value)  # this process and the node alike
    params = {"model_id": args.model, "atp.keep_ratio": args.keep_ratio, "max_new_tokens": 4}
    console.print(f"[bold]starting:[/] {' '.join(node_command('/demo', params))}")
    proc = start_node("/demo", params)
    camera = Camera()
    try:
        console.print("waiting for the node (model loading, DDS discovery)...")
        try:
            camera.wait_ready(proc, timeout=180, also=lambda: camera.pub_image.get_subscription_count() > 0)
        except NodeNotReady:
            console.print("[red]the node did not start[/]")
            return 1
        seen = stream(args, camera, console)
        answers = camera.snapshot(camera.answers)
        if not answers:
            console.print("[red]no answers arrived[/]")
            return 1
        summarise(args, console, answers, seen.correct)
        grid = save_overlays(out, seen.shots)
        if grid is not None:
            console.print(f"overlays (kept patches in color, pruned grayed): {out}/overlay_*.png and {grid}")
        return 0
    finally:
        stop_node(proc)
        camera.close()


def _fresh_out(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("overlay_*.png"):
        old.unlink()
    return out


def stream(args: argparse.Namespace, camera: Camera, console: Console) -> Stream:
    """Publish the frames at ``args.rate`` with a new standing question every ``args.question_every``."""
    seen = Stream()
    period = 1.0 / args.rate
    for i in range(args.frames + int(3 * args.rate)):  # a few idle periods at the end for the last answers
        tick = time.monotonic()
        if i < args.frames:
            scene = render_scene(split_seed("test", 500_000 + i), *FRAME_SIZE)
            if i % args.question_every == 0:
                params = QUESTIONS[(i // args.question_every) % len(QUESTIONS)]
                q = standing_question(scene, **params)
                seen.params_of[q.question] = params
                camera.pub_query.publish(String(data=q.question))
            msg = image_msg(scene.rgb, camera.node.get_clock().now().nanoseconds, "demo_camera")
            seen.scenes[stamp_ns(msg.header)] = scene
            camera.pub_image.publish(msg)
        time.sleep(max(period - (time.monotonic() - tick), 0.0))
        show_answers(camera, seen, console)
    return seen


def show_answers(camera: Camera, seen: Stream, console: Console) -> None:
    """Print the answers that arrived since the last call, judged against their frame's truth; match overlays."""
    answers = camera.snapshot(camera.answers)
    for a in answers[seen.shown :]:
        scene = seen.scenes.get(stamp_ns(a.header))
        truth_q = standing_question(scene, **seen.params_of[a.query]) if scene is not None else None
        truth = truth_q.answer if truth_q is not None else "?"
        ok = metrics.correct(a.answer, [truth])
        seen.correct.append(ok)
        seen.pending.append((a, truth))
        console.print(
            f"[cyan]{a.header.stamp.sec % 1000}.{a.header.stamp.nanosec // 1_000_000:03d}[/] "
            f"{a.query!r} -> [bold]{a.answer!r}[/] "
            f"{'[green]ok[/]' if ok else f'[red]truth {truth!r}[/]'}  "
            f"kept {a.visual_tokens_kept}/{a.visual_tokens_total}  "
            f"inference {a.inference_ms:.0f} ms  latency {a.latency_ms:.0f} ms"
        )
    seen.shown = len(answers)
    overlays = {stamp_ns(o.header): o for o in camera.snapshot(camera.overlays)}
    still = []
    for a, truth in seen.pending:  # the overlay of an answer may arrive a little later
        ov = overlays.get(stamp_ns(a.header))
        if ov is not None:
            seen.shots.append((a, ov, truth))
        else:
            still.append((a, truth))
    seen.pending = still


def summarise(args: argparse.Namespace, console: Console, answers: list[VlmAnswer], correct: list[bool]) -> None:
    """Accuracy and the inference / latency percentiles of the run."""
    lat = np.array([a.latency_ms for a in answers])
    inf = np.array([a.inference_ms for a in answers])
    console.print(
        f"[bold]{len(answers)} answers for {args.frames} frames at {args.rate} Hz: accuracy "
        f"{np.mean(correct):.1%} ({sum(correct)}/{len(correct)})[/]; inference p50 {np.percentile(inf, 50):.0f} ms "
        f"p95 {np.percentile(inf, 95):.0f} ms; latency (receipt to answer) p50 {np.percentile(lat, 50):.0f} ms "
        f"p95 {np.percentile(lat, 95):.0f} ms. Frames arriving while the model is busy are dropped on purpose "
        "(newest frame wins)."
    )


if __name__ == "__main__":
    sys.exit(main())
