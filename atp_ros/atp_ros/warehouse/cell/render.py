"""Offscreen rendering of the cell camera: an RGB image and a segmentation render (geom id per pixel)."""

from __future__ import annotations

import contextlib

import cv2
import numpy as np

from atp_ros.warehouse.cell.cell import ARM, Cell
from atp_ros.warehouse.cell.scene import mujoco  # imported via scene so MUJOCO_GL defaults to egl first

QUALITIES = ("fast", "figure")
MIN_PIXELS = 4  # fewer visible pixels than this and an object counts as not visible


class CellRenderer:
    """Renders a :class:`Cell` at ``width`` x ``height``. ``quality="fast"``: no shadows, no anti-aliasing;
    ``"figure"``: a 2048 shadow map and 4x anti-aliasing. Close it (or use ``with``) to free its GL context."""

    def __init__(self, width: int, height: int, quality: str = "fast") -> None:
        if quality not in QUALITIES:
            raise ValueError(f"quality must be one of {QUALITIES}, not {quality!r}")
        self.width, self.height, self.quality = width, height, quality
        self._renderer: mujoco.Renderer | None = None
        self._model: mujoco.MjModel | None = None

    def _ready(self, cell: Cell) -> mujoco.Renderer:
        if self._renderer is None or self._model is not cell.model:
            self.close()
            figure = self.quality == "figure"
            # Read once, when the GL context is made: the shadow map size and the multisample count.
            cell.model.vis.quality.shadowsize = 2048 if figure else 0
            cell.model.vis.quality.offsamples = 4 if figure else 0
            self._renderer = mujoco.Renderer(cell.model, self.height, self.width)
            self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = figure
            self._model = cell.model
        return self._renderer

    def _update(self, cell: Cell) -> mujoco.Renderer:
        r = self._ready(cell)
        cell.model.cam_fovy[cell.cam] = cell.fovy_for(self.width, self.height)
        r.update_scene(cell.data, cell.cam)
        return r

    def rgb(self, cell: Cell) -> np.ndarray:
        """The camera image, uint8 HxWx3."""
        r = self._update(cell)
        return r.render()

    def render(self, cell: Cell) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 HxWx3, geom id int32 HxW with -1 where no geom) from one scene update."""
        r = self._update(cell)
        rgb = r.render()
        r.enable_segmentation_rendering()
        try:
            seg = r.render()
        finally:
            r.disable_segmentation_rendering()
        geom = np.where(seg[..., 1] == int(mujoco.mjtObj.mjOBJ_GEOM), seg[..., 0], -1)
        return rgb, geom.astype(np.int32)

    def depth(self, cell: Cell) -> np.ndarray:
        """Planar depth (meters along the camera's optical axis) per pixel, float32 HxW, of the current scene."""
        r = self._update(cell)
        r.enable_depth_rendering()
        try:
            return r.render().astype(np.float32)
        finally:
            r.disable_depth_rendering()

    def close(self) -> None:
        """Free the GL context and its buffers (safe to call twice)."""
        if self._renderer is not None:
            self._renderer.close()
        self._renderer, self._model = None, None

    def __enter__(self) -> CellRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown the GL library may be gone already
            self.close()


def owner_boxes(cell: Cell, geom: np.ndarray) -> dict[int, tuple[tuple[int, int, int, int], int]]:
    """Per owner code (item/cone/pallet index or :data:`ARM`): (box x0, y0, x1, y1 inclusive, visible pixel count)."""
    # Owner codes shifted to 0.. (ARM -> 0, none -> 1, objects from 2) so one bincount per axis finds every box.
    lut = np.concatenate([[1], cell.owner + 2]).astype(np.int64)
    owners = lut[geom + 1]
    k = int(lut.max()) + 1
    height, width = owners.shape
    counts = np.bincount(owners.ravel(), minlength=k)
    in_row = np.bincount((np.arange(height)[:, None] * k + owners).ravel(), minlength=height * k).reshape(height, k)
    in_col = np.bincount((np.arange(width)[None, :] * k + owners).ravel(), minlength=width * k).reshape(width, k)
    out = {}
    for code in np.flatnonzero(counts >= MIN_PIXELS).tolist():
        if code == 1:
            continue
        rows, cols = np.flatnonzero(in_row[:, code]), np.flatnonzero(in_col[:, code])
        out[code - 2] = ((int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])), int(counts[code]))
    return out


def silhouette_area(cell: Cell, corners: np.ndarray, width: int, height: int) -> float:
    """Pixel area of the convex hull of projected 3D corners: an unoccluded box's area, parts outside the frame
    included (so an object cut by the frame edge counts as partly hidden)."""
    px = cell.project(corners, width, height)
    if np.isnan(px).any():
        return 0.0
    return float(cv2.contourArea(cv2.convexHull(px.astype(np.float32))))


__all__ = ["ARM", "MIN_PIXELS", "QUALITIES", "CellRenderer", "owner_boxes", "silhouette_area"]
