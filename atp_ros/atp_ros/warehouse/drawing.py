"""Drawing primitives of the synthetic warehouse: filled boxes, striped cones, bitmap letters.

Boxes are normalized ``(x0, y0, x1, y1)``; images are float32 ``(H, W, 3)`` drawn in place.
"""

from __future__ import annotations

import numpy as np

Box = tuple[float, float, float, float]  # x0, y0, x1, y1, normalized

# 5x7 bitmap glyphs for the box labels (font-free, so frames are identical everywhere).
_GLYPHS = {
    "a": ["01110", "10001", "10001", "11111", "10001", "10001", "10001"],
    "b": ["11110", "10001", "10001", "11110", "10001", "10001", "11110"],
    "c": ["01111", "10000", "10000", "10000", "10000", "10000", "01111"],
    "d": ["11110", "10001", "10001", "10001", "10001", "10001", "11110"],
    "e": ["11111", "10000", "10000", "11110", "10000", "10000", "11111"],
    "f": ["11111", "10000", "10000", "11110", "10000", "10000", "10000"],
}
_GLYPH_ARRAYS = {k: np.array([[c == "1" for c in row] for row in v]) for k, v in _GLYPHS.items()}


def fill(img: np.ndarray, box: Box, color, alpha: float = 1.0) -> None:
    """``box`` painted ``color`` (blended by ``alpha`` below 1)."""
    h, w = img.shape[:2]
    x0, y0, x1, y1 = (round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h))
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(max(x1, x0 + 1), w), min(max(y1, y0 + 1), h)
    if alpha >= 1.0:
        img[y0:y1, x0:x1] = color
    else:
        img[y0:y1, x0:x1] = (1 - alpha) * img[y0:y1, x0:x1] + alpha * np.asarray(color, dtype=np.float32)


def triangle(img: np.ndarray, box: Box, color, stripe) -> None:
    """A cone: a triangle filling ``box``, with a ``stripe`` band across its middle."""
    h, w = img.shape[:2]
    x0, y0, x1, y1 = box[0] * w, box[1] * h, box[2] * w, box[3] * h
    rows = np.arange(max(int(y0), 0), min(int(np.ceil(y1)), h))
    cx = (x0 + x1) / 2
    for r in rows:
        t = (r - y0 + 1) / max(y1 - y0, 1)
        half = t * (x1 - x0) / 2
        a, b = max(int(cx - half), 0), min(int(np.ceil(cx + half)), w)
        img[r, a:b] = stripe if 0.45 < t < 0.62 else color


def letter(img: np.ndarray, box: Box, letter: str) -> None:
    """Black bitmap letter centred on ``box`` (normalized), scaled to about 70% of its height."""
    h, w = img.shape[:2]
    glyph = _GLYPH_ARRAYS[letter]
    bh, bw = (box[3] - box[1]) * h, (box[2] - box[0]) * w
    gh = max(int(bh * 0.7), 7)
    gw = max(int(min(gh * 5 / 7, bw * 0.8)), 5)
    yy = (np.arange(gh) * 7 // gh).clip(0, 6)
    xx = (np.arange(gw) * 5 // gw).clip(0, 4)
    mask = glyph[yy][:, xx]
    cy, cx = (box[1] + box[3]) / 2 * h, (box[0] + box[2]) / 2 * w
    y0, x0 = int(cy - gh / 2), int(cx - gw / 2)
    ys, xs = np.nonzero(mask)
    ys, xs = ys + y0, xs + x0
    ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    img[ys[ok], xs[ok]] = (20, 20, 20)
