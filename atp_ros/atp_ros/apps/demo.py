"""``make demo``: the atp_vlm node answering questions about a warehouse camera stream over DDS.

Starts the installed ``vlm_node`` in its own process (exactly what ``ros2 run atp_ros
vlm_node`` starts) with the bundled ``warehouse-cell`` model and streams a continuous test-split
episode of the rendered warehouse cell (the arm picking and placing, the conveyor and the aisle
changing; rendered live with MuJoCo, or replayed from a bag recorded by ``warehouse bag`` with
``--bag``, or from the recorded episode shipped with the demo when the cell cannot be rendered here)
as 640x480 frames on ``/demo/image`` at camera rate, with standing questions that
change every few frames on ``/demo/atp_vlm/query``. It prints every ``VlmAnswer`` next to the
frame's ground truth, kept tokens and latency. ``--world flat`` streams the retired 2D world's
stills to the bundled ``warehouse-tiny`` instead. Ends with the share of frames answered,
accuracy and latency percentiles, and writes the overlays (kept patches in color, pruned ones
dark, kept areas outlined: the paper's Figure 3), a frame strip and an animated GIF to
``out/demo/``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
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
from atp_ros_msgs.msg import VlmAnswer

# Standing questions of the flat world a planner keeps asking while the arm moves along the shelves.
FLAT_QUESTIONS: tuple[dict, ...] = (
    {"kind": "gripper"},
    {"kind": "aisle"},
    {"kind": "count", "color": "red"},
    {"kind": "exists", "color": "blue", "object_kind": "box"},
    {"kind": "count", "color": "yellow"},
    {"kind": "exists", "color": "green", "object_kind": "tote"},
)
FRAME_SIZE = (480, 640)  # a VGA camera
WORLD_MODELS = {"cell": "warehouse-cell", "flat": "warehouse-tiny"}  # the bundled model trained on each world
# The demo's episode recorded for machines that cannot render (no EGL/OSMesa): 60 frames of test episode 0 at
# 5 Hz as JPEG, made with `warehouse bag --count 60 --rate 5 --question-every 10 --jpeg 90 --out DIR`.
RECORDED_EPISODE = Path(__file__).resolve().parent / "demo_episode"


@dataclass(frozen=True)
class Item:
    """One camera frame to publish: its pixels, the standing question, and the accepted answers on it."""

    rgb: np.ndarray
    question: str
    answers: tuple[str, ...]  # () when the question has no determined answer on this frame


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m atp_ros.apps.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="bundled name, checkpoint dir or hub id (default: the world's model)")
    ap.add_argument("--world", choices=tuple(WORLD_MODELS), default="cell", help="which warehouse the camera shows")
    ap.add_argument("--frames", type=int, default=60, help="camera frames to publish")
    ap.add_argument("--rate", type=float, default=5.0, help="camera rate in Hz")
    ap.add_argument("--keep-ratio", type=float, default=0.25, help="ATP keep ratio")
    ap.add_argument("--question-every", type=int, default=10, help="frames per standing question")
    ap.add_argument("--episode", type=int, default=0, help="cell: which test-split episode to stream")
    ap.add_argument("--bag", default="", help="replay this recorded bag (warehouse bag) instead of rendering")
    ap.add_argument("--out", default="out/demo", help="where the overlays, frame strip and animation go")
    args = ap.parse_args(argv)
    if args.frames < 1 or args.rate <= 0 or args.question_every < 1 or not 0 < args.keep_ratio <= 1:
        ap.error("--frames and --question-every must be >= 1, --rate > 0, --keep-ratio in (0, 1]")
    if args.bag and not Path(args.bag).is_dir():
        ap.error(f"--bag {args.bag}: no such bag directory")
    args.model = args.model or WORLD_MODELS[args.world]
    return args


def flat_items(frames: int, question_every: int) -> Iterator[Item]:
    """Test-split stills of the flat world with the standing questions of :data:`FLAT_QUESTIONS` in turn."""
    from atp_ros.warehouse.scenes import render_scene, split_seed, standing_question

    for i in range(frames):
        scene = render_scene(split_seed("test", 500_000 + i), *FRAME_SIZE)
        q = standing_question(scene, **FLAT_QUESTIONS[(i // question_every) % len(FLAT_QUESTIONS)])
        yield Item(scene.rgb, q.question if q else "", tuple(q.answers or (q.answer,)) if q else ())


def live_items(episode: int, frames: int, rate: float, question_every: int) -> Iterator[Item]:
    """A test-split episode of the cell rendered live, with a standing question picked every ``question_every``."""
    from atp_ros.warehouse.cell.dataset import episode_frames, pick_standing, standing_answer
    from atp_ros.warehouse.cell.questions import accepted_answers

    rng = np.random.default_rng([episode, 29])
    standing = None
    for i, frame in zip(range(frames), episode_frames("test", episode, FRAME_SIZE, rate), strict=False):
        if i % question_every == 0 or standing is None:
            standing = pick_standing(frame.truth, rng, "test") or standing
        answered = standing_answer(frame.truth, standing[0], standing[1]) if standing else None
        yield Item(frame.rgb, standing[2] if standing else "", accepted_answers(answered[0]) if answered else ())


def bag_image_topic(bag: Path) -> str:
    """The camera topic of a bag written by ``warehouse bag``: raw, or ``.../compressed`` when recorded with --jpeg."""
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    from atp_ros.warehouse.cli import IMAGE_TOPIC

    with AnyReader([bag], default_typestore=get_typestore(Stores.ROS2_HUMBLE)) as reader:
        topics = {c.topic for c in reader.connections}
    compressed = f"{IMAGE_TOPIC}/compressed"
    return compressed if IMAGE_TOPIC not in topics and compressed in topics else IMAGE_TOPIC


def bag_items(bag: Path, frames: int) -> Iterator[Item]:
    """A recorded episode: its frames, the question standing at each, and ``ground_truth.jsonl``'s answers."""
    from atp_ros.evaluation.sources import read_bag
    from atp_ros.warehouse.cli import QUERY_TOPIC

    for s in read_bag(bag, bag_image_topic(bag), QUERY_TOPIC, limit=frames).samples:
        yield Item(s.image, s.question, tuple(s.answers))


