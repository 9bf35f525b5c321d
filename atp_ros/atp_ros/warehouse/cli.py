"""``warehouse``: write synthetic warehouse datasets and rosbags with ground truth.

    warehouse generate --split test --count 200 --seed 0 --out DIR [--size 640x480] [--questions 2]
        DIR/images/*.png and DIR/samples.jsonl (image, question, answer, answers, kind, evidence,
        seed, slots: the question's structured meaning) of stills of the rendered 3D cell;
        ``--held-out-only`` (test split) asks only phrasings never trained on
    warehouse bag --count 100 --rate 10 --out BAG [--split test] [--size 640x480] [--question-every 5]
        one continuous episode of the cell (the arm at work) as a rosbag2 (mcap): /camera/image_raw
        (sensor_msgs/Image rgb8, stamped; ``--jpeg Q``: CompressedImage on /camera/image_raw/compressed),
        /atp_vlm/query (std_msgs/String, a new standing question every few frames) and
        BAG/ground_truth.jsonl, one line per frame keyed by its stamp: the question in force,
        answer(s), evidence boxes.
    --world flat: the 2D world of warehouse-tiny instead (independent stills, 8 template questions,
        no ``slots``; default size 336 for generate).

Splits are disjoint seed ranges (``scenes.SPLITS``); ``--seed`` is the first scene's offset
inside the split. The same arguments write the same files.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Callable
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
WORLDS = ("flat", "cell")


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


def write_samples(split: str, count: int, seed: int, out: Path, sample: Callable[[int], tuple]) -> int:
    """``DIR/images`` + ``DIR/samples.jsonl``: ``sample(seed) -> (rgb, questions)`` per image; returns the count
    of samples (one line per question: image path, the question's fields, the image's seed)."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    n = 0
    with (out / "samples.jsonl").open("w") as f:
        for i in tqdm(range(count), desc=f"{split} images", unit="img"):
            image_seed = split_seed(split, seed + i)
            rgb, questions = sample(image_seed)
            name = f"images/{split}_{seed + i:07d}.png"
            Image.fromarray(rgb).save(out / name)
            for q in questions:
                f.write(json.dumps({"image": name, **q.as_dict(), "seed": image_seed}) + "\n")
                n += 1
    return n


def generate(split: str, count: int, seed: int, out: Path, size: tuple[int, int], questions: int) -> int:
    """Write ``count`` flat-world images and ``questions`` questions per image; returns the number of samples."""

    def sample(scene_seed: int) -> tuple:
        scene = render_scene(scene_seed, height=size[0], width=size[1])
        return scene.rgb, distinct_questions(scene, questions)

    return write_samples(split, count, seed, out, sample)


