"""The phrasings of the cell's questions: templates per kind, their slot fillers and the held-out split.

A question's meaning is its kind plus a JSON-able slots dict; its wording is a template of
that kind with placeholders filled by synonyms drawn from an rng. Every fourth template of a
kind (index 3, 7, 11, ...) is held out of training: ``train`` and ``val`` render only the
others, ``test`` renders any (or only the held-out ones), so test accuracy measures whether a
model understood the question rather than memorised its wording.
"""

from __future__ import annotations

import re
import string

import numpy as np

from atp_ros.warehouse.cell.truth import SLOTS

# "validation" is the split's name on the command line (scenes.SPLITS), "val" the trainer's; both word
# questions with the training phrasings.
SPLITS = ("train", "val", "validation", "test")

# Placeholders: {obj}/{objs} noun of slots["object_kind"] (singular/plural), {color},
# {a_color} (with its article), {level} an adjective for slots["level"], {shelf} a level noun,
# {shelves} the shelving, {slot} a slot phrase for slots["slot"], {slotn} a slot noun,
# {items} shelf things in plural, {arm} the gripper, {aisle} the aisle, {a}/{b} the two
# objects of left_right.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "color_at": (
        "what color is the {obj} on the {level} {shelf} in {slot}?",
        "what colour is the {obj} in {slot} of the {level} {shelf}?",
        "can you tell me the color of the {obj} at {slot} on the {level} {shelf}?",
        "the {obj} on the {level} {shelf}, {slot}: what color is it?",
        "which color is the {obj} sitting in {slot} on the {level} {shelf}?",
        "tell me what color the {obj} in {slot} on the {level} {shelf} is.",
        "please tell me the colour of the {obj} on the {level} {shelf}, {slot}.",
        "on the {level} {shelf}, what color is the {obj} in {slot}?",
        "what's the color of the {obj} in {slot} of the {level} {shelf}?",
        "could you check what color the {obj} on the {level} {shelf} in {slot} is?",
        "color of the {obj} at {slot}, {level} {shelf}?",
        "in {slot} on the {level} {shelf} there is a {obj}. what color is it?",
        "do you know the color of the {obj} on the {level} {shelf} at {slot}?",
        "hey, what color is that {obj} in {slot} on the {level} {shelf}?",
        "i need the color of the {obj} in {slot} on the {level} {shelf}.",
        "look at the {level} {shelf}: what color is the {obj} in {slot}?",
    ),
    "label_at": (
        "what letter is on the {obj} on the {level} {shelf} in {slot}?",
        "which letter is printed on the {obj} in {slot} of the {level} {shelf}?",
        "can you read the label on the {obj} at {slot} on the {level} {shelf}?",
        "what does the label say on the {obj} in {slot}, {level} {shelf}?",
        "what's the letter on the {obj} sitting in {slot} on the {level} {shelf}?",
        "tell me the letter on the {obj} on the {level} {shelf} in {slot}.",
        "please read the letter on the {obj} in {slot} on the {level} {shelf}.",
        "on the {level} {shelf}, which letter does the {obj} in {slot} show?",
        "what is written on the {obj} at {slot} of the {level} {shelf}?",
        "could you tell me the label letter of the {obj} in {slot} on the {level} {shelf}?",
        "label of the {obj} on the {level} {shelf}, {slot}?",
        "the {obj} in {slot} on the {level} {shelf} is marked with which letter?",
    ),
    "count": (
        "how many {color} {items} are on the {shelves}?",
        "count the {color} {items} on the {shelves}.",
        "can you tell me how many {color} {items} there are on the {shelves}?",
        "what is the number of {color} {items} on the {shelves}?",
        "how many {items} on the {shelves} are {color}?",
        "please count how many {color} {items} sit on the {shelves}.",
        "number of {color} {items} on the {shelves}?",
        "on the {shelves}, how many {items} are {color}?",
        "how many {color} {items} are stored on the {shelves}?",
        "could you count the {color} {items} on the {shelves} for me?",
        "tell me how many {color} {items} you see on the {shelves}.",
        "how many of the {items} on the {shelves} are {color}?",
    ),
    "exists": (
        "is there {a_color} {obj} on the {shelves}?",
        "do you see {a_color} {obj} on the {shelves}?",
        "can you tell me if there is {a_color} {obj} on the {shelves}?",
        "is any {color} {obj} sitting on the {shelves}?",
        "are there any {color} {objs} on the {shelves}?",
        "can i find {a_color} {obj} on the {shelves}?",
        "please check whether {a_color} {obj} is on the {shelves}.",
        "on the {shelves}, is there {a_color} {obj}?",
        "can you spot {a_color} {obj} on the {shelves}?",
        "is {a_color} {obj} stored anywhere on the {shelves}?",
        "any {color} {objs} on the {shelves}?",
        "tell me whether you can find {a_color} {obj} on the {shelves}.",
    ),
    "which_level": (
        "which {shelf} is the {color} {obj} on?",
        "on which {shelf} is the {color} {obj}?",
        "can you tell me which {shelf} the {color} {obj} is on?",
        "what {shelf} holds the {color} {obj}?",
        "is the {color} {obj} on the top, middle or bottom {shelf}?",
        "which {shelf} of the {shelves} has the {color} {obj}?",
        "tell me which {shelf} the {color} {obj} sits on.",
        "the {color} {obj} is on which {shelf}?",
        "please say which {shelf} the {color} {obj} is stored on.",
        "what {shelf} is the {color} {obj} at?",
        "top, middle or bottom: where is the {color} {obj}?",
        "on what {shelf} can i find the {color} {obj}?",
    ),
    "left_right": (
        "is the {a} left or right of the {b}?",
        "is the {a} to the left or to the right of the {b}?",
        "can you tell me if the {a} is left or right of the {b}?",
        "relative to the {b}, is the {a} on the left or the right?",
        "which side of the {b} is the {a} on, left or right?",
        "is the {a} on the left side or the right side of the {b}?",
        "looking at the {shelf}, is the {a} left or right of the {b}?",
        "the {a}: left or right of the {b}?",
        "compared with the {b}, is the {a} further left or further right?",
        "please tell me whether the {a} is left or right of the {b}.",
        "left or right: where is the {a} relative to the {b}?",
        "from the camera's view, is the {a} to the left or right of the {b}?",
    ),
    # Positive polarity only: a "is the gripper empty?" phrasing would flip the yes/no answer.
    "gripper": (
        "is the {arm} holding something?",
        "is the {arm} holding anything?",
        "can you tell me if the {arm} is holding an item?",
        "does the {arm} have something in it?",
        "is there anything in the {arm}?",
        "has the {arm} picked something up?",
        "is the {arm} carrying an object right now?",
        "is something held by the {arm}?",
        "is the {arm} gripping anything at the moment?",
        "please check if the {arm} is holding something.",
        "does the {arm} currently hold an item?",
        "is an object in the {arm}'s grip?",
    ),
    "aisle": (
        "is the {aisle} clear?",
        "is the {aisle} blocked?",
        "can you tell me if the {aisle} is clear or blocked?",
        "is anything blocking the {aisle}?",
        "is the {aisle} free?",
        "is the {aisle} clear or blocked?",
        "is the way down the {aisle} open or blocked?",
        "is there an obstacle in the {aisle}?",
        "what is the state of the {aisle}: clear or blocked?",
        "please check whether the {aisle} is clear.",
        "is the {aisle} obstructed?",
        "is the {aisle} passable or blocked?",
    ),
    "where": (
        "where is the {color} {obj}?",
        "where is the {color} {obj} on the {shelves}?",
        "can you tell me where the {color} {obj} is?",
        "in which {shelf} and {slotn} is the {color} {obj}?",
        "where can i find the {color} {obj}?",
        "what is the location of the {color} {obj} on the {shelves}?",
        "which {shelf} and {slotn} hold the {color} {obj}?",
        "the {color} {obj} is where?",
        "please tell me where the {color} {obj} is stored.",
        "give me the {shelf} and {slotn} of the {color} {obj}.",
        "where on the {shelves} is the {color} {obj} sitting?",
        "where would i pick up the {color} {obj}?",
    ),
    "empty_slot": (
        "which {slotn} on the {level} {shelf} is empty?",
        "which {slotn} is free on the {level} {shelf}?",
        "can you tell me which {slotn} on the {level} {shelf} is empty?",
        "where is there an empty {slotn} on the {level} {shelf}?",
        "on the {level} {shelf}, which {slotn} has nothing in it?",
        "which {slotn} of the {level} {shelf} is open?",
        "find the empty {slotn} on the {level} {shelf}.",
        "which {slotn} on the {level} {shelf} is unoccupied?",
        "please tell me which {slotn} on the {level} {shelf} is available.",
        "which {slotn} on the {level} {shelf} could i place a box in?",
        "is there a free {slotn} on the {level} {shelf}, and which one?",
        "what {slotn} on the {level} {shelf} is vacant?",
    ),
    "holding": (
        "what is the {arm} holding?",
        "what does the {arm} have in it?",
        "can you tell me what the {arm} is holding?",
        "what color is the thing in the {arm}?",
        "what's in the {arm} right now?",
        "what is the {arm} carrying?",
        "tell me what the {arm} has picked up.",
        "what has the {arm} got hold of?",
        "what is held by the {arm}?",
        "please say what the {arm} is gripping.",
        "what is the {arm} currently holding, if anything?",
        "which item is in the {arm}'s grip?",
    ),
    "count_level": (
        "how many {items} are on the {level} {shelf}?",
        "count the {items} on the {level} {shelf}.",
        "can you tell me how many {items} the {level} {shelf} holds?",
        "what is the number of {items} on the {level} {shelf}?",
        "how many {items} sit on the {level} {shelf}?",
        "on the {level} {shelf}, how many {items} are there?",
        "please count the {items} on the {level} {shelf}.",
        "how full is the {level} {shelf}: how many {items}?",
        "number of {items} on the {level} {shelf}?",
        "how many {items} are stored on the {level} {shelf} right now?",
        "could you count how many {items} the {level} {shelf} has?",
        "tell me how many {items} you see on the {level} {shelf}.",
    ),
}

