"""The reworded training questions of phases 4 and 5: phrasings beyond the grammar's templates, and wording noise.

A model trained on a dozen templates per kind learns the templates' shapes: on phrasings it never
saw, it answers with another kind's words ("is there an obstacle in the lane?" -> ``no``). The
noise keeps every word that carries the question's meaning (colors, levels, slots, object nouns,
left/right) and perturbs the rest: a greeting or filler in front, a tail after, a word swapped
for a random English word, a word dropped, a random word inserted. The model then has to find the
kind from the words that decide it, as it must for an unseen phrasing.
"""

from __future__ import annotations

import re
from functools import cache

import numpy as np

from atp_ros.warehouse.cell.grammar import LEVEL_WORDS, OBJECT_NOUNS, OBJECT_PLURALS, ORDINALS
from atp_ros.warehouse.cell.truth import COLORS, SLOTS

PREFIXES = (
    "hey, ",
    "ok, ",
    "quick question: ",
    "robot, ",
    "so ",
    "excuse me, ",
    "i wonder, ",
    "camera check: ",
    "one more thing: ",
    "right, ",
    "hi! ",
    "tell me, ",
)
SUFFIXES = (" please", " thanks", " right now", " at the moment", " for me", " if you can", " now", " again")
_WORD = re.compile(r"[a-z']+")


@cache
def protected_words() -> frozenset[str]:
    """Words that carry a question's meaning (the slots' values): never swapped or dropped."""
    words = {*COLORS, *SLOTS, *ORDINALS.values(), "left", "right", "1", "2", "3", "4"}
    for table in (LEVEL_WORDS, OBJECT_NOUNS, OBJECT_PLURALS):
        words |= {w for ws in table.values() for w in ws}
    return frozenset(words)


@cache
def _english() -> tuple[str, ...]:
    from atp_ros.warehouse.cell.tokenizer import english_words

    # Skip the most common few hundred (function words and the cell's own vocabulary live there).
    return tuple(english_words()[300:]) or ("thing",)


def perturb(question: str, rng: np.random.Generator) -> str:
    """``question`` with one or more meaning-preserving edits (at least one; deterministic given ``rng``)."""
    words = question.split(" ")
    body, end = (words[:-1], words[-1]) if len(words) > 1 else (words, "")
    free = [i for i, w in enumerate(body) if (m := _WORD.fullmatch(w)) and m.group(0) not in protected_words()]
    english = _english()
    edits = rng.permutation(("prefix", "suffix", "swap", "drop", "insert"))[: int(rng.integers(1, 3))]
    for edit in edits:
        if edit == "swap" and free:
            body[free[int(rng.integers(len(free)))]] = english[int(rng.integers(len(english)))]
        elif edit == "drop" and len(free) > 1:
            i = free.pop(int(rng.integers(len(free))))
            body[i] = ""
        elif edit == "insert":
            body.insert(int(rng.integers(len(body) + 1)), english[int(rng.integers(len(english)))])
            free = [i for i, w in enumerate(body) if _WORD.fullmatch(w) and w not in protected_words()]
    text = " ".join(w for w in [*body, end] if w)
    if "prefix" in edits:
        text = PREFIXES[int(rng.integers(len(PREFIXES)))] + text
    if "suffix" in edits and text and text[-1] in "?.":
        text = text[:-1] + SUFFIXES[int(rng.integers(len(SUFFIXES)))] + text[-1]
    return text