class BagWriter:
    """A rosbag2 (mcap) of a camera stream and its standing questions, the way a robot records one."""

    START_NS = 1_700_000_000 * 10**9

    def __init__(self, out: Path, image_topic: str, query_topic: str, jpeg: int = 0) -> None:
        """``jpeg`` > 0: frames as ``CompressedImage`` (JPEG of that quality) on ``<image_topic>/compressed``,
        the topic image_transport's compressed plugin publishes; 0: raw ``rgb8`` ``Image`` on ``image_topic``."""
        from rosbags.rosbag2 import StoragePlugin, Writer
        from rosbags.typesys import Stores, get_typestore

        if out.exists():
            raise FileExistsError(f"{out} exists; choose a new --out (rosbag2 will not overwrite)")
        if not 0 <= jpeg <= 100:
            raise ValueError(f"JPEG quality {jpeg} is not in [1, 100] (0: raw frames)")
        self.ts = get_typestore(Stores.ROS2_HUMBLE)  # Image/String/Header are identical from Humble to Kilted
        self._writer = Writer(out, version=9, storage_plugin=StoragePlugin.MCAP)
        self.jpeg = jpeg
        self.image_topic = f"{image_topic}/compressed" if jpeg else image_topic
        self._topics = (self.image_topic, query_topic)

    def __enter__(self) -> BagWriter:
        self._writer.open()
        t = self.ts.types
        kind = "sensor_msgs/msg/CompressedImage" if self.jpeg else "sensor_msgs/msg/Image"
        self._img = self._writer.add_connection(self._topics[0], t[kind].__msgtype__, typestore=self.ts)
        self._query = self._writer.add_connection(
            self._topics[1], t["std_msgs/msg/String"].__msgtype__, typestore=self.ts
        )
        return self

    def __exit__(self, *exc) -> None:
        self._writer.close()

    def stamp(self, index: int, rate: float) -> int:
        """The header stamp (ns) of frame ``index`` of a camera at ``rate`` Hz."""
        return self.START_NS + index * round(1e9 / rate)

    def write_query(self, text: str, stamp: int) -> None:
        Str = self.ts.types["std_msgs/msg/String"]
        self._writer.write(self._query, stamp, self.ts.serialize_cdr(Str(data=text), Str.__msgtype__))

    def write_image(self, rgb: np.ndarray, stamp: int, frame_id: str = "camera_color_optical_frame") -> None:
        t = self.ts.types
        Header, Time = t["std_msgs/msg/Header"], t["builtin_interfaces/msg/Time"]
        h, w = rgb.shape[:2]
        header = Header(stamp=Time(sec=stamp // 10**9, nanosec=stamp % 10**9), frame_id=frame_id)
        if self.jpeg:
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(rgb)).save(buf, "JPEG", quality=self.jpeg)
            Img = t["sensor_msgs/msg/CompressedImage"]
            msg = Img(header=header, format="rgb8; jpeg compressed bgr8", data=np.frombuffer(buf.getvalue(), np.uint8))
        else:
            Img = t["sensor_msgs/msg/Image"]
            msg = Img(header=header, height=h, width=w, encoding="rgb8", is_bigendian=0, step=w * 3,
                      data=rgb.reshape(-1))  # fmt: skip
        self._writer.write(self._img, stamp, self.ts.serialize_cdr(msg, Img.__msgtype__))


def write_bag(
    out: Path,
    split: str,
    count: int,
    seed: int,
    rate: float,
    size: tuple[int, int],
    question_every: int,
    jpeg: int = 0,
) -> int:
    """Write a flat-world bag (independent stills) and its ground-truth sidecar; returns the number of frames."""
    rng = np.random.default_rng([split_seed(split, seed), 11])
    truth_lines = []
    params: dict = {}
    with BagWriter(out, IMAGE_TOPIC, QUERY_TOPIC, jpeg) as bag:
        for i in tqdm(range(count), desc="bag frames", unit="frame"):
            stamp = bag.stamp(i, rate)
            scene_seed = split_seed(split, seed + i)
            scene = render_scene(scene_seed, height=size[0], width=size[1])
            if i % question_every == 0:  # a new standing question, published just before the frame
                kind = STANDING_KINDS[int(rng.integers(len(STANDING_KINDS)))]
                params = {
                    "kind": kind,
                    "color": list(COLORS)[int(rng.integers(len(COLORS)))],
                    "object_kind": ("box", "tote")[int(rng.integers(2))],
                }
                bag.write_query(standing_question(scene, **params).question, stamp - 1_000_000)
            q = standing_question(scene, **params)
            bag.write_image(scene.rgb, stamp)
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
    g.add_argument("--size", type=parse_size, default=None, help="N (square) or WIDTHxHEIGHT (640x480 cell, 336 flat)")
    g.add_argument("--questions", type=int, default=2, help="questions per image")
    g.add_argument("--held-out-only", action="store_true", help="cell, test split: only phrasings held out of training")
    b = sub.add_parser("bag", help="rosbag2 (mcap) camera stream + queries + ground-truth sidecar")
    b.add_argument("--split", choices=list(SPLITS), default="test")
    b.add_argument("--count", type=int, default=100, help="frames")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--rate", type=float, default=10.0, help="camera rate in Hz")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--size", type=parse_size, default=(480, 640), help="N or WIDTHxHEIGHT (default 640x480)")
    b.add_argument("--question-every", type=int, default=5, help="frames per standing question")
    b.add_argument("--jpeg", type=int, default=0, metavar="QUALITY",
                   help="frames as JPEG CompressedImage of this quality on <topic>/compressed (0: raw)")  # fmt: skip
    for p in (g, b):
        p.add_argument("--world", choices=WORLDS, default="cell",
                       help="cell: the rendered 3D cell (warehouse-cell); flat: 2D world (warehouse-tiny)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.size is None:
        args.size = (480, 640) if args.world == "cell" else (336, 336)
    if getattr(args, "held_out_only", False) and (args.world != "cell" or args.split != "test"):
        ap.error("--held-out-only goes with --world cell --split test")
    for name in ("count", "questions", "question_every"):
        if getattr(args, name, 1) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.seed < 0 or args.seed + args.count > 1_000_000:
        ap.error("--seed and --count must stay inside the split's 1,000,000 scenes")
    if args.cmd == "bag" and not 0 < args.rate <= 1000:
        ap.error("--rate must be in (0, 1000] Hz")
    if args.cmd == "bag" and not 0 <= args.jpeg <= 100:
        ap.error("--jpeg must be a JPEG quality in [1, 100], or 0 for raw frames")
    try:
        if args.cmd == "generate" and args.world == "cell":
            from atp_ros.warehouse.cell import dataset

            n = dataset.generate(
                args.split, args.count, args.seed, args.out, args.size, args.questions, args.held_out_only
            )
            print(f"wrote {args.count} images and {n} samples to {args.out}")
        elif args.cmd == "generate":
            n = generate(args.split, args.count, args.seed, args.out, args.size, args.questions)
            print(f"wrote {args.count} images and {n} samples to {args.out}")
        else:
            writer = write_bag
            if args.world == "cell":
                from atp_ros.warehouse.cell.dataset import write_bag as writer
            n = writer(
                args.out, args.split, args.count, args.seed, args.rate, args.size, args.question_every, args.jpeg
            )
            print(f"wrote {n} frames to {args.out} (ground truth: {args.out / TRUTH_FILE})")
    except (OSError, ValueError) as err:
        print(f"warehouse: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
