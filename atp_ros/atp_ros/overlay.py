"""Keep-mask images for people: mono8 masks and the paper's Figure-3 style overlay."""

from __future__ import annotations

import numpy as np


def mask_image(mask: np.ndarray) -> np.ndarray:
    """``(h, w)`` 0/1 keep mask -> ``(h, w)`` uint8, 255 kept / 0 pruned."""
    return (np.asarray(mask) > 0).astype(np.uint8) * 255


def upsample_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a ``(h, w)`` patch mask to ``(height, width)`` bool."""
    gh, gw = mask.shape
    rows = np.minimum(np.arange(height) * gh // height, gh - 1)
    cols = np.minimum(np.arange(width) * gw // width, gw - 1)
    return np.asarray(mask, dtype=bool)[rows[:, None], cols[None, :]]


def overlay(rgb: np.ndarray, mask: np.ndarray, dim: float = 0.35) -> np.ndarray:
    """Camera image with pruned patches grayed out (kept patches untouched).

    The patch grid is stretched over the whole frame; for processors that
    center-crop (CLIP's 336 px crop of a 4:3 frame) the edges are approximate.
    """
    keep = upsample_mask(mask, rgb.shape[0], rgb.shape[1])  # (H, W)
    gray = rgb.astype(np.float32).mean(axis=2, keepdims=True)  # (H, W, 1)
    faded = (gray * dim + 255.0 * (1.0 - dim) * 0.5).astype(np.uint8).repeat(3, axis=2)
    out = np.where(keep[:, :, None], rgb, faded)
    return np.ascontiguousarray(out.astype(np.uint8))
