"""The frame region each patch saw: ``processor_view`` against the real HF image processors, and overlays on it.

The check goes through the processors themselves: paint the frame region that
``processor_view`` says patch ``(r, c)`` saw, run the processor, and the painted light must
land in patch ``(r, c)`` of its output canvas. A grid stretched over the whole frame (what
the overlay did before) fails the same check for processors that center-crop or pad.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from atp_ros.backends.results import PixelBox
from atp_ros.backends.views import processor_view
from atp_ros.ros import overlay
from transformers import BlipImageProcessor, CLIPImageProcessor, LlavaImageProcessor, SiglipImageProcessor
from transformers.models.idefics.image_processing_idefics import IdeficsImageProcessor

SIDE, PATCH = 64, 8  # canvas 64 px, 8 x 8 patch grid
GRID = (SIDE // PATCH, SIDE // PATCH)

PROCESSORS = {
    # llava-1.5: short side to 64, center crop 64x64
    "clip_crop": lambda: CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE}),
    # LLaVA's pad-to-square, then the same resize and crop
    "llava_pad": lambda: LlavaImageProcessor(
        do_pad=True, size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE}
    ),
    # fixed-size resizes: the whole frame, stretched
    "siglip": lambda: SiglipImageProcessor(size={"height": SIDE, "width": SIDE}),
    "blip": lambda: BlipImageProcessor(size={"height": SIDE, "width": SIDE}),
    "idefics": lambda: IdeficsImageProcessor(image_size=SIDE),
}
FRAMES = [(48, 64), (64, 48), (45, 160), (64, 64)]  # (height, width): 4:3, portrait, wide, square


def canvas_brightness(processor, frame: np.ndarray) -> np.ndarray:
    """Mean brightness in [0, 1] of each patch of the processor's output canvas: ``GRID``."""
    out = processor(images=[frame], return_tensors="pt")
    out = out["pixel_values"] if hasattr(out, "keys") else out  # IDEFICS' returns the tensor itself
    out = out.reshape(-1, 3, SIDE, SIDE)[0]
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    pixels = (out * std + mean).mean(dim=0)  # (SIDE, SIDE) in [0, 1]
    return pixels.reshape(GRID[0], PATCH, GRID[1], PATCH).mean(dim=(1, 3)).numpy()


def paint(height: int, width: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """A black frame with the pixels whose centres fall inside ``box`` white."""
    x0, y0, x1, y1 = box
    ys, xs = np.arange(height)[:, None] + 0.5, np.arange(width)[None, :] + 0.5
    inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    return np.repeat((inside * 255).astype(np.uint8)[:, :, None], 3, axis=2)


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: f"{f[0]}x{f[1]}")
@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_each_cell_covers_the_pixels_its_patch_saw(name: str, frame: tuple[int, int]) -> None:
    processor = PROCESSORS[name]()
    height, width = frame
    view = processor_view(processor, height, width)
    cells = [(0, 0), (0, GRID[1] - 1), (GRID[0] - 1, 0), (GRID[0] // 2, GRID[1] // 2)]
    for row, col in cells:
        x0, y0, x1, y1 = view.cell(row, col, GRID)
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            continue  # a padded cell: no frame pixel to paint (checked below)
        light = canvas_brightness(processor, paint(height, width, (x0, y0, x1, y1)))
        assert light[row, col] > 0.6, (name, frame, (row, col), light.round(2))
        # Where the light went is where the cell is: no other patch got more of it.
        assert np.unravel_index(light.argmax(), light.shape) == (row, col)


def test_center_crop_box_on_a_4_3_frame() -> None:
    """llava-1.5 on a 640x480 camera: 336 short side, 448 long, crop 56 px each side -> x in [80, 560)."""
    proc = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    view = processor_view(proc, 480, 640)
    assert view.as_tuple() == pytest.approx((80.0, 0.0, 560.0, 480.0))
    # The stretched grid put the left column's 24 patches 3.3 patches off at the edge.
    stretched, true = 640 / 24, view.cell(0, 0, (24, 24))
    assert true[0] / stretched == pytest.approx(3.0)
    pad = processor_view(LlavaImageProcessor(do_pad=True), 480, 640)
    assert pad.as_tuple() == pytest.approx((0.0, -80.0, 640.0, 560.0))  # padded to a square, nothing cropped


def test_stretched_grid_misses_for_cropping_processors() -> None:
    """The check above has teeth: with the old stretched grid the corner light lands elsewhere."""
    processor = PROCESSORS["clip_crop"]()
    height, width = 48, 96
    stretched = PixelBox(0, 0, width, height)
    light = canvas_brightness(processor, paint(height, width, stretched.cell(0, 0, GRID)))
    assert light[0, 0] < 0.1  # the top-left cell of a stretched grid lies in the cropped-away margin


def test_overlay_follows_the_view_and_fades_what_the_model_never_saw() -> None:
    img = np.full((48, 64, 3), (200, 10, 10), np.uint8)
    view = PixelBox(8.0, 0.0, 56.0, 48.0)  # a 48 px square in the middle (center crop)
    mask = np.zeros((2, 2), np.uint8)
    mask[0, 1] = 1  # top-right cell: x in [32, 56), y in [0, 24)
    out = overlay.overlay(img, mask, view)
    assert np.array_equal(out[:24, 32:56], img[:24, 32:56])  # kept: untouched
    for region in (out[:, :8], out[:, 56:], out[24:, 32:56], out[:24, 8:32]):  # outside the view, or pruned
        assert (region[..., 0] == region[..., 1]).all()
    keep = overlay.upsample_mask(mask, 48, 64, view)
    assert keep.sum() == 24 * 24 and keep[:24, 32:56].all()
    # Without a view the grid spans the frame, as before.
    assert overlay.upsample_mask(mask, 48, 64).sum() == 24 * 32
    assert math.isclose(view.cell(1, 1, (2, 2))[0], 32.0)


def test_relevant_region_grows_the_top_patch_over_strong_neighbours() -> None:
    scores = np.zeros((4, 4))
    scores[1, 1], scores[1, 2], scores[2, 2], scores[3, 0] = 1.0, 0.8, 0.9, 0.7  # (3, 0) is not connected
    view = PixelBox(8.0, 0.0, 56.0, 48.0)  # a 48 px square crop of a 64x48 frame: 12 px cells
    assert overlay.relevant_region(scores, view) == (8.0 + 12, 12.0, 8.0 + 36, 36.0)  # cells (1..2, 1..2)
    assert overlay.relevant_region(scores, view, share=0.95) == (20.0, 12.0, 32.0, 24.0)  # the top patch only
    assert overlay.relevant_region(np.full((4, 4), 0.3), view) == (0.0, 0.0, 0.0, 0.0)  # flat: nothing scored
