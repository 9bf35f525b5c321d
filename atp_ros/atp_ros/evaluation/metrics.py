"""Scoring answers: normalization, exact match, VQA soft accuracy, fidelity, evidence recall,
bootstrap confidence intervals, percentiles. Pure functions on plain Python / numpy values.

This module is the one place that decides whether an answer is right: :func:`normalize_answer`
and :func:`correct` (one answer, a yes/no verdict), :func:`accuracy` (the score of one answer:
VQA soft accuracy or exact match). The ``evaluate`` sweep, the live replay, the model card and the
demos all score through them, so their accuracies are comparable."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

# The VQA evaluation's normalization (Antol et al. 2015, the official vqaEval.py), condensed:
# lower case, punctuation out, number words to digits, articles out, common contractions fixed.
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hasnt": "hasn't", "havent": "haven't", "isnt": "isn't",
    "shouldnt": "shouldn't", "wasnt": "wasn't", "werent": "weren't", "wont": "won't", "wouldnt": "wouldn't",
}  # fmt: skip
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:]")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def normalize_answer(text: str) -> str:
    """VQA-style normalization: ``"Two."`` -> ``"2"``, ``"The red box"`` -> ``"red box"``.

    An answer that is nothing but an article keeps it (``"a"`` stays ``"a"``): the warehouse's
    labels include the letter "a", which must not normalize to the same nothing as an empty answer."""
    s = str(text).lower().replace("\n", " ").replace("\t", " ").strip()
    s = _PUNCT.sub(" ", s) if not re.search(r"\d,\d", s) else _PUNCT.sub(" ", s.replace(",", ""))
    s = _PERIOD.sub("", s)
    words = [_CONTRACTIONS.get(w, _NUMBERS.get(w, w)) for w in s.split()]
    return " ".join([w for w in words if w not in _ARTICLES] or words)


def correct(prediction: str, answers: Sequence[str]) -> bool:
    """Whether ``prediction`` is right: its normalization equals that of any accepted answer.
    An empty answer (or truth) is never right."""
    pred = normalize_answer(prediction)
    return bool(pred) and any(pred == normalize_answer(a) for a in answers)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the prediction is :func:`correct`, else 0.0."""
    return float(correct(prediction, answers))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy: ``min(1, matches / 3)`` averaged over the leave-one-out subsets of the
    human answers (10 in VQAv2). With a single answer it is exact match."""
    pred = normalize_answer(prediction)
    hits = [bool(pred) and normalize_answer(a) == pred for a in answers]
    if len(hits) <= 1:
        return float(any(hits))
    total = sum(hits)
    return float(np.mean([min(1.0, (total - h) / 3.0) for h in hits]))


VQA_HUMANS = 10  # answers per question in VQA-style annotations


def accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy for VQA-style truth (10 human answers); otherwise exact match against any of
    the accepted answers (a list of synonyms must not score a right answer 1/3)."""
    if len(answers) >= VQA_HUMANS:
        return vqa_accuracy(prediction, answers)
    return exact_match(prediction, answers)


def agrees(prediction: str, reference: str) -> float:
    """Fidelity of one answer: 1.0 when it equals the unpruned model's answer after normalization."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def evidence_recall(keep: np.ndarray, evidence: np.ndarray) -> float | None:
    """Share of evidence patches kept; ``keep`` and ``evidence`` are ``(h, w)`` bool. None without evidence."""
    need = np.asarray(evidence, dtype=bool)
    if not need.any():
        return None
    return float((np.asarray(keep, dtype=bool) & need).sum() / need.sum())


def bootstrap_ci(values: Sequence[float], n: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (seeded, so reports are reproducible); (nan, nan) if empty."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
    """``{"p50": ..., "p90": ..., "p99": ...}`` (nan when empty)."""
    v = np.asarray(values, dtype=np.float64)
    return {f"p{q:g}": float(np.percentile(v, q)) if v.size else float("nan") for q in qs}
