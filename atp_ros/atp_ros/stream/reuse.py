"""Answer reuse on a camera stream: republish the last answer while nothing that matters for it changed.

After a full run the cache keeps the frame's patch signature and the patches that matter for the
standing question: the ones ATP kept, grown by ``margin`` patches (an object moving into the
kept region starts at its edge). A later frame reuses the answer only when the question is the
same, no watched patch changed (:func:`~atp_ros.stream.changes.changed_patches` against the frame
of the full run, so slow drift adds up instead of hiding frame to frame), and the answer is
younger than ``refresh_frames`` frames and ``refresh_s`` seconds. Anything else runs the model.

``mode="tokens"`` adds token reuse under the answer reuse: a frame that must run the model runs the
vision tower only on the patches that changed since the tower's cached states were computed
(:meth:`StreamCache.tower_changes`; the backend re-runs those rows, ``backends.partial``), with a
full tower run on the same refresh schedule. The tower's signature is updated patch by patch as
patches are recomputed, so a patch is compared with the pixels its cached states saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atp_ros.stream.changes import Box, changed_patches, patch_signature

# "none", not "off": YAML (ros2 param set, launch -p) reads a bare off as the boolean false.
REUSE_MODES = ("none", "answer", "tokens")
TOKEN_VARIANTS = ("eventful", "drop")  # backends.partial.VARIANTS (the stream imports no model code)


@dataclass(frozen=True)
class ReuseConfig:
    """How a stream may reuse answers (``mode="none"``: every frame runs the model, as before)."""

    mode: str = "none"
    threshold: float = 10.0  # gray levels a cell of a watched patch may move (noise is about 1)
    margin: int = 1  # patches around the kept set that are watched too
    refresh_frames: int = 30  # a full run at least every this many frames...
    refresh_s: float = 2.0  # ...and every this many seconds
    variant: str = "eventful"  # token reuse (mode "tokens"): how recomputed patches see the others

    def check(self) -> None:
        """ValueError naming the first bad field."""
        if self.mode not in REUSE_MODES:
            raise ValueError(f"reuse mode {self.mode!r} is not one of {', '.join(REUSE_MODES)}")
        if not self.threshold > 0:
            raise ValueError(f"reuse threshold must be > 0 gray levels, got {self.threshold}")
        if self.margin < 0:
            raise ValueError(f"reuse margin must be >= 0 patches, got {self.margin}")
        if self.refresh_frames < 1 or not self.refresh_s > 0:
            raise ValueError("reuse refresh_frames must be >= 1 and refresh_s > 0")
        if self.variant not in TOKEN_VARIANTS:
            raise ValueError(f"reuse variant {self.variant!r} is not one of {', '.join(TOKEN_VARIANTS)}")


@dataclass(frozen=True)
class ReuseDecision:
    """What :meth:`StreamCache.decide` found: reuse or not, why, and how stale the answer is."""

    reuse: bool
    reason: str  # "reused" | "none" | "first" | "question" | "changed" | "refresh" | "geometry"
    frames_since_full: int  # frames answered from the cache since the last full run, this one included
    age_s: float  # seconds since the frame of the last full run
    changed_share: float  # share of the grid's patches that changed (nan when not measured)


def dilate(mask: np.ndarray, margin: int) -> np.ndarray:
    """``mask`` (h, w bool) grown by ``margin`` patches in every direction (8-connected)."""
    out = mask.copy()
    h, w = mask.shape
    for dy in range(-margin, margin + 1):
        for dx in range(-margin, margin + 1):
            src = mask[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
            out[max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)] |= src
    return out


class StreamCache:
    """The last full run of one camera stream, and the decision for each new frame."""

    def __init__(self, config: ReuseConfig = ReuseConfig()) -> None:
        config.check()
        self.config = config
        self._question: str | None = None
        self._signature: np.ndarray | None = None
        self._watched: np.ndarray | None = None
        self._view: Box | None = None
        self._time = 0.0
        self._since = 0
        self.result = None  # what the full run returned (any object: the caller's)
        self.tower = None  # the backend's cached tower states (mode "tokens"; any object: the caller's)
        self._tower_sig: np.ndarray | None = None  # the pixels each patch's cached tower states saw
        self._tower_view: Box | None = None
        self._tower_time = 0.0
        self._tower_since = 0

    def clear(self) -> None:
        """Forget the last full run and the tower's cached states (the next frame runs the whole model)."""
        self._question = self._signature = self._watched = self._view = self.result = None
        self._since = 0
        self.tower = self._tower_sig = self._tower_view = None
        self._tower_since = 0

    def tower_changes(self, rgb: np.ndarray, now: float) -> np.ndarray | None:
        """Mode "tokens": the ``(h, w)`` patches whose cached tower states this frame must recompute, or None
        when the whole tower runs (no cached states, another frame size, or the refresh is due)."""
        c = self.config
        if c.mode != "tokens" or self._tower_sig is None or self._tower_view is None:
            return None
        if self._tower_since + 1 > c.refresh_frames or now - self._tower_time > c.refresh_s:
            return None
        try:
            current = patch_signature(rgb, self._tower_view, self._tower_sig.shape[:2])
            return changed_patches(self._tower_sig, current, c.threshold)
        except ValueError:
            return None

    def tower_stored(self, rgb: np.ndarray, view: Box, grid: tuple[int, int], changed: np.ndarray | None,
                     now: float) -> None:  # fmt: skip
        """Record a tower run on ``rgb``: all patches (``changed`` None) or the ``changed`` ones recomputed."""
        current = patch_signature(rgb, view, grid)
        if changed is None or self._tower_sig is None or self._tower_sig.shape != current.shape:
            self._tower_sig, self._tower_view = current, tuple(float(v) for v in view)  # type: ignore[assignment]
            self._tower_time, self._tower_since = now, 0
            return
        self._tower_sig[changed] = current[changed]
        self._tower_since += 1

    def decide(self, rgb: np.ndarray, question: str, now: float) -> ReuseDecision:
        """Whether this frame may take the cached answer; counts it when it does."""
        c = self.config
        if c.mode == "none":
            return ReuseDecision(False, "none", 0, 0.0, float("nan"))
        if self._signature is None or self._view is None or self._watched is None:
            return ReuseDecision(False, "first", 0, 0.0, float("nan"))
        age = now - self._time
        if question != self._question:
            return ReuseDecision(False, "question", self._since, age, float("nan"))
        if self._since + 1 > c.refresh_frames or age > c.refresh_s:
            return ReuseDecision(False, "refresh", self._since, age, float("nan"))
        h, w = self._watched.shape
        try:
            changed = changed_patches(self._signature, patch_signature(rgb, self._view, (h, w)), c.threshold)
        except ValueError:  # another frame size: the cached view no longer maps onto it
            return ReuseDecision(False, "geometry", self._since, age, float("nan"))
        share = float(changed.mean())
        if (changed & self._watched).any():
            return ReuseDecision(False, "changed", self._since, age, share)
        self._since += 1
        return ReuseDecision(True, "reused", self._since, age, share)

    def store(self, rgb: np.ndarray, question: str, keep_mask: np.ndarray, view: Box, now: float, result=None) -> None:
        """Remember a full run: its frame, question, keep mask ``(h, w)`` on the model's grid and view box."""
        keep = np.asarray(keep_mask).astype(bool)
        self._view = tuple(float(v) for v in view)  # type: ignore[assignment]
        self._signature = patch_signature(rgb, self._view, keep.shape)
        self._watched = dilate(keep, self.config.margin)
        self._question, self._time, self._since, self.result = question, now, 0, result


__all__ = ["REUSE_MODES", "TOKEN_VARIANTS", "ReuseConfig", "ReuseDecision", "StreamCache", "dilate"]
