"""Continuous episodes of the warehouse cell (the arm moves boxes between slots and the conveyor, the conveyor
delivers and takes away boxes, cones and pallets move in and out of the aisle), and independent random stills."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from atp_ros.warehouse.cell import arm, scene
from atp_ros.warehouse.cell.cell import Cell
from atp_ros.warehouse.cell.render import CellRenderer
from atp_ros.warehouse.cell.truth import LEVELS, SLOTS, CellTruth
from atp_ros.warehouse.cell.world import (
    AISLE_SPOT_Y,
    AISLE_SPOTS_X,
    FLOOR_SPOTS,
    Thing,
    apply,
    conveyor_center,
    in_aisle,
    populate,
    random_item,
    slot_center,
    truth,
)

TILT = {"top": 0.0, "middle": math.radians(30), "bottom": math.radians(45), "conveyor": math.radians(30)}
JOINT_SPEED, RAIL_SPEED, BELT_SPEED, FLOOR_SPEED = 1.2, 0.6, 0.3, 0.5  # rad/s, m/s


@dataclass(frozen=True)
class CellFrame:
    """One rendered frame of the cell with its ground truth."""

    index: int
    stamp_s: float
    rgb: np.ndarray
    truth: CellTruth


@dataclass
class _Segment:
    """A joint-space move of the arm over ``frames`` frames (cosine-eased), then an optional event."""

    frames: int
    start: tuple[float, np.ndarray, float]
    end: tuple[float, np.ndarray, float]
    done: Callable[[], None] | None = None
    step: int = 0


class Episode:
    """An endless, seed-deterministic stream of :class:`CellFrame` at ``rate_hz`` (``stamp_s = index / rate_hz``)."""

    def __init__(self, seed: int, width: int = 640, height: int = 480, rate_hz: float = 10.0) -> None:
        self.seed, self.rate_hz = seed, rate_hz
        self.rng = np.random.default_rng(seed)
        self.cell = Cell()
        self.cell.vary_appearance(self.rng)
        self.world = populate(self.rng)
        self.poser = arm.ArmPoser(self.cell)
        self.renderer = CellRenderer(width, height)
        self.index = 0
        self._segments: deque[_Segment] = deque()
        self._offset = np.zeros(3)  # held item center minus grasp frame position
        self._belt: tuple[Thing, float] | None = None  # item riding the conveyor and its direction (+1 away)
        self._floor_move: tuple[Thing, np.ndarray] | None = None
        self._next_floor_event = self._floor_interval()
        self._arm = (0.3, arm.Q_READY.copy(), arm.OPEN)
        self.cell.set_arm(*self._arm)

    def __iter__(self) -> Iterator[CellFrame]:
        return self

    def __next__(self) -> CellFrame:
        if self.index > 0:
            self._advance()
        apply(self.cell, self.world)
        self.cell.set_arm(*self._arm)
        self.cell.forward()
        if self.world.holding is not None:  # the held item follows the gripper
            self.world.holding.pos = self.cell.eef_pose()[0] + self._offset
            apply(self.cell, self.world)
            self.cell.forward()
        rgb, geom = self.renderer.render(self.cell)
        frame = CellFrame(self.index, self.index / self.rate_hz, rgb, truth(self.cell, self.world, geom))
        self.index += 1
        return frame

    def close(self) -> None:
        """Free the renderer."""
        self.renderer.close()

    # --- time step ----------------------------------------------------------------------------------------------
    def _advance(self) -> None:
        dt = 1.0 / self.rate_hz
        if not self._segments:
            self._plan()
        seg = self._segments[0]
        seg.step += 1
        a = 0.5 - 0.5 * math.cos(math.pi * min(1.0, seg.step / seg.frames))
        (r0, q0, g0), (r1, q1, g1) = seg.start, seg.end
        self._arm = (r0 + a * (r1 - r0), q0 + a * (q1 - q0), g0 + a * (g1 - g0))
        if seg.step >= seg.frames:
            self._segments.popleft()
            if seg.done:
                seg.done()
        self._move_belt(dt)
        self._move_floor(dt)

    def _move_belt(self, dt: float) -> None:
        if self._belt is None:
            return
        thing, direction = self._belt
        thing.pos[1] += direction * BELT_SPEED * dt
        if direction > 0 and thing.pos[1] > scene.CONVEYOR_END_Y + 0.2:  # gone through the wall
            self.world.things.remove(thing)
            self._belt = None
        elif direction < 0 and thing.pos[1] <= scene.ITEM_Y:  # arrived at the pick point
            thing.pos[1] = scene.ITEM_Y
            self._belt = None

    def _floor_interval(self) -> int:
        return int(self.rng.integers(4, 12) * self.rate_hz)

    def _move_floor(self, dt: float) -> None:
        if self._floor_move is None:
            self._next_floor_event -= 1
            movable = [t for t in self.world.things if t.kind in ("cone", "pallet")]
            if self._next_floor_event > 0 or not movable:
                return
            # Mostly clear a blocked aisle, else block a clear one, so episodes see both states.
            blockers = [t for t in movable if in_aisle(t.pos)]
            rest = [t for t in movable if not in_aisle(t.pos)]
            pool = blockers if blockers and (not rest or self.rng.random() < 0.75) else rest
            thing = pool[int(self.rng.integers(len(pool)))]
            others = [t.pos[:2] for t in movable if t is not thing]
            aisle = [(x, sum(AISLE_SPOT_Y) / 2) for x in AISLE_SPOTS_X]
            spots = [s[:2] for s in FLOOR_SPOTS[thing.kind]] if in_aisle(thing.pos) else aisle
            # A free spot: nothing within a pallet's length, so the mover never runs through another object.
            free = [s for s in spots if all(np.linalg.norm(np.subtract(s, o)) > 1.3 for o in others)]
            if not free:
                return
            goal = free[int(self.rng.integers(len(free)))]
            self._floor_move = (thing, np.array([*goal, 0.0]))
            self._next_floor_event = self._floor_interval()
            return
        thing, goal = self._floor_move
        delta = goal - thing.pos
        dist = float(np.linalg.norm(delta))
        step = FLOOR_SPEED * dt
        thing.pos = goal.copy() if dist <= step else thing.pos + delta * (step / dist)
        thing.place = "aisle" if in_aisle(thing.pos) else "floor"
        if dist <= step:
            self._floor_move = None

    # --- planning -----------------------------------------------------------------------------------------------
    def _plan(self) -> None:
        """Queue the arm's next task: a slot-to-slot move, a dispatch to the conveyor, or stowing a delivery."""
        w, rng = self.world, self.rng
        shelf = [t for t in w.things if t.place == "shelf"]
        empty = [(lv, sl) for lv in LEVELS for sl in SLOTS if w.at(lv, sl) is None]
        waiting = [t for t in w.things if t.place == "conveyor" and abs(t.pos[1] - scene.ITEM_Y) < 1e-6]
        if waiting and self._belt is None:
            if not empty:  # nowhere to stow it: the conveyor takes it back
                self._belt = (waiting[0], 1.0)
            else:
                return self._pick_place(waiting[0], ("shelf", *empty[int(rng.integers(len(empty)))]))
        r = rng.random()
        if shelf and empty and r < 0.5:
            src = shelf[int(rng.integers(len(shelf)))]
            dst = empty[int(rng.integers(len(empty)))]
            return self._pick_place(src, ("shelf", *dst))
        on_belt = any(t.place == "conveyor" for t in w.things)
        if shelf and not on_belt and (r < 0.8 or not empty or not w.free_items()):
            return self._pick_place(shelf[int(rng.integers(len(shelf)))], ("conveyor", None, None))
        if not on_belt and w.free_items():  # call a delivery and wait in the ready pose for it
            thing = random_item(
                w, rng, w.free_items()[0], conveyor_center(scene.CONVEYOR_END_Y + 0.1, "box"), "conveyor"
            )
            w.things.append(thing)
            self._belt = (thing, -1.0)
        self._go((arm.rail_for(scene.CONVEYOR_X - 0.4), arm.Q_READY, arm.OPEN), min_frames=int(self.rate_hz))

    def _target(self, where: tuple, kind: str) -> tuple[np.ndarray, float]:
        place, level, slot = where
        center = conveyor_center(scene.ITEM_Y, kind) if place == "conveyor" else slot_center(level, slot, kind)
        return arm.grasp_frame(center, kind), TILT["conveyor" if place == "conveyor" else level]

    def _go(self, end: tuple, min_frames: int = 2, done: Callable[[], None] | None = None) -> None:
        start = self._segments[-1].end if self._segments else self._arm
        joints = np.max(np.abs(end[1] - start[1])) / JOINT_SPEED
        rail = abs(end[0] - start[0]) / RAIL_SPEED
        # Cosine easing peaks at pi/2 times the mean speed: stretch so the peak stays near the speed limits.
        frames = max(min_frames, math.ceil(1.6 * max(joints, rail) * self.rate_hz))
        self._segments.append(_Segment(frames, start, end, done))

    def _pick_place(self, thing: Thing, dst: tuple) -> None:
        src = ("conveyor", None, None) if thing.place == "conveyor" else ("shelf", thing.level, thing.slot)
        src_target, src_tilt = self._target(src, thing.kind)
        dst_target, dst_tilt = self._target(dst, thing.kind)
        pose = self.poser.pose
        grip = max(2, round(0.3 * self.rate_hz))
        self._go((*pose(src_target, src_tilt, back=arm.APPROACH), arm.OPEN))
        self._go((*pose(src_target, src_tilt), arm.OPEN))
        self._go((*pose(src_target, src_tilt), arm.CLOSED), grip, done=lambda: self._grasp(thing))
        self._go((*pose(src_target, src_tilt, back=arm.APPROACH, lift=0.03), arm.CLOSED))
        self._go((*pose(dst_target, dst_tilt, back=arm.APPROACH, lift=0.03), arm.CLOSED))
        self._go((*pose(dst_target, dst_tilt, lift=0.01), arm.CLOSED))
        self._go((*pose(dst_target, dst_tilt), arm.OPEN), grip, done=lambda: self._release(thing, dst))
        self._go((*pose(dst_target, dst_tilt, back=arm.APPROACH), arm.OPEN))

    def _grasp(self, thing: Thing) -> None:
        self.cell.set_arm(*self._arm)
        self.cell.forward()
        self._offset = thing.pos - self.cell.eef_pose()[0]
        thing.place, thing.level, thing.slot = "gripper", None, None
        self.world.holding = thing

    def _release(self, thing: Thing, dst: tuple) -> None:
        place, level, slot = dst
        if place == "conveyor":
            thing.pos = conveyor_center(scene.ITEM_Y, thing.kind)
            self._belt = (thing, 1.0)
        else:
            thing.pos = slot_center(level, slot, thing.kind)
        thing.place, thing.level, thing.slot = place, level, slot
        self.world.holding = None


