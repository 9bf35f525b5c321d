"""Questions a manipulation planner asks about one frame of the warehouse cell, answered from its truth.

Each :class:`Question` has a kind, a JSON-able slots dict (its meaning: enough to ask it again
outside this project), one phrasing of it (:mod:`.grammar`), a canonical single-word answer
from the closed vocabulary :data:`ANSWERS`, every accepted spelling of that answer, and the
pixel boxes that show the evidence.

Kinds, slots and answers:

- ``color_at`` {level, slot, object_kind}: the color of the object in that slot (a color).
- ``label_at`` {level, slot, object_kind}: the letter on it (``a`` .. ``f``, lower case).
- ``count`` {color}: how many items of that color are on the shelves (``zero`` .. ``twelve``).
- ``exists`` {color, object_kind}: is one on the shelves (``yes``/``no``).
- ``which_level`` {color, object_kind}: its level (``top``/``middle``/``bottom``).
- ``left_right`` {a: {color, object_kind}, b: {...}}: is a left or right of b in the image
  (``left``/``right``); both on one level.
- ``gripper`` {}: is the arm holding something (``yes``/``no``).
- ``aisle`` {}: ``clear`` or ``blocked`` (not yes/no, so "is it clear?" and "is it blocked?"
  phrasings share one answer).
- ``where`` {color, object_kind}: level and slot as one word, ``<level>-<slot>`` (``top-two``).
- ``empty_slot`` {level}: the one empty slot of that level (``one`` .. ``four``), or ``none``
  when the level is full.
- ``holding`` {}: the color of what the arm holds, or ``nothing``.
- ``count_level`` {level}: how many boxes and totes are on that level (``zero`` .. ``four``).

Only determined, unambiguous questions are asked: objects named by color and kind are the
only such object in the cell, every object a question is about is visible (a box and at least
:data:`MIN_VISIBLE` of it in view), and counts and empty slots only over levels whose every
object is visible.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from itertools import permutations, product

import numpy as np

from atp_ros.warehouse.cell.grammar import SPLITS, phrasings, render_question
from atp_ros.warehouse.cell.truth import COLORS, LABELS, LEVELS, SLOTS, CellObject, CellTruth

__all__ = [
    "ANSWERS",
    "KINDS",
    "SPLITS",
    "Question",
    "accepted_answers",
    "candidates",
    "contrast_questions",
    "is_contrast",
    "phrasings",
    "questions_for",
    "render_question",
]

KINDS = (
    "color_at",
    "count",
    "exists",
    "which_level",
    "left_right",
    "label_at",
    "gripper",
    "aisle",
    "where",
    "empty_slot",
    "holding",
    "count_level",
)
MIN_VISIBLE = 0.3
LABEL_MIN_VISIBLE = 0.6  # a letter needs most of the face in view to be readable
SHELF_KINDS = ("box", "tote")
COUNT_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
)
WHERE_WORDS = tuple(f"{level}-{slot}" for level in LEVELS for slot in SLOTS)
ANSWERS: tuple[str, ...] = tuple(
    sorted(
        {*COLORS, *(c.lower() for c in LABELS), *COUNT_WORDS, *LEVELS, *WHERE_WORDS}
        | {"yes", "no", "left", "right", "clear", "blocked", "nothing", "none"}
    )
)
_SYNONYMS = {"clear": ("free", "open"), "blocked": ("obstructed",), "nothing": ("none", "empty")}

Box = tuple[int, int, int, int]
Candidate = tuple[dict, str, tuple[Box, ...]]  # slots, answer, evidence


@dataclass(frozen=True)
class Question:
    """One question about a frame: its wording, answer(s), meaning (kind + slots) and evidence boxes."""

    question: str
    answer: str
    answers: tuple[str, ...]
    kind: str
    slots: dict
    evidence: tuple[tuple[int, int, int, int], ...]

    def as_dict(self) -> dict:
        """A JSON-able copy."""
        return {
            "question": self.question,
            "answer": self.answer,
            "answers": list(self.answers),
            "kind": self.kind,
            "slots": copy.deepcopy(self.slots),
            "evidence": [list(b) for b in self.evidence],
        }


def accepted_answers(answer: str) -> tuple[str, ...]:
    """``answer`` first, then the other spellings a free-form reply may use for it."""
    out = [answer, *_SYNONYMS.get(answer, ())]
    if answer in COUNT_WORDS:
        out.append(str(COUNT_WORDS.index(answer)))
    if answer in WHERE_WORDS:
        level, slot = answer.split("-")
        out += [f"{level} {slot}", f"{level} {SLOTS.index(slot) + 1}"]
    return tuple(out)


def _box(box) -> Box:
    return tuple(int(v) for v in box)  # type: ignore[return-value]


def _visible(o: CellObject, min_fraction: float = MIN_VISIBLE) -> bool:
    return o.box is not None and o.visible_fraction >= min_fraction


def _shelf(truth: CellTruth) -> list[CellObject]:
    return [o for o in truth.objects if o.place == "shelf" and o.level in LEVELS and o.slot in SLOTS]


def _ref(o: CellObject) -> dict:
    return {"color": o.color, "object_kind": o.kind}


def _nameable(truth: CellTruth) -> list[CellObject]:
    """Visible shelf objects that "the <color> <kind>" names unambiguously (unique in the whole cell)."""
    return [
        o
        for o in _shelf(truth)
        if _visible(o)
        and o.color in COLORS
        and o.kind in SHELF_KINDS
        and sum(p.color == o.color and p.kind == o.kind for p in truth.objects) == 1
    ]


def _in_slot(truth: CellTruth, min_fraction: float) -> list[CellObject]:
    """Visible boxes and totes alone in their slot."""
    shelf = _shelf(truth)
    return [
        o
        for o in shelf
        if _visible(o, min_fraction)
        and o.kind in SHELF_KINDS
        and sum(p.level == o.level and p.slot == o.slot for p in shelf) == 1
    ]


def _color_at(truth: CellTruth) -> list[Candidate]:
    return [
        ({"level": o.level, "slot": o.slot, "object_kind": o.kind}, o.color, (_box(o.box),))
        for o in _in_slot(truth, MIN_VISIBLE)
        if o.color in COLORS
    ]


def _label_at(truth: CellTruth) -> list[Candidate]:
    return [
        ({"level": o.level, "slot": o.slot, "object_kind": o.kind}, o.label.lower(), (_box(o.box),))
        for o in _in_slot(truth, LABEL_MIN_VISIBLE)
        if o.label in LABELS
    ]


def _count(truth: CellTruth) -> list[Candidate]:
    out = []
    for color in COLORS:
        hits = [o for o in _shelf(truth) if o.color == color]
        # A hidden or non-box item of this color would make the count unknowable or ill-posed.
        if all(_visible(o) and o.kind in SHELF_KINDS for o in hits) and len(hits) < len(COUNT_WORDS):
            out.append(({"color": color}, COUNT_WORDS[len(hits)], tuple(_box(o.box) for o in hits)))
    return out


def _exists(truth: CellTruth) -> list[Candidate]:
    out = []
    for color, kind in product(COLORS, SHELF_KINDS):
        hits = [o for o in _shelf(truth) if o.color == color and o.kind == kind]
        seen = [o for o in hits if _visible(o)]
        if hits and not seen:
            continue  # there, but not to be seen: neither yes nor no is determined
        answer = "yes" if seen else "no"
        out.append(({"color": color, "object_kind": kind}, answer, tuple(_box(o.box) for o in seen)))
    return out


def _which_level(truth: CellTruth) -> list[Candidate]:
    return [(_ref(o), o.level, (_box(o.box),)) for o in _nameable(truth)]


def _where(truth: CellTruth) -> list[Candidate]:
    return [(_ref(o), f"{o.level}-{o.slot}", (_box(o.box),)) for o in _nameable(truth)]


def _left_right(truth: CellTruth) -> list[Candidate]:
    out = []
    for a, b in permutations(_nameable(truth), 2):
        if a.level != b.level or a.slot == b.slot:
            continue
        # Left and right as seen in the image: compare the evidence boxes' centers.
        ca, cb = a.box[0] + a.box[2], b.box[0] + b.box[2]
        if ca != cb:
            out.append(({"a": _ref(a), "b": _ref(b)}, "left" if ca < cb else "right", (_box(a.box), _box(b.box))))
    return out


def _held(truth: CellTruth) -> tuple[bool, CellObject | None]:
    """(answerable, held object): answerable when the arm is in view and what it holds (if any) is too."""
    if truth.arm_box is None:
        return False, None
    if truth.gripper_holding is None:
        return True, None
    held = next((o for o in truth.objects if o.id == truth.gripper_holding), None)
    return held is not None and _visible(held), held


def _gripper(truth: CellTruth) -> list[Candidate]:
    ok, held = _held(truth)
    if not ok:
        return []
    if held is None:
        return [({}, "no", (_box(truth.arm_box),))]
    return [({}, "yes", (_box(truth.arm_box), _box(held.box)))]


def _holding(truth: CellTruth) -> list[Candidate]:
    ok, held = _held(truth)
    if not ok:
        return []
    if held is None:
        return [({}, "nothing", (_box(truth.arm_box),))]
    if held.color not in COLORS:
        return []
    return [({}, held.color, (_box(truth.arm_box), _box(held.box)))]


def _aisle(truth: CellTruth) -> list[Candidate]:
    if truth.aisle_blocked:
        blockers = [_box(o.box) for o in truth.objects if o.place == "aisle" and _visible(o)]
        return [({}, "blocked", tuple(blockers))] if blockers else []
    # The truth contract has no aisle region; use one if a renderer adds ``aisle_box``.
    region = getattr(truth, "aisle_box", None)
    return [({}, "clear", (_box(region),) if region is not None else ())]


def _level_objects(truth: CellTruth, level: str) -> list[CellObject] | None:
    """The boxes and totes on ``level``; None unless every object there is a visible box or tote."""
    on = [o for o in _shelf(truth) if o.level == level]
    return on if all(_visible(o) and o.kind in SHELF_KINDS for o in on) else None


def _empty_slot(truth: CellTruth) -> list[Candidate]:
    out = []
    for level in LEVELS:
        on = _level_objects(truth, level)
        if on is None:
            continue
        empty = [s for s in SLOTS if all(o.slot != s for o in on)]
        if len(empty) <= 1:  # two or more empty slots: "which one" has no single answer
            out.append(({"level": level}, empty[0] if empty else "none", tuple(_box(o.box) for o in on)))
    return out


def _count_level(truth: CellTruth) -> list[Candidate]:
    out = []
    for level in LEVELS:
        on = _level_objects(truth, level)
        if on is not None:
            out.append(({"level": level}, COUNT_WORDS[len(on)], tuple(_box(o.box) for o in on)))
    return out


_CANDIDATES: dict[str, Callable[[CellTruth], list[Candidate]]] = {
    "color_at": _color_at,
    "count": _count,
    "exists": _exists,
    "which_level": _which_level,
    "left_right": _left_right,
    "label_at": _label_at,
    "gripper": _gripper,
    "aisle": _aisle,
    "where": _where,
    "empty_slot": _empty_slot,
    "holding": _holding,
    "count_level": _count_level,
}


def candidates(truth: CellTruth, kind: str) -> list[Candidate]:
    """Every determined question of ``kind`` about ``truth`` as ``(slots, answer, evidence)``."""
    if kind not in _CANDIDATES:
        raise ValueError(f"unknown question kind {kind!r} (known: {', '.join(KINDS)})")
    return _CANDIDATES[kind](truth)


# Kinds whose question names an item by color and object kind ("the red box"), so that a same-color item of
# the other kind on the racking (a red tote) is the wrong one: the answer depends on telling box from tote.
CONTRAST_KINDS = ("where", "which_level", "exists", "left_right")


def _has_twin(truth: CellTruth, ref: dict) -> bool:
    """Whether the racking holds an item of ``ref``'s color and the other shelf kind."""
    return any(
        o.color == ref["color"] and o.kind in SHELF_KINDS and o.kind != ref["object_kind"] for o in _shelf(truth)
    )


