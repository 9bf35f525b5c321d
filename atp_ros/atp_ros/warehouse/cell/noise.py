"""Wording noise for training questions: the way people type beyond the grammar's templates.

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