# More ways people ask, for phase 4 only (training; never in the test split, so the held-out phrasings
# stay unseen). Kept apart from grammar.TEMPLATES because the tokenizer and phases 1-3 are built from
# those: adding here changes no earlier phase and no token.
EXTRA_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color_at": (
        "{level} {shelf}, {slot}: which color?",
        "i'm looking for the color of whatever {obj} is in {slot} on the {level} {shelf}.",
        "what colour would you say the {obj} at {slot} on the {level} {shelf} is?",
        "identify the color of the {obj} in {slot}, {level} {shelf}.",
        "which colour has the {obj} that sits in {slot} on the {level} {shelf}?",
        "need a color check on the {obj} in {slot} of the {level} {shelf}.",
        "{slot} of the {level} {shelf} has a {obj}; its color?",
        "what color {obj} is in {slot} on the {level} {shelf}?",
        "tell me which color the {obj} has in {slot} of the {level} {shelf}.",
        "could you say what color is at {slot} of the {level} {shelf}?",
        "{obj} at {level} {shelf} {slot}, color please.",
        "describe the color of the {level} {shelf}'s {slot} {obj}.",
    ),
    "label_at": (
        "{level} {shelf}, {slot}: which letter?",
        "read me the letter of the {obj} in {slot} on the {level} {shelf}.",
        "which letter can you see on the {obj} at {slot}, {level} {shelf}?",
        "what letter is shown on the {obj} that sits in {slot} of the {level} {shelf}?",
        "the letter printed on the {obj} in {slot} of the {level} {shelf}, please?",
        "what's the label letter for the {obj} at {slot} on the {level} {shelf}?",
        "which label does the {obj} in {slot} on the {level} {shelf} carry?",
        "tell me which letter is on the {obj} in {slot} of the {level} {shelf}.",
        "{obj} at {level} {shelf} {slot}: letter?",
        "i need the letter off the {obj} in {slot}, {level} {shelf}.",
        "spell out the letter on the {level} {shelf}'s {slot} {obj}.",
        "what letter marks the {obj} sitting at {slot} on the {level} {shelf}?",
    ),
    "count": (
        "{color} {items} on the {shelves}: how many?",
        "i'd like to know how many {color} {items} the {shelves} hold.",
        "how many {color} ones are on the {shelves}?",
        "give me a count of the {color} {items} on the {shelves}.",
        "how many {items} of color {color} are on the {shelves}?",
        "count every {color} one of the {items} on the {shelves}.",
        "on the {shelves}, count the {color} {items} for me.",
        "{color} {items}: how many do the {shelves} have?",
        "how many {color} {items} can you count on the {shelves}?",
        "{color} {items} on the {shelves}, count them.",
        "i want to know how many {color} {items} the {shelves} carry.",
    ),
    "exists": (
        "does the {shelves} have {a_color} {obj} on it?",
        "is {a_color} {obj} present on the {shelves}?",
        "{a_color} {obj} on the {shelves}, yes or no?",
        "have we got any {color} {objs} on the {shelves}?",
        "check the {shelves} for {a_color} {obj}: is there one?",
        "would i find {a_color} {obj} somewhere on the {shelves}?",
        "do the {shelves} hold any {color} {obj}?",
        "any {color} {objs} stored on the {shelves}?",
        "tell me whether the {shelves} contain {a_color} {obj}.",
        "is one of the {objs} on the {shelves} {color}?",
        "look at the {shelves}: any {color} {obj} there?",
    ),
    "which_level": (
        "what {shelf} is the {color} {obj} stored on, top, middle or bottom?",
        "which {shelf} would i find the {color} {obj} on?",
        "identify the {shelf} of the {color} {obj}.",
        "which {shelf} has the {color} {obj} sitting on it?",
        "on which {shelf} of the {shelves} does the {color} {obj} sit?",
        "what height is the {color} {obj} at: which {shelf}?",
        "tell me the {shelf} of the {color} {obj}.",
        "{color} {obj}: top, middle or bottom {shelf}?",
        "which {shelf} of the {shelves} carries the {color} {obj}?",
        "tell me if the {color} {obj} is on the top, middle or bottom {shelf}.",
        "find the {shelf} holding the {color} {obj}.",
    ),
    "left_right": (
        "{a} versus {b}: which is on the left?",
        "the {b} and the {a}: is the {a} left or right of it?",
        "on which side of the {b} do you see the {a}, left or right?",
        "where is the {a} compared to the {b}, left or right?",
        "compare the {a} with the {b}: left or right?",
        "relative to the {b}, which side is the {a} on?",
        "from here, the {a} is on which side of the {b}?",
    ),
    "gripper": (
        "does the {arm} hold something?",
        "is the {arm} full?",
        "has the {arm} got an item?",
        "is there an item held in the {arm} now?",
        "the {arm}: holding anything?",
        "is the {arm} loaded with something?",
        "has something been grabbed by the {arm}?",
        "is the {arm} currently grasping an object?",
        "tell me if the {arm} carries an item.",
        "any item in the {arm} right now?",
        "is the {arm} empty or holding something?",
        "is something in the grip of the {arm}?",
    ),
    "aisle": (
        "is the {aisle} clear right now?",
        "can the robot drive down the {aisle}, is it clear or blocked?",
        "is there anything in the {aisle}, is it blocked?",
        "is the {aisle} open?",
        "is the {aisle} free to pass?",
        "check the {aisle}: is it blocked?",
        "is the {aisle} empty or is something in the way?",
        "tell me if the {aisle} is blocked.",
        "anything standing in the {aisle}?",
        "could a cart get through the {aisle}?",
        "is the way through the {aisle} free?",
        "the {aisle}: blocked or clear?",
    ),
    "where": (
        "where's the {color} {obj}?",
        "locate the {color} {obj}.",
        "find the {color} {obj} for me: which {shelf} and {slotn}?",
        "where exactly is the {color} {obj} on the {shelves}?",
        "i need the position of the {color} {obj}.",
        "where does the {color} {obj} sit?",
        "location of the {color} {obj}?",
        "tell me where the {color} {obj} is.",
        "{color} {obj}: where on the {shelves}?",
        "point me to the {color} {obj}.",
        "in which place on the {shelves} is the {color} {obj}?",
    ),
    "empty_slot": (
        "on the {level} {shelf}, where is the empty {slotn}?",
        "find me a free {slotn} on the {level} {shelf}.",
        "which {slotn} of the {level} {shelf} has no item in it?",
        "the {level} {shelf}: which {slotn} is empty?",
        "where on the {level} {shelf} is a {slotn} with nothing in it?",
        "which {slotn} on the {level} {shelf} has room for a box?",
        "{level} {shelf}: which {slotn} is free?",
        "tell me the empty {slotn} on the {level} {shelf}.",
        "point me to the vacant {slotn} of the {level} {shelf}.",
        "the {level} {shelf} has one free {slotn}: which?",
    ),
    "holding": (
        "what's the {arm} holding?",
        "what has the {arm} picked?",
        "the {arm}: what is it holding?",
        "what is in the {arm} at the moment?",
        "what did the {arm} grab?",
        "what object is the {arm} carrying?",
        "tell me what is in the {arm}.",
        "which item does the {arm} have?",
        "tell me the color of what the {arm} carries.",
        "what item is in the grip of the {arm}?",
        "name what the {arm} holds.",
    ),
    "count_level": (
        "how many {items} does the {level} {shelf} hold?",
        "total {items} on the {level} {shelf}?",
        "how many {items} are there on the {level} {shelf}?",
        "i'd like a count of the {items} on the {level} {shelf}.",
        "{items} on the {level} {shelf}, count them.",
        "give me the {items} count for the {level} {shelf}.",
        "how many {items} sit on the {level} {shelf} right now?",
        "on the {level} {shelf}, how many {items} are stored?",
        "i want to know how many {items} the {level} {shelf} carries.",
    ),
}