def is_contrast(truth: CellTruth, kind: str, slots: dict) -> bool:
    """Whether a question of ``kind`` with ``slots`` names an item (either, for left/right) whose color an item
    of the other object kind shares on the racking, so that the color alone does not decide the answer."""
    if kind not in CONTRAST_KINDS:
        return False
    refs = (slots["a"], slots["b"]) if kind == "left_right" else (slots,)
    return any(_has_twin(truth, ref) for ref in refs)


def contrast_candidates(truth: CellTruth, kind: str) -> list[Candidate]:
    """The candidates of a :data:`CONTRAST_KINDS` kind that :func:`is_contrast`: answered from the color alone
    they go wrong half the time."""
    return [c for c in candidates(truth, kind) if is_contrast(truth, kind, c[0])]


def contrast_questions(truth: CellTruth, rng: np.random.Generator, n: int, split: str) -> list[Question]:
    """``n`` questions worded for ``split`` from :func:`contrast_candidates`, the kinds taken uniformly among
    those the frame allows; none when the racking holds no same-color box and tote (such a frame would give only
    ``exists`` questions about the kind that is not there, and a flood of those taught ``no``)."""
    shelf = {(o.color, o.kind) for o in _shelf(truth)}
    if not any((color, "box") in shelf and (color, "tote") in shelf for color, _ in shelf):
        return []
    pools = {kind: contrast_candidates(truth, kind) for kind in CONTRAST_KINDS}
    kinds = [kind for kind in CONTRAST_KINDS if pools[kind]]
    if not kinds:
        return []
    out = []
    for _ in range(n):
        kind = kinds[int(rng.integers(len(kinds)))]
        out.append(_draw(kind, pools[kind], rng, split, False))
    return out