_STILL: dict = {}


def random_still(seed: int, width: int = 336, height: int = 336) -> CellFrame:
    """An independent random frame for training data: random look, slot occupancy, aisle state and arm pose,
    holding an item or not. One cell and one renderer per size are kept per process, so repeated calls are fast."""
    rng = np.random.default_rng(seed)
    if "cell" not in _STILL:
        _STILL["cell"] = Cell()
        _STILL["poser"] = arm.ArmPoser(_STILL["cell"])
    cell, poser = _STILL["cell"], _STILL["poser"]
    if (width, height) not in _STILL:
        _STILL[(width, height)] = CellRenderer(width, height)
    cell.vary_appearance(rng)
    world = populate(rng, occupancy=rng.uniform(0.3, 0.9), aisle_p=rng.uniform(0.1, 0.7))
    shelf = [t for t in world.things if t.place == "shelf"]
    levels = [*LEVELS, "conveyor"]

    def random_pose() -> tuple[float, np.ndarray]:
        level = levels[int(rng.integers(len(levels)))]
        x = scene.CONVEYOR_X if level == "conveyor" else scene.SLOT_X[SLOTS[int(rng.integers(len(SLOTS)))]]
        z = (scene.CONVEYOR_Z if level == "conveyor" else scene.DECK_Z[level]) + scene.HALF["box"][2]
        back = float(rng.choice((0.0, 0.0, arm.APPROACH / 2, arm.APPROACH)))
        return poser.pose(arm.grasp_frame((x, scene.ITEM_Y, z), "box"), TILT[level], back=back)

    (r0, q0), (r1, q1) = random_pose(), random_pose()
    a = float(rng.choice((0.0, 0.0, rng.uniform(0, 1))))  # at a grasp pose, or somewhere between two
    holding = shelf and rng.random() < 0.4
    cell.set_arm(r0 + a * (r1 - r0), q0 + a * (q1 - q0), arm.CLOSED if holding else arm.OPEN)
    cell.forward()
    if holding:
        thing = shelf[int(rng.integers(len(shelf)))]
        thing.place, thing.level, thing.slot = "gripper", None, None
        thing.pos = cell.eef_pose()[0] + (0.0, scene.HALF[thing.kind][1] - 0.03, 0.0)
        world.holding = thing
    apply(cell, world)
    cell.forward()
    rgb, geom = _STILL[(width, height)].render(cell)
    return CellFrame(0, 0.0, rgb, truth(cell, world, geom))
