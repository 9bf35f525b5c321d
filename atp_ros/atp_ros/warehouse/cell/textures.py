"""Textures of the warehouse cell, drawn with numpy and PIL when the scene is built (PNG bytes by file name)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from atp_ros.warehouse.cell.truth import LABELS

FLOOR_VARIANTS = 3
WALL_VARIANTS = 2


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def label_plate(letter: str, size: tuple[int, int] = (120, 100)) -> Image.Image:
    """A white plate with a thin black frame and one big bold black letter."""
    w, h = size
    image = Image.new("RGB", size, (245, 245, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle((2, 2, w - 3, h - 3), outline=(20, 20, 20), width=4)
    font = ImageFont.load_default(size=int(h * 0.8))
    x0, y0, x1, y1 = draw.textbbox((0, 0), letter, font=font, stroke_width=3)
    # Center the glyph's ink, not its advance box, so every letter sits in the middle of the plate.
    draw.text(((w - (x1 - x0)) / 2 - x0, (h - (y1 - y0)) / 2 - y0), letter, font=font, fill=(10, 10, 10),
              stroke_width=3, stroke_fill=(10, 10, 10))  # fmt: skip
    return image


def concrete(seed: int, size: int = 256) -> Image.Image:
    """Grey concrete with low-frequency stains and fine grain; the seed picks shade and stains."""
    rng = np.random.default_rng(seed)
    base = 120 + 40 * rng.random()
    coarse = rng.normal(0, 1, (size // 32, size // 32))
    stains = np.kron(coarse, np.ones((32, 32)))
    stains = np.asarray(Image.fromarray(stains.astype(np.float32)).resize((size, size), Image.BILINEAR))
    grain = rng.normal(0, 6, (size, size))
    gray = np.clip(base + 9 * stains + grain, 0, 255)
    tint = np.array([1.0, 0.99, 0.95])
    return Image.fromarray((gray[..., None] * tint).astype(np.uint8))


def block_wall(seed: int, size: int = 256) -> Image.Image:
    """Painted concrete blocks: light paint, darker mortar lines, a colored safety band at the bottom."""
    rng = np.random.default_rng(seed)
    paint = np.array([205, 205, 200]) + rng.integers(-20, 20, 3)
    img = np.tile(paint, (size, size, 1)).astype(np.float32)
    img += rng.normal(0, 4, (size, size, 1))
    rows = size // 8
    for r in range(8):
        img[r * rows : r * rows + 2] = paint * 0.75
        shift = (r % 2) * size // 8
        for c in range(4):
            x = (c * size // 4 + shift) % size
            img[r * rows : (r + 1) * rows, x : x + 2] = paint * 0.75
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def hatching(size: int = 128) -> Image.Image:
    """Yellow and black diagonal safety hatching."""
    yy, xx = np.mgrid[0:size, 0:size]
    stripe = ((xx + yy) // (size // 8)) % 2 == 0
    img = np.where(stripe[..., None], np.array([235, 190, 20]), np.array([25, 25, 25]))
    return Image.fromarray(img.astype(np.uint8))


def belt(size: int = 64) -> Image.Image:
    """A dark rubber conveyor belt with cross ribs."""
    img = np.full((size, size, 3), 45, np.float32)
    img[:: size // 8] = 80
    return Image.fromarray(img.astype(np.uint8))


def all_textures() -> dict[str, bytes]:
    """Every texture file the scene XML names, as PNG bytes."""
    files = {f"label_{c}.png": _png(label_plate(c)) for c in LABELS}
    files.update({f"floor_{i}.png": _png(concrete(i)) for i in range(FLOOR_VARIANTS)})
    files.update({f"wall_{i}.png": _png(block_wall(i)) for i in range(WALL_VARIANTS)})
    files["hatching.png"] = _png(hatching())
    files["belt.png"] = _png(belt())
    return files
