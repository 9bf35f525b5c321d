"""One frame of a camera stream through a backend with :class:`~atp_ros.stream.StreamCache` reuse.

The node's worker, ``evaluate``'s stream replay and the Ray deployment answer a stream's frames the
same way: the cached answer when the reuse rules allow it (``reuse.mode`` answer or tokens), else
the model, with the tower re-run only on changed patches in mode tokens (a family with
``supports_token_reuse``), the run then stored for the frames after it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from atp_ros.backends.partial import TowerReuse
from atp_ros.backends.results import VlmResult
from atp_ros.method import AtpConfig
from atp_ros.stream import ReuseDecision, StreamCache


@dataclass(frozen=True)
class StreamAnswer:
    """A frame's answer: the model's run, or (``reuse`` set) the cached run of an earlier frame."""

    result: VlmResult
    reuse: ReuseDecision | None = None  # set when no model ran: the answer is ``result``'s, reused
    recomputed: int | None = None  # token reuse: patches the tower re-ran (None: the whole tower or none)
    cache_error: str = ""  # why this run could not be cached for the next frames ("" when it was)


def answer_on_stream(
    backend,
    cache: StreamCache,
    rgb: np.ndarray,
    question: str,
    atp: AtpConfig,
    max_new_tokens: int,
    now: float,
    stop: Callable[[], bool] | None = None,
) -> StreamAnswer:
    """Answer ``question`` about the stream's frame ``rgb`` at stream time ``now`` (seconds)."""
    mode = cache.config.mode
    if mode != "none":
        decision = cache.decide(rgb, question, now)
        if decision.reuse and isinstance(cache.result, VlmResult):
            return StreamAnswer(cache.result, reuse=decision)
    tower = None
    if mode == "tokens" and getattr(backend, "supports_token_reuse", False):
        if not isinstance(cache.tower, TowerReuse) or cache.tower.variant != cache.config.variant:
            cache.tower = TowerReuse(cache.config.variant)
        tower = cache.tower
        tower.changed = cache.tower_changes(rgb, now) if tower.states is not None else None
    try:
        extra = {"tower": tower} if tower is not None else {}  # a remote backend (Ray client) takes no tower
        result = backend.answer([rgb], [question], atp, max_new_tokens=max_new_tokens, stop=stop, **extra)
    except BaseException:
        if tower is not None:  # its states may be half written: the next frame runs the whole tower
            cache.tower = None
        raise
    if mode == "none":
        return StreamAnswer(result)
    try:
        view = result.views[0].as_tuple()
        if tower is not None:
            cache.tower_stored(rgb, view, result.grid_of(0), tower.changed, now)
        cache.store(rgb, question, result.keep_mask(0), view, now, result)
    except ValueError as err:  # the answer stands; only the next frames cannot reuse it
        cache.clear()
        return StreamAnswer(result, cache_error=str(err))
    return StreamAnswer(result, recomputed=tower.recomputed if tower is not None else None)


__all__ = ["StreamAnswer", "answer_on_stream"]
