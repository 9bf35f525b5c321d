"""Synthetic warehouse camera frames (seeded), for the demo, tests and benchmarks.

A frame is a floor, a back wall with shelving, a few coloured boxes/totes/cones
and their ground-truth annotations. Pure numpy; deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 200),
    "yellow": (230, 200, 40),
    "orange": (240, 130, 30),
}
KINDS = ("box", "tote", "cone")


@dataclass(frozen=True)
class SceneObject:
    kind: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels


@dataclass(frozen=True)
class Scene:
    rgb: np.ndarray  # (H, W, 3) uint8
    objects: tuple[SceneObject, ...]

    def count(self, kind: str | None = None, color: str | None = None) -> int:
        return sum((kind is None or o.kind == kind) and (color is None or o.color == color) for o in self.objects)


def render_scene(seed: int, height: int = 240, width: int = 320, max_objects: int = 4) -> Scene:
    """One warehouse frame with 1..max_objects objects on the floor."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), dtype=np.uint8)
    horizon = int(height * rng.uniform(0.35, 0.5))
    img[:horizon] = (150, 150, 160)  # wall
    img[horizon:] = (110, 105, 95)  # concrete floor
    # Shelving: uprights and beams.
    for x in range(0, width, max(width // 4, 1)):
        img[:horizon, x : x + 4] = (60, 90, 160)
    for y in range(horizon // 3, horizon, max(horizon // 3, 1)):
        img[y : y + 3, :] = (220, 120, 30)
    noise = rng.integers(-6, 7, size=img.shape, dtype=np.int16)
    img = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        kind = KINDS[int(rng.integers(len(KINDS)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        size = int(rng.integers(height // 8, height // 4))
        x0 = int(rng.integers(0, width - size))
        y0 = int(rng.integers(horizon, height - size)) if height - size > horizon else horizon
        x1, y1 = x0 + size, min(y0 + size, height)
        rgb = np.array(COLORS[color], dtype=np.uint8)
        if kind == "cone":  # a triangle
            for row in range(y0, y1):
                half = int((row - y0 + 1) / max(y1 - y0, 1) * size / 2)
                cx = (x0 + x1) // 2
                img[row, max(cx - half, 0) : cx + half] = rgb
        else:
            img[y0:y1, x0:x1] = rgb
            if kind == "box":  # tape stripe
                img[y0:y1, (x0 + x1) // 2 - 1 : (x0 + x1) // 2 + 1] = (235, 220, 180)
            else:  # tote rim
                img[y0 : y0 + 3, x0:x1] = (30, 30, 30)
        objects.append(SceneObject(kind, color, (x0, y0, x1, y1)))
    return Scene(img, tuple(objects))