# A second set, for phase 5's ``dialog_more_phrasings`` only (kept apart so phase 4 trains as it did): other
# sentence shapes per kind, most of them shapes that another kind's answers fit (a yes/no question about the
# aisle answered clear or blocked, a "what has ... got" answered with a color), so the kind has to come from
# the words that name it.
MORE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color_at": (
        "which colour does the {obj} at {slot} on the {level} {shelf} have?",
        "is the {obj} in {slot} on the {level} {shelf} red, blue or another color?",
        "{slot} on the {level} {shelf} holds a {obj}; its color?",
        "say the color of the {level} {shelf}'s {obj} in {slot}.",
        "what shade is the {obj} at {slot}, {level} {shelf}?",
        "do you know which color the {obj} in {slot} of the {level} {shelf} has?",
    ),
    "label_at": (
        "which letter does the {obj} at {slot} on the {level} {shelf} carry?",
        "is there a letter on the {obj} in {slot} of the {level} {shelf}? which one?",
        "{slot} on the {level} {shelf}: the {obj}'s letter?",
        "what character is printed on the {level} {shelf}'s {obj} in {slot}?",
        "read out the marking of the {obj} at {slot} on the {level} {shelf}.",
        "which letter can i see on the {obj}, {level} {shelf}, {slot}?",
    ),
    "count": (
        "are there many {color} {items} on the {shelves}? how many?",
        "if you count the {color} {items} on the {shelves}, what do you get?",
        "how many {items} of color {color} do the {shelves} hold?",
        "do you know how many {color} {items} are on the {shelves}?",
        "{color} {items}: what number do you count on the {shelves}?",
        "give me a count of every {color} one on the {shelves}.",
    ),
    "exists": (
        "do the {shelves} have any {color} {objs}?",
        "has anyone put {a_color} {obj} on the {shelves}?",
        "is there one {color} {obj} or more on the {shelves}?",
        "is {a_color} {obj} among the {items} on the {shelves}?",
        "check the {shelves} for {a_color} {obj}: is one there?",
        "does {a_color} {obj} appear on the {shelves}?",
    ),
    "which_level": (
        "what level of the {shelves} has the {color} {obj}, top, middle or bottom?",
        "is the {color} {obj} up high, in the middle or down low: which {shelf}?",
        "for the {color} {obj}, name the {shelf}: top, middle or bottom.",
        "do you know which {shelf} carries the {color} {obj}?",
        "top, middle or bottom {shelf} for the {color} {obj}?",
        "which {shelf} has the {color} {obj} been put on?",
    ),
    "left_right": (
        "is the {a} more to the left or more to the right than the {b}?",
        "does the {a} sit left of the {b} or right of it?",
        "seen from the camera, the {a} is on which side of the {b}?",
        "left of the {b} or right of the {b}: where is the {a}?",
        "do you see the {a} towards the left of the {b} or towards its right?",
        "which way from the {b} is the {a}, left or right?",
    ),
    "gripper": (
        "did the {arm} pick anything up?",
        "is the {arm} carrying a box or a tote?",
        "has the {arm} grabbed an item yet?",
        "does the {arm} hold an item right now, yes or no?",
        "is there an item between the fingers of the {arm}?",
        "is the {arm} busy holding something?",
    ),
    "aisle": (
        "is there a cone or a pallet in the {aisle}?",
        "does anything stand in the way in the {aisle}?",
        "are there boxes or cones on the {aisle}?",
        "is something lying in the {aisle}?",
        "can a robot get through the {aisle}?",
        "has anything been left in the {aisle}?",
        "is the {aisle} in front of the shelves free of things?",
        "do i have a free {aisle}?",
    ),
    "where": (
        "name the {shelf} and {slotn} where the {color} {obj} is kept.",
        "do you know where the {color} {obj} is?",
        "has the {color} {obj} got a place on the {shelves}? where?",
        "which {slotn} of which {shelf} has the {color} {obj}?",
        "show me where the {color} {obj} sits on the {shelves}.",
        "is the {color} {obj} somewhere on the {shelves}? tell me where.",
    ),
    "empty_slot": (
        "is a {slotn} free on the {level} {shelf}? which one?",
        "what {slotn} has no box or tote on the {level} {shelf}?",
        "has the {level} {shelf} got an empty {slotn}? which?",
        "where could i put a tote on the {level} {shelf}?",
        "does the {level} {shelf} have a gap? which {slotn}?",
        "which {slotn} is missing an item on the {level} {shelf}?",
    ),
    "holding": (
        "what has the {arm} picked up?",
        "which color is the item the {arm} carries?",
        "what did the {arm} take off the shelf?",
        "is the {arm} holding the red, blue or another item?",
        "what is the {arm} clutching?",
        "the {arm} holds what?",
        "what's between the fingers of the {arm}?",
    ),
    "count_level": (
        "how many {items} has the {level} {shelf} got?",
        "are there many {items} on the {level} {shelf}? how many?",
        "what total of {items} do you find on the {level} {shelf}?",
        "do you know how many {items} are on the {level} {shelf}?",
        "{level} {shelf}: count of {items}?",
        "count up the {items} placed on the {level} {shelf}.",
    ),
}


def reword(
    kind: str, slots: dict, rng: np.random.Generator, table: dict[str, tuple[str, ...]] = EXTRA_TEMPLATES
) -> str:
    """The question ``(kind, slots)`` in one of ``table``'s phrasings (:data:`EXTRA_TEMPLATES` by default)."""
    from atp_ros.warehouse.cell.grammar import render_template

    options = table[kind]
    return render_template(options[int(rng.integers(len(options)))], slots, rng)
