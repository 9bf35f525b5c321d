"""``warehouse``: write synthetic warehouse datasets and rosbags with ground truth.

    warehouse generate --split test --count 200 --seed 0 --out DIR [--size 336] [--questions 2]
        DIR/images/*.png and DIR/samples.jsonl (image, question, answer, answers, kind, evidence, seed)
    warehouse bag --count 100 --rate 10 --out BAG [--split test] [--size 640x480] [--question-every 5]
        a rosbag2 (mcap): /camera/image_raw (sensor_msgs/Image rgb8, stamped), /atp_vlm/query
        (std_msgs/String, a new standing question every few frames) and BAG/ground_truth.jsonl,
        one line per frame keyed by its stamp: the question in force, answer(s), evidence boxes.

Splits are disjoint seed ranges (``scenes.SPLITS``); ``--seed`` is the first scene's offset
inside the split. The same arguments write the same files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from atp_ros.warehouse.scenes import (
    COLORS,
    SPLITS,
    STANDING_KINDS,
    distinct_questions,
    render_scene,
    split_seed,
    standing_question,
)

IMAGE_TOPIC = "/camera/image_raw"
QUERY_TOPIC = "/atp_vlm/query"
TRUTH_FILE = "ground_truth.jsonl"


def parse_size(text: str) -> tuple[int, int]:
    """``336`` -> (336, 336); ``640x480`` -> (height 480, width 640)."""
    try:
        if "x" in text:
            w, h = (int(v) for v in text.lower().split("x"))
        else:
            w = h = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or WIDTHxHEIGHT, got {text!r}") from None
    if not (16 <= w <= 4096 and 16 <= h <= 4096):
        raise argparse.ArgumentTypeError(f"size {w}x{h} must be within 16..4096 on each side")
    return h, w


def generate(split: str, count: int, seed: int, out: Path, size: tuple[int, int], questions: int) -> int:
    """Write ``count`` images and ``questions`` questions per image; returns the number of samples."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    n = 0
    with (out / "samples.jsonl").open("w") as f:
        for i in tqdm(range(count), desc=f"{split} images", unit="img"):
            scene_seed = split_seed(split, seed + i)
            scene = render_scene(scene_seed, height=size[0], width=size[1])
            name = f"images/{split}_{seed + i:07d}.png"
            Image.fromarray(scene.rgb).save(out / name)
            for q in distinct_questions(scene, questions):
                f.write(json.dumps({"image": name, **q.as_dict(), "seed": scene_seed}) + "\n")
                n += 1
    return n


def write_bag(
    out: Path, split: str, count: int, seed: int, rate: float, size: tuple[int, int], question_every: int
) -> int:
    """Write the bag and its ground-truth sidecar; returns the number of frames."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new --out (rosbag2 will not overwrite)")
    ts = get_typestore(Stores.ROS2_HUMBLE)  # Image/String/Header are identical from Humble to Kilted
    Img = ts.types["sensor_msgs/msg/Image"]
    Header = ts.types["std_msgs/msg/Header"]
    Time = ts.types["builtin_interfaces/msg/Time"]
    Str = ts.types["std_msgs/msg/String"]
    rng = np.random.default_rng([split_seed(split, seed), 11])
    start_ns = 1_700_000_000 * 10**9
    period_ns = round(1e9 / rate)
    truth_lines = []
    with Writer(out, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        img_conn = writer.add_connection(IMAGE_TOPIC, Img.__msgtype__, typestore=ts)
        q_conn = writer.add_connection(QUERY_TOPIC, Str.__msgtype__, typestore=ts)
        params: dict = {}
        for i in tqdm(range(count), desc="bag frames", unit="frame"):
            stamp = start_ns + i * period_ns
            scene_seed = split_seed(split, seed + i)
            scene = render_scene(scene_seed, height=size[0], width=size[1])
            if i % question_every == 0:  # a new standing question, published just before the frame
                kind = STANDING_KINDS[int(rng.integers(len(STANDING_KINDS)))]
                params = {
                    "kind": kind,
                    "color": list(COLORS)[int(rng.integers(len(COLORS)))],
                    "object_kind": ("box", "tote")[int(rng.integers(2))],
                }
                q = standing_question(scene, **params)
                writer.write(q_conn, stamp - 1_000_000, ts.serialize_cdr(Str(data=q.question), Str.__msgtype__))
            q = standing_question(scene, **params)
            header = Header(
                stamp=Time(sec=stamp // 10**9, nanosec=stamp % 10**9), frame_id="camera_color_optical_frame"
            )
            h, w = scene.rgb.shape[:2]
            msg = Img(
                header=header,
                height=h,
                width=w,
                encoding="rgb8",
                is_bigendian=0,
                step=w * 3,
                data=scene.rgb.reshape(-1),
            )
            writer.write(img_conn, stamp, ts.serialize_cdr(msg, Img.__msgtype__))
            truth = {"stamp": stamp, "sec": stamp // 10**9, "nanosec": stamp % 10**9, "seed": scene_seed}
            truth |= q.as_dict() if q is not None else {"question": "", "answer": "", "answers": [], "evidence": []}
            truth_lines.append(json.dumps(truth))
    (out / TRUTH_FILE).write_text("\n".join(truth_lines) + "\n")
    return count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="warehouse", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="images + samples.jsonl")
    g.add_argument("--split", choices=list(SPLITS), default="test")
    g.add_argument("--count", type=int, default=100, help="images")
    g.add_argument("--seed", type=int, default=0, help="first scene offset inside the split")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--size", type=parse_size, default=(336, 336), help="N (square) or WIDTHxHEIGHT")
    g.add_argument("--questions", type=int, default=2, help="questions per image")
    b = sub.add_parser("bag", help="rosbag2 (mcap) camera stream + queries + ground-truth sidecar")
    b.add_argument("--split", choices=list(SPLITS), default="test")
    b.add_argument("--count", type=int, default=100, help="frames")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--rate", type=float, default=10.0, help="camera rate in Hz")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--size", type=parse_size, default=(480, 640), help="N or WIDTHxHEIGHT (default 640x480)")
    b.add_argument("--question-every", type=int, default=5, help="frames per standing question")
    args = ap.parse_args(argv)
    for name in ("count", "questions", "question_every"):
        if getattr(args, name, 1) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.seed < 0 or args.seed + args.count > 1_000_000:
        ap.error("--seed and --count must stay inside the split's 1,000,000 scenes")
    if args.cmd == "bag" and not 0 < args.rate <= 1000:
        ap.error("--rate must be in (0, 1000] Hz")
    try:
        if args.cmd == "generate":
            n = generate(args.split, args.count, args.seed, args.out, args.size, args.questions)
            print(f"wrote {args.count} images and {n} samples to {args.out}")
        else:
            n = write_bag(args.out, args.split, args.count, args.seed, args.rate, args.size, args.question_every)
            print(f"wrote {n} frames to {args.out} (ground truth: {args.out / TRUTH_FILE})")
    except (OSError, ValueError) as err:
        print(f"warehouse: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
