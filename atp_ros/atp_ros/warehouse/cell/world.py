"""The state of a warehouse cell (which object is where), its random initial layout and its ground truth per frame."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from atp_ros.warehouse.cell import scene
from atp_ros.warehouse.cell.cell import ARM, CONE0, PALLET0, Cell
from atp_ros.warehouse.cell.render import owner_boxes, silhouette_area
from atp_ros.warehouse.cell.scene import AISLE_X, AISLE_Y, HALF, N_CONES, N_ITEMS, N_PALLETS
from atp_ros.warehouse.cell.truth import COLORS, LABELS, LEVELS, SLOTS, CellObject, CellTruth

# Floor spots outside the marked aisle where cones and pallets wait, and the aisle spots they move into.
FLOOR_SPOTS = {  # (x, y, yaw); laid out so nothing overlaps the racking, the conveyor, props or floor boxes
    "cone": ((-2.0, -1.1, 0.0), (3.2, -1.5, 0.0), (-3.1, -1.5, 0.0), (2.9, -2.5, 0.0), (-2.8, -2.5, 0.0)),
    "pallet": ((0.9, -2.6, 0.0), (-1.6, -2.6, 0.0), (2.95, -0.45, np.pi / 2)),
}
AISLE_SPOTS_X, AISLE_SPOT_Y = (-1.9, -0.5, 0.9, 2.3), (-1.7, -1.4)
BOX_FLOOR_SPOTS = ((-1.75, 0.35), (-1.9, -0.35), (2.75, 0.65))


@dataclass
class Thing:
    """One object's mutable state; ``body`` is its item index, or its cone/pallet index."""

    id: int
    kind: str
    color: str | None
    label: str | None
    body: int
    pos: np.ndarray
    place: str = "shelf"
    level: str | None = None
    slot: str | None = None
    yaw: float = 0.0

    def owner(self) -> int:
        """The owner code of this object's geoms in :attr:`Cell.owner`."""
        return {"cone": CONE0, "pallet": PALLET0}.get(self.kind, 0) + self.body


@dataclass
class World:
    """Every object of the cell and what the gripper holds."""

    things: list[Thing] = field(default_factory=list)
    holding: Thing | None = None
    next_id: int = 0

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def at(self, level: str, slot: str) -> Thing | None:
        return next((t for t in self.things if t.place == "shelf" and (t.level, t.slot) == (level, slot)), None)

    def free_items(self) -> list[int]:
        used = {t.body for t in self.things if t.kind in ("box", "tote")}
        return [i for i in range(N_ITEMS) if i not in used]


def slot_center(level: str, slot: str, kind: str) -> np.ndarray:
    """Where an item of ``kind`` sits in a shelf slot (its center)."""
    return np.array([scene.SLOT_X[slot], scene.ITEM_Y, scene.DECK_Z[level] + HALF[kind][2]])


def conveyor_center(y: float, kind: str) -> np.ndarray:
    """An item of ``kind`` on the conveyor belt at depth ``y``."""
    return np.array([scene.CONVEYOR_X, y, scene.CONVEYOR_Z + HALF[kind][2]])


def in_aisle(pos) -> bool:
    """Whether a floor position lies inside the marked aisle."""
    return AISLE_X[0] < pos[0] < AISLE_X[1] and AISLE_Y[0] < pos[1] < AISLE_Y[1]


def random_item(world: World, rng: np.random.Generator, body: int, pos, place: str, **where: str | None) -> Thing:
    """A new box (usually with a label plate) or tote of a random color."""
    kind = "box" if rng.random() < 0.75 else "tote"
    label = str(rng.choice(LABELS)) if kind == "box" and rng.random() < 0.7 else None
    thing = Thing(world.new_id(), kind, str(rng.choice(COLORS)), label, body, np.asarray(pos, float), place, **where)
    if kind == "tote":  # a tote stands lower than a box: keep its base where the box's would be
        thing.pos[2] += HALF["tote"][2] - HALF["box"][2]
    return thing