# Synonyms the placeholders draw from (any split may use any synonym; only templates are held out).
OBJECT_NOUNS = {"box": ("box", "carton", "crate", "package"), "tote": ("tote", "bin", "container")}
OBJECT_PLURALS = {"box": ("boxes", "cartons", "crates", "packages"), "tote": ("totes", "bins", "containers")}
LEVEL_WORDS = {
    "top": ("top", "highest", "uppermost"),
    "middle": ("middle", "center", "central"),
    "bottom": ("bottom", "lowest", "bottommost"),
}
SHELF_NOUNS = ("shelf", "level", "row", "tier")
SHELVES = ("shelves", "racks", "shelving", "shelf unit")
SLOT_NOUNS = ("slot", "position", "bay", "spot")
ORDINALS = {"one": "first", "two": "second", "three": "third", "four": "fourth"}
ITEMS = ("items", "objects", "things", "boxes and totes", "cartons and bins", "containers")
ARMS = ("gripper", "robot arm", "arm", "robot's gripper", "end effector", "robot hand")
AISLES = ("aisle", "walkway", "path ahead", "lane", "floor aisle")


def phrasings(kind: str, split: str, held_out_only: bool = False) -> tuple[str, ...]:
    """The templates of ``kind`` that ``split`` may use (``held_out_only``: the held-out ones only)."""
    if kind not in TEMPLATES:
        raise ValueError(f"unknown question kind {kind!r} (known: {', '.join(TEMPLATES)})")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    templates = TEMPLATES[kind]
    held = tuple(t for i, t in enumerate(templates) if i % 4 == 3)
    if held_out_only:
        if split != "test":
            raise ValueError("held-out phrasings belong to the test split only")
        return held
    if split == "test":
        return templates
    return tuple(t for i, t in enumerate(templates) if i % 4 != 3)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _slot_phrase(slot: str, rng: np.random.Generator) -> str:
    """``slot two``, ``position 2``, ``the second bay``, ``bay number two`` ..."""
    number = str(SLOTS.index(slot) + 1)
    noun = _pick(rng, SLOT_NOUNS)
    forms = (f"{noun} {slot}", f"{noun} {number}", f"the {ORDINALS[slot]} {noun}", f"{noun} number {slot}")
    return _pick(rng, forms)


