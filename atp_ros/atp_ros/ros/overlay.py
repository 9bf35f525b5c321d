"""Keep-mask images for people: mono8 masks and the paper's Figure-3 style overlay.

The patch grid covers the region of the frame the model saw (``VlmResult.views[b]``, a
:class:`atp_ros.backends.results.PixelBox`): the whole frame for processors that stretch it,
the middle square for CLIP's short-side resize + center crop (llava-1.5 on a 4:3 camera).
Pixels outside that region never reached the model and are faded like pruned ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mask_image(mask: np.ndarray) -> np.ndarray:
    """``(h, w)`` 0/1 keep mask -> ``(h, w)`` uint8, 255 kept / 0 pruned."""
    return (np.asarray(mask) > 0).astype(np.uint8) * 255


def _cells(pixels: int, cells: int, lo: float, hi: float) -> np.ndarray:
    """Cell index of each pixel centre along one axis when ``cells`` cells tile ``[lo, hi)``; -1 outside."""
    idx = np.floor((np.arange(pixels) + 0.5 - lo) * cells / (hi - lo)).astype(np.int64)
    return np.where((idx >= 0) & (idx < cells), idx, -1)


def upsample_mask(mask: np.ndarray, height: int, width: int, box: Sequence[float] | object | None = None) -> np.ndarray:
    """``(h, w)`` patch mask -> ``(height, width)`` bool frame mask.

    ``box``: ``(x0, y0, x1, y1)`` (or a ``PixelBox``) of the frame region the grid covers;
    None: the whole frame. Pixels outside the box are False.
    """
    if box is None:
        box = (0.0, 0.0, float(width), float(height))
    elif hasattr(box, "as_tuple"):
        box = box.as_tuple()
    x0, y0, x1, y1 = (float(v) for v in box)
    gh, gw = np.asarray(mask).shape
    rows, cols = _cells(height, gh, y0, y1), _cells(width, gw, x0, x1)
    out = np.asarray(mask, dtype=bool)[np.maximum(rows, 0)[:, None], np.maximum(cols, 0)[None, :]]
    return out & (rows >= 0)[:, None] & (cols >= 0)[None, :]


def overlay(
    rgb: np.ndarray, mask: np.ndarray, box: Sequence[float] | object | None = None, dim: float = 0.3, edge: int = 2
) -> np.ndarray:
    """Camera image with kept patches untouched, pruned ones dark gray, and the kept areas outlined in yellow.

    Each cell lands on the pixels its token saw. ``box``: the frame region the patch grid covers
    (``VlmResult.views[b]``); None: the whole frame. ``edge``: outline width in pixels (0: none),
    drawn on the pruned side so kept pixels stay exactly as the camera sent them.
    """
    keep = upsample_mask(mask, rgb.shape[0], rgb.shape[1], box)  # (H, W)
    gray = rgb.astype(np.float32).mean(axis=2, keepdims=True)  # (H, W, 1)
    # Dark and colorless, so the kept patches' colors stand out on a rendered (colorful) scene too.
    faded = (gray * dim).astype(np.uint8).repeat(3, axis=2)
    out = np.where(keep[:, :, None], rgb, faded)
    if edge > 0:
        out[_grow(keep, edge) & ~keep] = (255, 255, 0)
    return np.ascontiguousarray(out.astype(np.uint8))


def _grow(keep: np.ndarray, by: int) -> np.ndarray:
    """``keep`` dilated by ``by`` pixels (a square neighbourhood)."""
    out = keep.copy()
    h, w = keep.shape
    for dy in range(-by, by + 1):
        for dx in range(-by, by + 1):
            src = keep[max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)]
            out[max(dy, 0) : h - max(-dy, 0), max(dx, 0) : w - max(-dx, 0)] |= src
    return out


def relevant_region(scores: np.ndarray, box: Sequence[float] | object, share: float = 0.75) -> tuple[float, ...]:
    """``(x0, y0, x1, y1)`` in image pixels of the most relevant region of a ``(h, w)`` score grid.

    The region is the top-scoring patch grown over its 8-connected neighbours that score at least
    ``share`` of it (after shifting the grid's minimum to 0), mapped through ``box`` (the image region
    the grid covers, ``VlmResult.views[b]``). All zeros when the scores are flat (nothing was scored).
    """
    s = np.asarray(scores, dtype=np.float64)
    s = s - s.min()
    if not np.isfinite(s).all() or s.max() <= 0:
        return (0.0, 0.0, 0.0, 0.0)
    gh, gw = s.shape
    top = np.unravel_index(int(np.argmax(s)), s.shape)
    keep = s >= share * s[top]
    region, todo = {top}, [top]
    while todo:  # flood fill over the 8-connected cells above the threshold
        r, c = todo.pop()
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                n = (r + dr, c + dc)
                if 0 <= n[0] < gh and 0 <= n[1] < gw and keep[n] and n not in region:
                    region.add(n)
                    todo.append(n)
    rows, cols = [r for r, _ in region], [c for _, c in region]
    x0, y0, x1, y1 = box.as_tuple() if hasattr(box, "as_tuple") else tuple(float(v) for v in box)
    cw, ch = (x1 - x0) / gw, (y1 - y0) / gh
    return (x0 + min(cols) * cw, y0 + min(rows) * ch, x0 + (max(cols) + 1) * cw, y0 + (max(rows) + 1) * ch)
