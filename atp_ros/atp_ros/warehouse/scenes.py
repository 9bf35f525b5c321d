"""The synthetic warehouse: seeded frames of a robot arm's view, questions and ground truth.

A frame shows a back wall with shelving (3 levels x 4 slots; boxes and totes of six
colors, some boxes with a large letter label), a floor with a yellow-marked aisle, cones
and pallets, a conveyor on the left, and the arm's gripper at the bottom (empty or holding
a box). Lighting, textures and sensor noise vary per seed. The layout lives in normalized
coordinates, so any output size shows the same scene; everything is plain numpy and
deterministic for a seed.

:func:`questions_for_scene` asks a planner's questions about a scene from templates with
a closed answer vocabulary; each :class:`Question` carries its canonical answer, every
accepted answer and the ground-truth evidence as pixel boxes. :func:`captions_for_scene`
states facts in the questions' own words (what the contrastive tower is trained on).

Splits are seed ranges (:data:`SPLITS`): train ``[0, 1e6)``, validation ``[1e6, 2e6)``,
test ``[2e6, 3e6)``. ``seed`` inside a split is an offset from the split's start.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from atp_ros.warehouse.drawing import Box, fill, letter, triangle

SPLITS: dict[str, int] = {"train": 0, "validation": 1_000_000, "test": 2_000_000}
SPLIT_SIZE = 1_000_000

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (205, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 210),
    "yellow": (235, 205, 40),
    "purple": (140, 55, 175),
    "white": (235, 235, 230),
}
LEVELS = ("top", "middle", "bottom")
SLOTS = ("one", "two", "three", "four")
LETTERS = ("a", "b", "c", "d", "e", "f")
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five")
KINDS = ("color_at", "count", "exists", "which_level", "left_right", "label_at", "gripper", "aisle")

# Normalized layout (fractions of width / height).
SHELF_X = (0.04, 0.96)
SHELF_Y = (0.04, 0.58)
FLOOR_Y = 0.60
AISLE_X = (0.34, 0.80)  # between the yellow lines
AISLE_Y = (0.62, 0.84)  # the floor ahead of the gripper
CONVEYOR_X = (0.0, 0.16)
GRIPPER_X = (0.42, 0.58)
GRIPPER_Y = (0.84, 1.0)


@dataclass(frozen=True)
class SceneObject:
    """One thing in the scene; ``box`` normalized ``(x0, y0, x1, y1)``."""

    kind: str  # box, tote, cone, pallet, gripper
    color: str
    box: Box
    level: int = -1  # shelf level index (0 = top), -1 off the shelves
    slot: int = -1  # slot index (0 = leftmost)
    label: str = ""  # letter on a box, "" when none


@dataclass(frozen=True)
class Question:
    """A question about one scene with its closed-vocabulary answer and evidence boxes (pixels)."""

    question: str
    answer: str
    kind: str
    evidence: tuple[tuple[int, int, int, int], ...]
    answers: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {
            "question": self.question,
            "answer": self.answer,
            "answers": list(self.answers or (self.answer,)),
            "kind": self.kind,
            "evidence": [list(b) for b in self.evidence],
        }


@dataclass(frozen=True)
class Scene:
    """A rendered frame and its annotations."""

    rgb: np.ndarray  # (H, W, 3) uint8
    objects: tuple[SceneObject, ...]
    holding: str  # color of the gripped box, or "nothing"
    aisle_clear: bool
    seed: int = 0
    _extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def shelf_objects(self) -> list[SceneObject]:
        return [o for o in self.objects if o.level >= 0]

    def count(self, kind: str | None = None, color: str | None = None) -> int:
        return sum((kind is None or o.kind == kind) and (color is None or o.color == color) for o in self.objects)

    def pixel_box(self, box: Box) -> tuple[int, int, int, int]:
        h, w = self.rgb.shape[:2]
        x0, y0, x1, y1 = box
        return (round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h))


# ---------------------------------------------------------------------------- rendering


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def level_box(level: int) -> Box:
    h = (SHELF_Y[1] - SHELF_Y[0]) / len(LEVELS)
    return (SHELF_X[0], SHELF_Y[0] + level * h, SHELF_X[1], SHELF_Y[0] + (level + 1) * h)


def slot_box(level: int, slot: int) -> Box:
    x0, y0, x1, y1 = level_box(level)
    w = (x1 - x0) / len(SLOTS)
    return (x0 + slot * w, y0, x0 + (slot + 1) * w, y1)


def render_scene(seed: int, height: int = 240, width: int = 320, max_objects: int | None = None) -> Scene:
    """One warehouse frame of ``height x width`` for ``seed`` (same seed, same scene at any size)."""
    del max_objects  # kept for callers of the first version: the layout now fixes what is where
    rng = np.random.default_rng(seed)  # every step draws from it in turn: the order fixes the scene
    img = _backdrop(rng, height, width)
    objects = _shelf(img, rng)
    floor_items = _floor(img, rng)
    objects.extend(floor_items)
    aisle_box = (AISLE_X[0], AISLE_Y[0], AISLE_X[1], AISLE_Y[1])
    aisle_clear = not any(_overlaps(o.box, aisle_box) for o in floor_items)
    gripper = _gripper(img, rng)
    objects.append(gripper)
    # Lighting (gain + horizontal gradient) and sensor noise.
    gain = rng.uniform(0.75, 1.2)
    grad = 1 + rng.uniform(-0.15, 0.15) * np.linspace(-1, 1, width)[None, :, None]
    img = img * gain * grad + rng.normal(0, rng.uniform(1.5, 6.0), img.shape)
    rgb = np.clip(img, 0, 255).astype(np.uint8)
    return Scene(rgb, tuple(objects), gripper.color, aisle_clear, seed)


def _backdrop(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Wall and floor with low-frequency texture, the conveyor, the aisle lines and the shelving's back panel."""
    img = np.zeros((height, width, 3), dtype=np.float32)
    wall = np.array([150, 152, 160]) + rng.uniform(-15, 15, 3)
    floor = np.array([115, 108, 98]) + rng.uniform(-12, 12, 3)
    img[: round(FLOOR_Y * height)] = wall
    img[round(FLOOR_Y * height) :] = floor
    tex = rng.normal(0, 1, (6, 8))
    tex = np.kron(tex, np.ones((height // 6 + 1, width // 8 + 1)))[:height, :width]
    img += 6 * tex[..., None]
    fill(img, (CONVEYOR_X[0], FLOOR_Y - 0.02, CONVEYOR_X[1], 1.0), (55, 58, 62))  # belt
    for y in np.arange(FLOOR_Y, 1.0, 0.06):
        fill(img, (CONVEYOR_X[0], y, CONVEYOR_X[1], y + 0.012), (95, 98, 105))  # rollers
    for x in AISLE_X:
        fill(img, (x - 0.012, FLOOR_Y + 0.01, x + 0.012, 1.0), (225, 200, 50))
    fill(img, (SHELF_X[0], SHELF_Y[0], SHELF_X[1], SHELF_Y[1]), (118, 122, 130))
    return img


def _shelf(img: np.ndarray, rng: np.random.Generator) -> list[SceneObject]:
    """Boxes and totes in the shelf slots (some boxes labelled), then the beams and uprights over them."""
    objects: list[SceneObject] = []
    colors = list(COLORS)
    for level in range(len(LEVELS)):
        for slot in range(len(SLOTS)):
            if rng.random() > 0.62:
                continue
            sx0, sy0, sx1, sy1 = slot_box(level, slot)
            sw, sh = sx1 - sx0, sy1 - sy0
            kind = "box" if rng.random() < 0.65 else "tote"
            color = colors[int(rng.integers(len(colors)))]
            ow, oh = sw * rng.uniform(0.6, 0.85), sh * rng.uniform(0.6, 0.82)
            ox0 = sx0 + 0.03 * sw + rng.uniform(0, max(sw * 0.94 - ow, 1e-6))
            oy1 = sy1 - 0.035 * sh
            box = (ox0, oy1 - oh, ox0 + ow, oy1)
            shade = np.array(COLORS[color]) * rng.uniform(0.85, 1.05)
            fill(img, box, shade.clip(0, 255))
            label = ""
            if kind == "box":
                fill(img, (box[0], box[1], box[2], box[1] + 0.12 * oh), shade * 0.8)  # lid edge
                if rng.random() < 0.5:
                    label = LETTERS[int(rng.integers(len(LETTERS)))]
                    letter(img, box, label)
            else:
                fill(img, (box[0], box[1], box[2], box[1] + 0.2 * oh), (35, 35, 38))  # open rim
            objects.append(SceneObject(kind, color, box, level, slot, label))
    for level in range(len(LEVELS)):
        x0, y0, x1, y1 = level_box(level)
        fill(img, (x0, y1 - 0.03, x1, y1), (225, 120, 30))  # beam
    for slot in range(len(SLOTS) + 1):
        x = SHELF_X[0] + slot * (SHELF_X[1] - SHELF_X[0]) / len(SLOTS)
        fill(img, (x - 0.008, SHELF_Y[0], x + 0.008, SHELF_Y[1] + 0.02), (50, 80, 150))  # upright
    return objects


def _floor(img: np.ndarray, rng: np.random.Generator) -> list[SceneObject]:
    """Cones and pallets in or beside the aisle (half of the scenes keep it clear), drawn."""
    blocked = rng.random() < 0.5
    floor_items: list[SceneObject] = []
    n_items = int(rng.integers(1 if blocked else 0, 4))
    for i in range(n_items):
        kind = "cone" if rng.random() < 0.7 else "pallet"
        for _ in range(20):
            if kind == "cone":
                w, h = rng.uniform(0.06, 0.09), rng.uniform(0.12, 0.17)
            else:
                w, h = rng.uniform(0.10, 0.13), rng.uniform(0.06, 0.08)
            in_aisle = blocked and i == 0
            if in_aisle:
                x0 = rng.uniform(AISLE_X[0] + 0.02, AISLE_X[1] - w - 0.02)
            else:  # beside the aisle: between conveyor and left line, or right of the right line
                left = rng.random() < 0.4
                x0 = (
                    rng.uniform(CONVEYOR_X[1] + 0.005, AISLE_X[0] - w - 0.015)
                    if left
                    else rng.uniform(AISLE_X[1] + 0.015, 0.99 - w)
                )
                if blocked and rng.random() < 0.5:  # more obstacles may stand in the aisle too
                    x0 = rng.uniform(AISLE_X[0] + 0.02, AISLE_X[1] - w - 0.02)
            y1 = rng.uniform(FLOOR_Y + h + 0.02, AISLE_Y[1])
            box = (float(x0), float(y1 - h), float(x0 + w), float(y1))
            if not any(_overlaps(box, o.box) for o in floor_items):
                break
        else:
            continue
        floor_items.append(SceneObject(kind, "orange" if kind == "cone" else "brown", box))
    for o in floor_items:
        if o.kind == "cone":
            triangle(img, o.box, (240, 110, 25), (240, 240, 240))
        else:
            fill(img, o.box, (150, 105, 60))
            for k in range(4):  # slats
                x = o.box[0] + (k + 0.5) * (o.box[2] - o.box[0]) / 4
                fill(img, (x - 0.006, o.box[1], x + 0.006, o.box[3]), (105, 70, 40))
    return floor_items


def _gripper(img: np.ndarray, rng: np.random.Generator) -> SceneObject:
    """Two fingers and a wrist at the bottom, maybe holding a box; its color is what it holds ("nothing")."""
    colors = list(COLORS)
    dx = rng.uniform(-0.03, 0.03)
    gx0, gx1 = GRIPPER_X[0] + dx, GRIPPER_X[1] + dx
    holding = "nothing" if rng.random() < 0.35 else colors[int(rng.integers(len(colors)))]
    if holding != "nothing":
        fill(img, (gx0 + 0.02, 0.87, gx1 - 0.02, 0.97), np.array(COLORS[holding]) * 0.95)
    fill(img, (gx0, 0.86, gx0 + 0.022, 1.0), (70, 70, 75))
    fill(img, (gx1 - 0.022, 0.86, gx1, 1.0), (70, 70, 75))
    fill(img, (gx0, 0.95, gx1, 1.0), (90, 90, 96))
    return SceneObject("gripper", holding, (gx0, GRIPPER_Y[0], gx1, GRIPPER_Y[1]))


# ---------------------------------------------------------------------------- questions


def _describe(o: SceneObject) -> str:
    return f"the {o.color} {o.kind}"


def questions_for_scene(scene: Scene, rng: np.random.Generator, count: int = 1, kinds=KINDS) -> list[Question]:
    """``count`` questions about ``scene``, each of a kind drawn uniformly from ``kinds``
    (a kind with nothing to ask about in this scene is redrawn)."""
    out: list[Question] = []
    tries = 0
    while len(out) < count and tries < 50 * count:
        tries += 1
        q = _ask(scene, str(kinds[int(rng.integers(len(kinds)))]), rng)
        if q is not None:
            out.append(q)
    return out


def distinct_questions(scene: Scene, count: int) -> list[Question]:
    """The ``count`` distinct questions the dataset tools ask about ``scene`` (seeded by the scene's seed)."""
    asked: dict[str, Question] = {}
    for q in questions_for_scene(scene, np.random.default_rng([scene.seed, 7]), count=4 * count):
        if q.question not in asked and len(asked) < count:
            asked[q.question] = q
    return list(asked.values())


def _ask(scene: Scene, kind: str, rng: np.random.Generator) -> Question | None:
    px = scene.pixel_box
    shelf = scene.shelf_objects
    colors = list(COLORS)

    def pick(items):
        return items[int(rng.integers(len(items)))] if items else None

    if kind == "color_at":
        o = pick(shelf)
        if o is None:
            return None
        q = f"what color is the {o.kind} on the {LEVELS[o.level]} shelf in slot {SLOTS[o.slot]}?"
        return Question(q, o.color, kind, (px(o.box),))
    if kind == "label_at":
        o = pick([o for o in shelf if o.label])
        if o is None:
            return None
        q = f"what letter is on the box on the {LEVELS[o.level]} shelf in slot {SLOTS[o.slot]}?"
        return Question(q, o.label, kind, (px(o.box),))
    if kind == "count":
        return standing_question(scene, kind, color=pick(colors))
    if kind == "exists":
        if rng.random() < 0.5:
            o = pick(shelf)
            if o is None:
                return None
            return standing_question(scene, kind, color=o.color, object_kind=o.kind)
        return standing_question(scene, kind, color=pick(colors), object_kind=("box", "tote")[int(rng.integers(2))])
    unique = [o for o in shelf if sum(p.color == o.color and p.kind == o.kind for p in shelf) == 1]
    if kind == "which_level":
        o = pick(unique)
        if o is None:
            return None
        q = f"which shelf is {_describe(o)} on?"
        return Question(q, LEVELS[o.level], kind, (px(o.box),))
    if kind == "left_right":
        if len(unique) < 2:
            return None
        i, j = rng.choice(len(unique), size=2, replace=False)
        a, b = unique[int(i)], unique[int(j)]
        if a.slot == b.slot:
            return None
        q = f"is {_describe(a)} left or right of {_describe(b)}?"
        return Question(q, "left" if a.slot < b.slot else "right", kind, (px(a.box), px(b.box)))
    if kind in ("gripper", "aisle"):
        return standing_question(scene, kind)
    raise ValueError(f"unknown question kind {kind!r} (known: {', '.join(KINDS)})")


STANDING_KINDS = ("count", "exists", "gripper", "aisle")


def standing_question(scene: Scene, kind: str, color: str = "red", object_kind: str = "box") -> Question | None:
    """A question that every scene can answer (a robot's standing query), answered for ``scene``.

    ``kind`` is one of :data:`STANDING_KINDS`; ``color``/``object_kind`` fill the templates that
    name an object. None when the answer is outside the vocabulary (more than five of a color).
    """
    px = scene.pixel_box
    shelf = scene.shelf_objects
    if kind == "count":
        hits = [o for o in shelf if o.color == color]
        if len(hits) >= len(COUNT_WORDS):
            return None
        q = f"how many {color} objects are on the shelves?"
        return Question(q, COUNT_WORDS[len(hits)], kind, tuple(px(o.box) for o in hits))
    if kind == "exists":
        hits = [o for o in shelf if o.color == color and o.kind == object_kind]
        q = f"is there a {color} {object_kind} on the shelves?"
        return Question(q, "yes" if hits else "no", kind, tuple(px(o.box) for o in hits))
    if kind == "gripper":
        g = next(o for o in scene.objects if o.kind == "gripper")
        return Question("what is the gripper holding?", scene.holding, kind, (px(g.box),))
    if kind == "aisle":
        aisle = (AISLE_X[0], AISLE_Y[0], AISLE_X[1], AISLE_Y[1])
        blockers = [o for o in scene.objects if o.kind in ("cone", "pallet") and _overlaps(o.box, aisle)]
        evidence = tuple(px(o.box) for o in blockers) if blockers else (px(aisle),)
        return Question("is the aisle clear?", "yes" if scene.aisle_clear else "no", kind, evidence)
    raise ValueError(f"{kind!r} is not a standing question kind ({', '.join(STANDING_KINDS)})")


def captions_for_scene(scene: Scene, rng: np.random.Generator, facts: int = 3) -> list[tuple[str, tuple]]:
    """Facts about parts of ``scene`` in the questions' words: ``[(sentence, evidence pixel boxes)]``."""
    pool: list[tuple[str, tuple]] = []
    px = scene.pixel_box
    for o in scene.shelf_objects:
        where = f"on the {LEVELS[o.level]} shelf in slot {SLOTS[o.slot]}"
        pool.append((f"the {o.kind} {where} is {o.color}", (px(o.box),)))
        if o.label:
            pool.append((f"the letter on the box {where} is {o.label}", (px(o.box),)))
    g = next(o for o in scene.objects if o.kind == "gripper")
    pool.append((f"the gripper is holding {scene.holding}", (px(g.box),)))
    aisle = (AISLE_X[0], AISLE_Y[0], AISLE_X[1], AISLE_Y[1])
    pool.append((f"the aisle is {'clear' if scene.aisle_clear else 'blocked'}", (px(aisle),)))
    idx = rng.permutation(len(pool))[:facts]
    return [pool[int(i)] for i in idx]


def split_seed(split: str, offset: int) -> int:
    """The absolute scene seed of ``offset`` within ``split``; ValueError for an unknown split or offset."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    if not 0 <= offset < SPLIT_SIZE:
        raise ValueError(f"seed offset must be in [0, {SPLIT_SIZE}), got {offset}")
    return SPLITS[split] + offset


def answer_vocabulary() -> list[str]:
    """Every canonical answer a question can have."""
    return sorted({*COLORS, *COUNT_WORDS, "yes", "no", *LEVELS, "left", "right", *LETTERS, "nothing"})


def question_words() -> list[str]:
    """Every word the templates, captions and answers use (the warehouse tokenizer's vocabulary)."""
    words = set(answer_vocabulary()) | set(SLOTS) | {"box", "tote", "objects", "orange", "brown"}
    words |= set(
        "what color is the on shelf in slot letter how many are shelves there a which or right left of "
        "gripper holding aisle clear blocked".split()
    )
    return sorted(words)


def evidence_mask(boxes, image_hw: tuple[int, int], grid: tuple[int, int], min_cover: float = 0.25) -> np.ndarray:
    """Patches of a ``grid`` (rows, cols) laid over an image of ``image_hw`` that show evidence.

    A patch counts when any box covers at least ``min_cover`` of it; a box too small to
    cover that much of any patch marks the patch it covers most. Returns ``(rows, cols)`` bool.
    """
    h, w = image_hw
    gh, gw = grid
    ys = np.linspace(0, h, gh + 1)
    xs = np.linspace(0, w, gw + 1)
    out = np.zeros((gh, gw), dtype=bool)
    area = (h / gh) * (w / gw)
    for x0, y0, x1, y1 in boxes:
        oy = np.clip(np.minimum(ys[1:], y1) - np.maximum(ys[:-1], y0), 0, None)  # (gh,)
        ox = np.clip(np.minimum(xs[1:], x1) - np.maximum(xs[:-1], x0), 0, None)  # (gw,)
        cover = np.outer(oy, ox) / area
        if cover.max() <= 0:
            continue
        hit = cover >= min_cover
        if not hit.any():
            hit = cover == cover.max()
        out |= hit
    return out