def _object_phrase(obj: dict, rng: np.random.Generator) -> str:
    return f"{obj['color']} {_pick(rng, OBJECT_NOUNS[obj['object_kind']])}"


def _fillers(slots: dict, rng: np.random.Generator, fields: set[str]) -> dict[str, str]:
    """A value for each placeholder in ``fields`` (drawn in a fixed order so a seed renders one text)."""
    color = slots.get("color")
    kind = slots.get("object_kind", "box")
    values: dict[str, str] = {}
    makers = {
        "obj": lambda: _pick(rng, OBJECT_NOUNS[kind]),
        "objs": lambda: _pick(rng, OBJECT_PLURALS[kind]),
        "color": lambda: str(color),
        "a_color": lambda: f"{'an' if str(color)[0] in 'aeiou' else 'a'} {color}",
        "level": lambda: _pick(rng, LEVEL_WORDS[slots["level"]]),
        "shelf": lambda: _pick(rng, SHELF_NOUNS),
        "shelves": lambda: _pick(rng, SHELVES),
        "slot": lambda: _slot_phrase(slots["slot"], rng),
        "slotn": lambda: _pick(rng, SLOT_NOUNS),
        "items": lambda: _pick(rng, ITEMS),
        "arm": lambda: _pick(rng, ARMS),
        "aisle": lambda: _pick(rng, AISLES),
        "a": lambda: _object_phrase(slots["a"], rng),
        "b": lambda: _object_phrase(slots["b"], rng),
    }
    for name in sorted(fields):
        if name not in makers:
            raise ValueError(f"template placeholder {{{name}}} has no filler")
        values[name] = makers[name]()
    return values