def rendering_error() -> str:
    """Why the cell cannot be rendered live here ("" when it can)."""
    try:
        from atp_ros.warehouse.cell.render import CellRenderer

        CellRenderer(64, 48).close()
    except Exception as err:  # no MuJoCo, no EGL/OSMesa, ...
        return f"{type(err).__name__}: {err}"
    return ""


def _rgb(msg: Image) -> np.ndarray:
    return np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width, 3)


@dataclass
class Shot:
    """An answer with the overlay the node published for its frame and the frame's accepted answers."""

    answer: VlmAnswer
    overlay: Image
    answers: tuple[str, ...]

    @property
    def verdict(self) -> str:
        if not self.answers:
            return "no truth"
        return "ok" if metrics.correct(self.answer.answer, self.answers) else f"truth: {self.answers[0]}"


def save_overlays(out: Path, shots: list[Shot]) -> list[Path]:
    """Every overlay as a PNG, a grid of six with question / answer / truth (the paper's Figure 3),
    a frame strip of the stream, and an animated GIF of it; returns the summary files."""
    if not shots:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image as PILImage
    from PIL import ImageDraw

    frames = []
    for i, shot in enumerate(shots):
        img = PILImage.fromarray(_rgb(shot.overlay))
        img.save(out / f"overlay_{i:03d}.png")
        captioned = img.copy()
        draw = ImageDraw.Draw(captioned)
        a = shot.answer
        draw.rectangle((0, 0, captioned.width, 34), fill=(0, 0, 0))
        draw.text((6, 3), a.query[:90], fill=(255, 255, 255))
        draw.text((6, 18), f"-> {a.answer}  ({shot.verdict})  {a.visual_tokens_kept}/{a.visual_tokens_total} tokens",
                  fill=(120, 255, 120) if shot.verdict == "ok" else (255, 160, 120))  # fmt: skip
        frames.append(captioned.resize((captioned.width // 2, captioned.height // 2)))
    gif = out / "stream.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=200, loop=0)
    strip_frames = frames[:: max(len(frames) // 8, 1)][:8]
    strip = PILImage.new("RGB", (strip_frames[0].width * 4, strip_frames[0].height * ((len(strip_frames) + 3) // 4)))
    for i, f in enumerate(strip_frames):
        strip.paste(f, ((i % 4) * f.width, (i // 4) * f.height))
    strip_path = out / "frame_strip.png"
    strip.save(strip_path)
    pick = shots[:: max(len(shots) // 6, 1)][:6]
    cols = min(3, len(pick))
    rows = (len(pick) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, shot in zip(axes.flat, pick, strict=False):
        a = shot.answer
        ax.imshow(_rgb(shot.overlay))
        ax.set_title(
            f"{a.query}\n-> {a.answer!r} ({shot.verdict}), {a.visual_tokens_kept}/{a.visual_tokens_total} tokens",
            fontsize=8,
        )
    fig.tight_layout()
    grid = out / "overlays.png"
    fig.savefig(grid, dpi=90)
    plt.close(fig)
    return [grid, strip_path, gif]


@dataclass
class Stream:
    """What the demo sent and saw: each frame's accepted answers, answers judged, overlays matched to answers."""

    truth: dict[int, tuple[str, ...]] = field(default_factory=dict)  # frame stamp (ns) -> accepted answers
    sent: int = 0  # frames published
    correct: list[bool] = field(default_factory=list)
    shots: list[Shot] = field(default_factory=list)
    pending: list[tuple[VlmAnswer, tuple[str, ...]]] = field(default_factory=list)  # overlay not arrived yet
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
    if args.world == "cell" and not args.bag:
        why = rendering_error()
        if why and RECORDED_EPISODE.is_dir():
            console.print(f"[yellow]cannot render the cell here ({why});[/] replaying the recorded test episode")
            args.bag = str(RECORDED_EPISODE)
        elif why:
            hint = "record an episode with `python -m atp_ros.warehouse.cli bag --world cell --out BAG`, pass --bag BAG"
            console.print(f"[red]cannot render the cell here ({why});[/] {hint}")
            return 1
    source = f"bag {args.bag}" if args.bag else f"live render of test episode {args.episode}"
    if args.world == "flat" and not args.bag:
        source = "flat-world test stills"
    console.print(f"[bold]model:[/] {args.model}  keep ratio {args.keep_ratio}  [bold]camera:[/] {source}")
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
        if args.bag:
            items = bag_items(Path(args.bag), args.frames)
        elif args.world == "cell":
            items = live_items(args.episode, args.frames, args.rate, args.question_every)
        else:
            items = flat_items(args.frames, args.question_every)
        seen = stream(args, items, camera, console)
        answers = camera.snapshot(camera.answers)
        if not answers:
            console.print("[red]no answers arrived[/]")
            return 1
        summarise(args, console, answers, seen)
        files = save_overlays(out, seen.shots)
        if files:
            names = ", ".join(str(f) for f in files)
            console.print(f"overlays (kept in color, pruned dark, kept areas outlined): {out}/overlay_*.png, {names}")
        return 0
    finally:
        stop_node(proc)
        camera.close()


def _fresh_out(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("overlay_*.png"):
        old.unlink()
    return out


def stream(args: argparse.Namespace, items: Iterator[Item], camera: Camera, console: Console) -> Stream:
    """Publish the frames at ``args.rate``, each standing question once before the first frame it is asked of."""
    seen = Stream()
    period = 1.0 / args.rate
    asked = None
    tick = time.monotonic()
    for item in items:
        if item.question and item.question != asked:
            camera.pub_query.publish(String(data=item.question))
            asked = item.question
        msg = image_msg(item.rgb, camera.node.get_clock().now().nanoseconds, "demo_camera")
        seen.truth[stamp_ns(msg.header)] = item.answers
        camera.pub_image.publish(msg)
        seen.sent += 1
        show_answers(camera, seen, console)
        # Camera rate from frame to frame (rendering the next frame happens inside the period).
        tick += period
        time.sleep(max(tick - time.monotonic(), 0.0))
    for _ in range(int(3 * args.rate)):  # a few idle periods at the end for the last answers
        time.sleep(period)
        show_answers(camera, seen, console)
    return seen


def show_answers(camera: Camera, seen: Stream, console: Console) -> None:
    """Print the answers that arrived since the last call, judged against their frame's truth; match overlays."""
    answers = camera.snapshot(camera.answers)
    for a in answers[seen.shown :]:
        truth = seen.truth.get(stamp_ns(a.header), ())
        if truth:
            ok = metrics.correct(a.answer, truth)
            seen.correct.append(ok)
            verdict = "[green]ok[/]" if ok else f"[red]truth {truth[0]!r}[/]"
        else:
            verdict = "[dim]no determined truth on this frame[/]"
        seen.pending.append((a, truth))
        console.print(
            f"[cyan]{a.header.stamp.sec % 1000}.{a.header.stamp.nanosec // 1_000_000:03d}[/] "
            f"{a.query!r} -> [bold]{a.answer!r}[/] {verdict}  "
            f"kept {a.visual_tokens_kept}/{a.visual_tokens_total}  "
            f"inference {a.inference_ms:.0f} ms  latency {a.latency_ms:.0f} ms"
        )
    seen.shown = len(answers)
    overlays = {stamp_ns(o.header): o for o in camera.snapshot(camera.overlays)}
    still = []
    for a, truth in seen.pending:  # the overlay of an answer may arrive a little later
        ov = overlays.get(stamp_ns(a.header))
        if ov is not None:
            seen.shots.append(Shot(a, ov, truth))
        else:
            still.append((a, truth))
    seen.pending = still


def summarise(args: argparse.Namespace, console: Console, answers: list[VlmAnswer], seen: Stream) -> None:
    """Frames answered, accuracy and the inference / latency percentiles of the run."""
    lat = np.array([a.latency_ms for a in answers])
    inf = np.array([a.inference_ms for a in answers])
    answered = len({stamp_ns(a.header) for a in answers} & set(seen.truth))
    correct = seen.correct
    console.print(
        f"[bold]{answered}/{seen.sent} frames answered ({answered / max(seen.sent, 1):.0%}) at {args.rate} Hz; "
        f"accuracy {np.mean(correct) if correct else 0.0:.1%} ({sum(correct)}/{len(correct)} answers with a "
        f"determined truth)[/]; inference p50 {np.percentile(inf, 50):.0f} ms p95 {np.percentile(inf, 95):.0f} ms; "
        f"latency (receipt to answer) p50 {np.percentile(lat, 50):.0f} ms p95 {np.percentile(lat, 95):.0f} ms. "
        "Frames arriving while the model is busy are dropped on purpose (newest frame wins)."
    )


if __name__ == "__main__":
    sys.exit(main())
