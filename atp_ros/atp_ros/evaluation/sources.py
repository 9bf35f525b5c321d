"""Where evaluation samples come from: recorded bags and image datasets (no ROS installation needed).

* :func:`read_bag`: a rosbag2 (mcap or sqlite3) or a ROS 1 bag, read with ``rosbags``'
  ``AnyReader``. Frames from ``--image-topic`` (``sensor_msgs/Image`` or ``CompressedImage``),
  questions from ``--query-topic`` (``std_msgs/String``: the latest question applies to the frames
  recorded after it), ground truth optional from a JSONL keyed by image stamp (the warehouse
  bag writer's ``ground_truth.jsonl``: ``stamp`` in ns, ``answer``, ``answers``, ``evidence``).
* :func:`read_dataset`: a folder of images with the warehouse generator's ``samples.jsonl``, or
  VQAv2-style (``*questions*.json`` + ``*annotations*.json``) or GQA-style (one ``{qid: {imageId,
  question, answer}}`` JSON) data, images under ``images/``.

Bad input never ends a read: each unusable message or record is counted under one cause
(:class:`Problems`) and skipped; only a source with nothing usable raises :class:`SourceError`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from atp_ros.backends.images import BadInput, compressed_to_rgb, raw_to_rgb
from atp_ros.problems import Problems

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class SourceError(ValueError):
    """A source that cannot be evaluated at all; the message says why in one line."""


@dataclass(frozen=True)
class Sample:
    """One frame and the question asked of it, with ground truth where it exists."""

    key: str  # stable id: the image stamp in ns (bags) or the question id (datasets)
    image: np.ndarray  # (H, W, 3) uint8 RGB
    question: str
    answers: tuple[str, ...] = ()  # ground-truth answers (VQA: the 10 human answers); () = none
    evidence: tuple[tuple[float, float, float, float], ...] = ()  # pixel boxes (x0, y0, x1, y1)
    stamp_ns: int | None = None  # header stamp of a bag frame
    kind: str = ""  # the question's kind where the source knows it (the warehouse's KINDS)


@dataclass
class Loaded:
    """What a source gave: the samples, what was skipped, and a one-line description."""

    samples: list[Sample]
    problems: Problems
    description: str


def _stamp_ns(header) -> int:
    return int(header.stamp.sec) * 10**9 + int(header.stamp.nanosec)


def read_truth(path: Path, problems: Problems | None = None) -> dict[int, dict]:
    """Ground truth JSONL keyed by image stamp (ns): ``stamp`` or ``sec`` + ``nanosec`` per line.

    A line that is no record with a whole, finite stamp is counted in ``problems`` (cause
    ``truth``) and skipped; without ``problems`` it raises :class:`SourceError`.
    """
    truth: dict[int, dict] = {}
    try:
        lines = path.read_text().splitlines()
    except (OSError, ValueError) as err:  # missing, unreadable, not UTF-8
        raise SourceError(f"cannot read ground truth {path}: {getattr(err, 'strerror', None) or err}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            stamp = int(rec["stamp"]) if "stamp" in rec else int(rec["sec"]) * 10**9 + int(rec["nanosec"])
        except (ValueError, KeyError, TypeError, OverflowError) as err:  # Infinity: OverflowError
            message = f"{path.name}:{n}: not a ground-truth record with a stamp ({type(err).__name__}: {err})"
            if problems is None:
                raise SourceError(f"{path.parent / message}") from None
            problems.add("truth", message)
            continue
        truth[stamp] = rec
    return truth


def _truth_fields(rec: dict | None) -> tuple[tuple[str, ...], tuple]:
    """``(answers, evidence boxes)`` of a truth record; ValueError naming what is malformed."""
    if not rec:
        return (), ()
    answers = rec.get("answers") or ([rec["answer"]] if rec.get("answer") else [])
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not all(isinstance(a, str | int | float) for a in answers):
        raise ValueError(f"answers must be a list of strings, got {answers!r:.80}")
    evidence = []
    for box in rec.get("evidence") or ():
        values = [float(v) for v in box] if isinstance(box, list) else []
        if len(values) != 4 or not all(np.isfinite(values)):
            raise ValueError(f"an evidence box needs 4 finite numbers, got {box!r}")
        evidence.append(tuple(values))
    return tuple(str(a) for a in answers), tuple(evidence)


def read_bag(
    path: Path,
    image_topic: str,
    query_topic: str,
    truth_path: Path | None = None,
    limit: int = 0,
    max_pixels: int = 4096 * 4096,
) -> Loaded:
    """Frames of ``image_topic`` paired with the latest question of ``query_topic`` before them.

    ``truth_path`` None: ``BAG/ground_truth.jsonl`` when the bag holds one. When the bag has no
    question on ``query_topic`` at all, the ground truth's ``question`` fields are used instead.
    ``limit`` > 0 stops after that many usable samples.
    """
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    path = Path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such bag")
    if truth_path is None and (path / "ground_truth.jsonl").is_file():
        truth_path = path / "ground_truth.jsonl"
    problems = Problems()
    truth = read_truth(Path(truth_path), problems) if truth_path else {}
    try:
        reader = AnyReader([path], default_typestore=get_typestore(Stores.ROS2_HUMBLE))
        reader.open()
    except Exception as err:  # not a bag, unreadable metadata, unknown storage
        raise SourceError(f"{path}: cannot open as a rosbag ({type(err).__name__}: {err})") from None
    try:
        topics = {c.topic: c.msgtype for c in reader.connections}
        has_queries = _check_topics(path, topics, image_topic, query_topic, truth)
        pairing = _BagPairing(image_topic, query_topic, has_queries, truth, max_pixels, problems)
        wanted = [c for c in reader.connections if c.topic in (image_topic, query_topic)]
        for conn, _t, raw in reader.messages(connections=wanted):
            pairing.add(reader, conn, raw)
            if limit and len(pairing.samples) >= limit:
                break
    finally:
        reader.close()
    if has_queries and pairing.queries_seen and not pairing.frames_seen:
        raise SourceError(f"{path}: {pairing.queries_seen} questions but no frame on {image_topic}")
    if not pairing.samples:
        why = "; ".join(pairing.problems.lines()) or f"no messages on {image_topic}"
        raise SourceError(f"{path}: nothing to evaluate ({why})")
    kind = topics[image_topic].rsplit("/", 1)[-1]
    desc = f"bag {path} ({image_topic} {kind}, {query_topic}{', ground truth' if truth else ''})"
    return Loaded(pairing.samples, pairing.problems, desc)


def _check_topics(path: Path, topics: dict[str, str], image_topic: str, query_topic: str, truth: dict) -> bool:
    """SourceError unless the bag has the image topic and questions (on ``query_topic`` or in the
    truth); True when the questions come from ``query_topic``."""
    if image_topic not in topics:
        listed = ", ".join(f"{t} ({m})" for t, m in sorted(topics.items())) or "none"
        raise SourceError(f"{path}: no topic {image_topic!r}; the bag has: {listed}")
    if topics[image_topic] not in IMAGE_TYPES:
        raise SourceError(f"{path}: {image_topic} is {topics[image_topic]}, not an Image or CompressedImage")
    has_queries = query_topic in topics
    if has_queries and topics[query_topic] != "std_msgs/msg/String":
        raise SourceError(f"{path}: {query_topic} is {topics[query_topic]}, not std_msgs/msg/String")
    if not has_queries and not any(rec.get("question") for rec in truth.values()):
        listed = ", ".join(sorted(topics))
        raise SourceError(f"{path}: no questions: no topic {query_topic!r} (the bag has: {listed}) and no truth")
    return has_queries


class _BagPairing:
    """Pairs a bag's frames, in recorded order, with the question in force and their ground truth;
    each unusable message is counted in ``problems`` and skipped."""

    def __init__(
        self, image_topic: str, query_topic: str, has_queries: bool, truth: dict, max_pixels: int, problems: Problems
    ) -> None:
        from atp_ros.backends.images import ImageLimits

        self.image_topic, self.query_topic, self.has_queries, self.truth = image_topic, query_topic, has_queries, truth
        self.limits = ImageLimits(max_pixels=max_pixels)
        self.problems = problems
        self.samples: list[Sample] = []
        self.question = ""
        self.queries_seen = self.frames_seen = 0
        self.seen_keys: set[str] = set()

    def add(self, reader, conn, raw: bytes) -> None:
        """One recorded message: a question replaces the one in force, a frame becomes a sample."""
        try:
            msg = reader.deserialize(raw, conn.msgtype)
        except Exception as err:  # truncated or garbled CDR
            self.problems.add("corrupt", f"{conn.topic}: cannot deserialize ({type(err).__name__})")
            return
        if conn.topic == self.query_topic:
            self.queries_seen += 1
            self.question = str(msg.data).strip()
            return
        self.frames_seen += 1
        self._frame(msg, conn.msgtype)

    def _frame(self, msg, msgtype: str) -> None:
        problems = self.problems
        stamp = _stamp_ns(msg.header)
        rec = self.truth.get(stamp)
        asked = self.question if self.has_queries else str((rec or {}).get("question", ""))
        if not asked:
            problems.add("no_question", f"frame {stamp} arrived before any question")
            return
        try:
            rgb = compressed_to_rgb(msg, self.limits) if "Compressed" in msgtype else raw_to_rgb(msg, self.limits)
        except BadInput as err:
            problems.add(err.cause, f"frame {stamp}: {err}")
            return
        try:
            answers, evidence = _truth_fields(rec)
        except (TypeError, ValueError) as err:
            problems.add("truth", f"frame {stamp}: ground truth unusable ({err}); evaluated for fidelity only")
            answers, evidence = (), ()
        if self.truth and rec is None:
            problems.add("no_truth", f"frame {stamp} has no ground-truth line (evaluated for fidelity only)")
        key = str(stamp)
        if key in self.seen_keys:  # a repeated stamp (unset clocks): keep both frames apart
            problems.add("duplicate_stamp", f"stamp {stamp} repeats; frames told apart by order")
            key = f"{stamp}#{self.frames_seen}"
        self.seen_keys.add(key)
        self.samples.append(Sample(key, rgb, asked, answers, evidence, stamp))


def _load_image(path: Path, problems: Problems, max_pixels: int) -> np.ndarray | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)  # the limit below decides
            with PILImage.open(path) as img:
                if img.width * img.height > max_pixels:
                    problems.add("too_large", f"{path.name}: {img.width}x{img.height} exceeds the pixel limit")
                    return None
                return np.asarray(img.convert("RGB"))
    except PILImage.DecompressionBombError as err:  # a header declaring more than Pillow's own limit
        problems.add("too_large", f"{path.name}: {err}")
    except Exception as err:  # missing, truncated, not an image; Pillow's plugins raise many kinds
        problems.add("image", f"{path.name}: {type(err).__name__}: {err}")
    return None


def _find_image(images: Path, image_id) -> Path | None:
    """``images/<id>.<ext>``, or a COCO file name ending in the zero-padded id."""
    for ext in IMAGE_EXTENSIONS:
        if (images / f"{image_id}{ext}").is_file():
            return images / f"{image_id}{ext}"
    if not isinstance(image_id, str | int) or isinstance(image_id, bool):
        return None
    if str(image_id).isdigit():
        matches = sorted(images.glob(f"*_{int(image_id):012d}.*"))
        if matches:
            return matches[0]
    return None


RECORD_ERRORS = (ValueError, KeyError, TypeError, AttributeError, OverflowError)  # what a malformed record raises


class _DatasetReader:
    """Turns a dataset's records into samples; each unusable record or image is counted and skipped."""

    def __init__(self, root: Path, limit: int, max_pixels: int) -> None:
        self.root, self.limit, self.max_pixels = root, limit, max_pixels
        self.images = root / "images" if (root / "images").is_dir() else root
        self.problems = Problems()
        self.samples: list[Sample] = []

    def full(self) -> bool:
        """True once ``limit`` samples were read."""
        return bool(self.limit) and len(self.samples) >= self.limit

    def add(self, key: str, image_path: Path | None, question, answers, evidence=(), kind: str = "") -> None:
        """One record; ValueError / TypeError for a malformed field (the caller counts it)."""
        if not isinstance(question, str):
            raise TypeError(f"question must be a string, got {question!r:.80}")
        if not isinstance(answers, list | tuple) or not all(isinstance(a, str | int | float) for a in answers):
            raise TypeError(f"answers must be a list of strings, got {answers!r:.80}")
        if image_path is None:
            self.problems.add("image", f"{key}: image not found under {self.images}")
            return
        rgb = _load_image(image_path, self.problems, self.max_pixels)
        if rgb is None:
            return
        if not question.strip():
            self.problems.add("question", f"{key}: empty question")
            return
        boxes = tuple(tuple(float(v) for v in b) for b in evidence)
        self.samples.append(Sample(key, rgb, question.strip(), tuple(str(a) for a in answers), boxes, kind=kind))

    def each(self, where: str, records) -> Iterator:
        """``(label, record)`` of ``records`` until the limit; a record the loop body fails on is
        counted (cause ``record``) by :meth:`guard`."""
        for n, rec in enumerate(records, 1):
            if self.full():
                return
            yield f"{where}:{n}", rec

    def guard(self, label: str, read) -> None:
        """``read()``, counting a malformed record under ``record`` instead of raising."""
        try:
            read()
        except RECORD_ERRORS as err:
            self.problems.add("record", f"{label}: {type(err).__name__}: {err}")

    def warehouse(self, jsonl: Path) -> None:
        """The warehouse generator's samples.jsonl."""
        try:
            text = jsonl.read_text()
        except (OSError, ValueError) as err:  # unreadable or not UTF-8
            raise SourceError(f"{jsonl}: cannot read ({err})") from None
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        for _, (n, line) in self.each("samples.jsonl", lines):
            self.guard(f"samples.jsonl:{n}", lambda line=line, n=n: self._warehouse_record(n, json.loads(line)))

    def _warehouse_record(self, n: int, rec: dict) -> None:
        path = self.root / rec["image"]
        answers, evidence = _truth_fields(rec)
        self.add(
            f"{n}", path if path.is_file() else None, rec["question"], list(answers), evidence, str(rec.get("kind", ""))
        )

    def vqa(self, q_file: Path, a_file: Path) -> None:
        """VQAv2: ``{"questions": [...]}`` + ``{"annotations": [...]}``."""
        try:
            questions = json.loads(q_file.read_text())["questions"]
            annotations = json.loads(a_file.read_text())["annotations"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SourceError(f"{self.root}: cannot read VQA files ({type(err).__name__}: {err})") from None
        if not isinstance(questions, list) or not isinstance(annotations, list):
            raise SourceError(f"{self.root}: VQA questions and annotations must be lists")
        notes: dict = {}
        for label, ann in self.each(a_file.name, annotations):
            self.guard(label, lambda ann=ann: notes.__setitem__(_hashable_id(ann["question_id"]), ann))
        for label, q in self.each(q_file.name, questions):
            self.guard(label, lambda q=q: self._vqa_record(q, notes))

    def _vqa_record(self, q: dict, notes: dict) -> None:
        qid = _hashable_id(q["question_id"])
        ann = notes.get(qid)
        given = ann.get("answers", []) if ann else []
        if not isinstance(given, list) or not all(isinstance(a, dict) for a in given):
            raise TypeError(f"answers of question {qid} must be a list of {{answer: ...}}, got {given!r:.80}")
        answers = [a["answer"] for a in given]
        self.add(str(qid), _find_image(self.images, q.get("image_id")), q.get("question", ""), answers)

    def gqa(self, q_file: Path) -> None:
        """GQA: ``{question id: {"imageId", "question", "answer"}}``."""
        try:
            questions = json.loads(q_file.read_text())
        except (OSError, ValueError) as err:
            raise SourceError(f"{self.root}: cannot read {q_file.name} ({err})") from None
        if not isinstance(questions, dict):
            raise SourceError(f"{self.root}: {q_file.name} is not a GQA {{question id: question}} map")
        for label, (qid, q) in self.each(q_file.name, questions.items()):
            self.guard(f"{label} ({qid})", lambda qid=qid, q=q: self._gqa_record(qid, q))

    def _gqa_record(self, qid: str, q: dict) -> None:
        if not isinstance(q, dict):
            raise TypeError(f"question {qid} must be a {{imageId, question, answer}} map, got {q!r:.80}")
        answers = [q["answer"]] if q.get("answer") else []
        self.add(str(qid), _find_image(self.images, q.get("imageId")), q.get("question", ""), answers)


def _hashable_id(value) -> int | str:
    """A question id as a dictionary key; TypeError for a list, a map or another non-id."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"question_id must be a number or a string, got {value!r:.80}")
    return value


def read_dataset(root: Path, limit: int = 0, max_pixels: int = 4096 * 4096) -> Loaded:
    """A folder of images with questions: warehouse ``samples.jsonl``, VQAv2-style or GQA-style JSON."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root}: no such directory")
    reader = _DatasetReader(root, limit, max_pixels)
    jsonl = root / "samples.jsonl"
    q_files = sorted(root.glob("*questions*.json"))
    a_files = sorted(root.glob("*annotations*.json"))
    if jsonl.is_file():
        kind = "warehouse samples.jsonl"
        reader.warehouse(jsonl)
    elif q_files and a_files:
        kind = "VQAv2-style questions + annotations"
        reader.vqa(q_files[0], a_files[0])
    elif q_files:
        kind = "GQA-style questions"
        reader.gqa(q_files[0])
    else:
        raise SourceError(f"{root}: no samples.jsonl, *questions*.json or *annotations*.json")
    if not reader.samples:
        raise SourceError(f"{root}: nothing to evaluate ({'; '.join(reader.problems.lines()) or 'no records'})")
    return Loaded(reader.samples, reader.problems, f"dataset {root} ({kind})")