def template_fields(template: str) -> set[str]:
    """The placeholder names in ``template``."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def render_question(kind: str, slots: dict, rng: np.random.Generator, split: str, held_out_only: bool = False) -> str:
    """A phrasing of the question ``(kind, slots)`` that ``split`` may use, fillers drawn from ``rng``."""
    return render_template(_pick(rng, phrasings(kind, split, held_out_only)), slots, rng)


def render_template(template: str, slots: dict, rng: np.random.Generator) -> str:
    """``template`` with its placeholders filled for ``slots``."""
    return template.format(**_fillers(slots, rng, template_fields(template)))


def grammar_words() -> list[str]:
    """Every word a template or filler can produce (sorted), for the tokenizer's training text."""
    text = re.sub(r"\{[a-z_]+\}", " ", " ".join(t for ts in TEMPLATES.values() for t in ts))
    fillers = [*ITEMS, *ARMS, *AISLES, *SHELVES, *SHELF_NOUNS, *SLOT_NOUNS, *SLOTS, *ORDINALS.values(), "number"]
    for table in (OBJECT_NOUNS, OBJECT_PLURALS, LEVEL_WORDS):
        fillers += [w for ws in table.values() for w in ws]
    text += " " + " ".join(fillers)
    for ch in "?,.:":
        text = text.replace(ch, " ")
    return sorted({w for w in text.split() if w[0].isalpha()})
