"""Which patches of the model's grid changed between two frames, measured on the pixels each patch sees.

A patch's *signature* is the mean color of ``sub x sub`` cells inside it (box-filtered, so sensor
noise averages out: a 640x480 frame on a 16x16 grid gives cells of about 19 pixels at ``sub = 8``). Two
signatures are compared after the frame-wide median gain per channel is applied to the reference,
so a lighting flicker or an exposure step that brightens everything does not count as change; a patch changed
when any of its cells moved by more than ``threshold`` gray levels (0-255) plus 8% of its level.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]
RELATIVE_TOLERANCE = 0.08
# Cells per patch side. With 4 (75-px cells at 640x480 on 16x16) a gripper's fingers opening moved no cell
# past the threshold (largest change 20 levels); with 8 (19-px cells) it moves five patches (52 levels).
SUB = 8


def patch_signature(rgb: np.ndarray, view: Box, grid: tuple[int, int], sub: int = SUB) -> np.ndarray:
    """``(h, w, sub, sub, 3)`` float32 mean colors of the cells of each patch of ``grid = (h, w)``.

    ``view`` is the frame region ``(x0, y0, x1, y1)`` the patch grid covers (the processor's resize,
    crop or pad undone, as ``VlmResult.views`` gives it); parts of it outside the frame read as black,
    as a padding processor fills them.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {rgb.shape}")
    h, w = grid
    height, width = rgb.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in view)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"empty view box {view}")
    # The view on whole pixels; the part inside the frame is copied, the rest stays black.
    vx0, vy0, vx1, vy1 = int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1))
    canvas = np.zeros((vy1 - vy0, vx1 - vx0, 3), dtype=np.uint8)
    ix0, iy0, ix1, iy1 = max(0, vx0), max(0, vy0), min(width, vx1), min(height, vy1)
    if ix1 > ix0 and iy1 > iy0:
        canvas[iy0 - vy0 : iy1 - vy0, ix0 - vx0 : ix1 - vx0] = rgb[iy0:iy1, ix0:ix1]
    cells = Image.fromarray(canvas).resize((w * sub, h * sub), Image.Resampling.BOX)
    arr = np.asarray(cells, dtype=np.float32).reshape(h, sub, w, sub, 3)
    return arr.transpose(0, 2, 1, 3, 4).copy()


def changed_patches(reference: np.ndarray, current: np.ndarray, threshold: float = 10.0) -> np.ndarray:
    """``(h, w)`` bool: the patches where a cell of ``current`` differs from ``reference`` by more than
    ``threshold`` gray levels, after the reference is scaled by the frame-wide median gain per channel."""
    if reference.shape != current.shape:
        raise ValueError(f"signatures differ in shape: {reference.shape} vs {current.shape}")
    # Exposure and lighting scale every cell alike; the median ignores the few cells that really changed.
    gain = np.median(((current + 4.0) / (reference + 4.0)).reshape(-1, 3), axis=0)
    expected = reference * gain
    # Bright cells get a tolerance that grows with their level: a brighter frame clips their brightest
    # pixels at 255, so their mean rises less than the gain says.
    return (np.abs(current - expected) > threshold + RELATIVE_TOLERANCE * expected).any(axis=(2, 3, 4))


__all__ = ["changed_patches", "patch_signature"]