def populate(rng: np.random.Generator, occupancy: float = 0.6, aisle_p: float = 0.4) -> World:
    """A random layout: shelf slots filled with ``occupancy``, cones and pallets, maybe floor and conveyor boxes."""
    world = World()
    items = iter(range(N_ITEMS))
    for level in LEVELS:
        for slot in SLOTS:
            if rng.random() < occupancy:
                pos = slot_center(level, slot, "box")
                world.things.append(random_item(world, rng, next(items), pos, "shelf", level=level, slot=slot))
    for spot in rng.permutation(len(BOX_FLOOR_SPOTS))[: rng.integers(0, 2, endpoint=True)]:
        x, y = BOX_FLOOR_SPOTS[spot]
        world.things.append(random_item(world, rng, next(items), (x, y, HALF["box"][2]), "floor"))
    aisle = list(rng.permutation(len(AISLE_SPOTS_X)))
    for kind, count in (("cone", N_CONES), ("pallet", N_PALLETS)):
        spots = [FLOOR_SPOTS[kind][k] for k in rng.permutation(len(FLOOR_SPOTS[kind]))]
        for i in range(int(rng.integers(1 if kind == "cone" else 0, count, endpoint=True))):
            if aisle and rng.random() < aisle_p:
                x, y, yaw = AISLE_SPOTS_X[aisle.pop()] + rng.uniform(-0.1, 0.1), rng.uniform(*AISLE_SPOT_Y), 0.0
            else:
                x, y, yaw = spots.pop()
                x, y = x + rng.uniform(-0.1, 0.1), y + rng.uniform(-0.1, 0.1)
            thing = Thing(world.new_id(), kind, None, None, i, np.array((x, y, 0.0)), "floor")
            thing.place, thing.yaw = "aisle" if in_aisle(thing.pos) else "floor", yaw + float(rng.uniform(-0.2, 0.2))
            world.things.append(thing)
    return world


def apply(cell: Cell, world: World) -> None:
    """Write the world's object states into the cell's model and data (all items, cones and pallets)."""
    shown = set()
    for t in world.things:
        if t.kind in ("box", "tote"):
            cell.set_item(t.body, t.kind, t.color or "red", t.label, t.pos)
        else:
            mocap = (cell.cone_mocap if t.kind == "cone" else cell.pallet_mocap)[t.body]
            cell.set_mocap(mocap, t.pos, t.yaw)
        shown.add((t.kind if t.kind in ("cone", "pallet") else "item", t.body))
    for i in range(N_ITEMS):
        if ("item", i) not in shown:
            cell.set_item(i, None)
    for kind, mocaps in (("cone", cell.cone_mocap), ("pallet", cell.pallet_mocap)):
        for i, mocap in enumerate(mocaps):
            if (kind, i) not in shown:
                cell.set_mocap(mocap, (4.0 + i, 8.0, -5.0))


def corners(t: Thing) -> np.ndarray:
    """The 8 corners of an object's bounding box in the world."""
    if t.kind in HALF:
        half, center = np.array(HALF[t.kind]), t.pos
    else:
        half = np.array((0.17, 0.17, 0.26) if t.kind == "cone" else (0.6, 0.4, 0.072))
        center = t.pos + np.array([0.0, 0.0, half[2]])
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
    c, s = np.cos(t.yaw), np.sin(t.yaw)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    return center + (signs * half) @ rot.T


def truth(cell: Cell, world: World, geom: np.ndarray) -> CellTruth:
    """Ground truth of the current frame from the world state and the segmentation render ``geom``."""
    height, width = geom.shape
    boxes = owner_boxes(cell, geom)
    objects = []
    for t in world.things:
        box, count = boxes.get(t.owner(), (None, 0))
        area = silhouette_area(cell, corners(t), width, height)
        fraction = min(1.0, count / area) if area > 0 else 0.0
        objects.append(
            CellObject(
                t.id, t.kind, t.color, t.label, t.place, t.level, t.slot, box, round(fraction if box else 0.0, 3)
            )
        )
    arm = boxes.get(ARM)
    blocked = any(t.place == "aisle" for t in world.things if t.kind in ("cone", "pallet"))
    held = world.holding.id if world.holding else None
    return CellTruth(width, height, tuple(objects), held, blocked, arm[0] if arm else None)