def _draw(kind: str, pool: list[Candidate], rng: np.random.Generator, split: str, held_out_only: bool) -> Question:
    """One question of ``kind``: an answer drawn uniformly first, then a question with that answer."""
    answers = sorted({a for _, a, _ in pool})
    answer = answers[int(rng.integers(len(answers)))]
    matching = [c for c in pool if c[1] == answer]
    slots, _, evidence = matching[int(rng.integers(len(matching)))]
    text = render_question(kind, slots, rng, split, held_out_only)
    return Question(text, answer, accepted_answers(answer), kind, copy.deepcopy(slots), evidence)


def questions_for(
    truth: CellTruth, rng: np.random.Generator, n: int, split: str, held_out_only: bool = False
) -> list[Question]:
    """``n`` questions about ``truth`` worded for ``split``, balanced over the kinds this frame can answer.

    Kinds come round in shuffled rounds so each answerable kind is asked about equally often;
    within a kind the answer is drawn uniformly among those the frame allows (yes/no 50/50
    where both occur). ``held_out_only`` (test split only) words every question with a
    held-out phrasing. Empty when the frame allows no question at all.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    pools = {kind: candidates(truth, kind) for kind in KINDS}
    kinds = [kind for kind in KINDS if pools[kind]]
    out: list[Question] = []
    order: list[str] = []
    while kinds and len(out) < n:
        if not order:
            order = [kinds[int(i)] for i in rng.permutation(len(kinds))]
        kind = order.pop(0)
        out.append(_draw(kind, pools[kind], rng, split, held_out_only))
    return out
