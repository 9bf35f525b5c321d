"""What the pick planner knows without ROS: the task grammar, reading the perception node's answers, the racking
as a fixture map in the ``rail`` frame, turning a relevant box (and depth) into a 3D target, and the arm motions
of a pick-and-place solved with inverse kinematics on the Panda's model.

The arm's kinematic model is the cell's MJCF (what a URDF would be on a real robot); the IK is the cell's own
damped least squares (:func:`atp_ros.warehouse.cell.arm.solve_ik`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from atp_ros.cell_loop.camera import RAIL_ORIGIN, PinholeCamera, box_depth
from atp_ros.cell_loop.sim import ARM_COMMAND_JOINTS, RAIL_RANGE
from atp_ros.warehouse.cell import arm, scene
from atp_ros.warehouse.cell.cell import Cell
from atp_ros.warehouse.cell.episodes import JOINT_SPEED, RAIL_SPEED, TILT
from atp_ros.warehouse.cell.truth import COLORS, LEVELS, SLOTS
from atp_ros.warehouse.cell.world import conveyor_center, slot_center

# Why a task was given up; the planner reports one of these (or success).
CAUSES = (
    "bad_task",  # the task is not "bring the <color> <box|tote> to the conveyor"
    "no_answer",  # the perception node gave no answer (not active, no frame, stale frame, timed out)
    "answer_not_understood",  # the answer names no shelf slot
    "no_evidence",  # target_from relevant_box: the relevant box is empty or off the racking
    "ik_failure",  # no joint solution within tolerance for a grasp or place pose
    "trajectory_rejected",  # the simulator refused a trajectory
    "grasp_not_confirmed",  # after the grasp the node says the gripper holds nothing (or names no color)
    "wrong_box_grasped",  # after the grasp the node names another color
    "timeout",  # a motion or the confirmation did not complete in time
)
TASK = re.compile(
    r"^\s*(?:please\s+)?(?:bring|take|move|carry|put)\s+the\s+(?P<color>\w+)\s+(?P<kind>box|tote)\s+"
    r"(?:to|onto|on)\s+the\s+conveyor\s*[.!]?\s*$",
    re.I,
)
WHERE_QUESTION = "where is the {color} {kind}?"
HOLDING_QUESTION = "what is the gripper holding?"
IK_TOLERANCE = 0.01  # m, grasp and place poses
VIA_TOLERANCE = 0.03  # m, approach and retreat poses (no contact there)
N_POINTS = 12  # trajectory points per move (cosine-eased)
SLOT_RADIUS = 0.35  # m: an evidence point farther than this from every slot's item is not on the racking
_NUMBERS = {"1": "one", "2": "two", "3": "three", "4": "four"}


class TaskError(ValueError):
    """A task the planner cannot parse."""


@dataclass(frozen=True)
class Task:
    color: str
    kind: str

    @classmethod
    def parse(cls, text: str) -> Task:
        """``bring the red box to the conveyor`` (bring/take/move/carry/put; box or tote); TaskError otherwise."""
        m = TASK.match(text or "")
        if not m or m["color"].lower() not in COLORS:
            raise TaskError(
                f"cannot parse task {text!r}: expected 'bring the <color> <box|tote> to the conveyor' with a color "
                f"of {', '.join(COLORS)}"
            )
        return cls(m["color"].lower(), m["kind"].lower())

    def text(self) -> str:
        return f"bring the {self.color} {self.kind} to the conveyor"


def parse_where(answer: str) -> tuple[str, str] | None:
    """(level, slot) from an answer such as ``top-two``, ``top two`` or ``top 2``; None when it names no slot."""
    words = re.findall(r"[a-z0-9]+", (answer or "").lower())
    words = [_NUMBERS.get(w, w) for w in words]
    levels = [w for w in words if w in LEVELS]
    slots = [w for w in words if w in SLOTS]
    if len(levels) == 1 and len(slots) == 1:
        return levels[0], slots[0]
    return None


def parse_holding(answer: str) -> str | None:
    """A color, ``nothing``, or None when the answer is neither."""
    words = set(re.findall(r"[a-z]+", (answer or "").lower()))
    colors = [c for c in COLORS if c in words]
    if len(colors) == 1:
        return colors[0]
    if not colors and words & {"nothing", "none", "empty", "no"}:
        return "nothing"
    return None


def item_center(level: str, slot: str, kind: str) -> np.ndarray:
    """Where an item of ``kind`` stored in (level, slot) has its center, in the ``rail`` frame (fixture map)."""
    return slot_center(level, slot, kind) - RAIL_ORIGIN


def conveyor_item_center(kind: str) -> np.ndarray:
    """The conveyor's drop point for an item of ``kind``, in the ``rail`` frame."""
    return conveyor_center(scene.ITEM_Y, kind) - RAIL_ORIGIN


def evidence_point(camera: PinholeCamera, box, depth: np.ndarray | None = None) -> np.ndarray | None:
    """The 3D point (``rail`` frame) the relevant box (x0, y0, x1, y1) shows: its center pixel at the box's median
    depth when a depth image is given and valid there, else where that pixel's ray meets the shelves' front plane.
    None when the box is empty (nothing scored)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not x1 > x0 or not y1 > y0:
        return None
    u, v = (x0 + x1) / 2, (y0 + y1) / 2
    if depth is not None:
        z = box_depth(depth, box)
        if z is not None:
            return camera.backproject(u, v, z)
    front = scene.ITEM_Y - scene.HALF["box"][1] - RAIL_ORIGIN[1]
    return camera.intersect_plane_y(u, v, front)


def nearest_slot(point: np.ndarray, kind: str = "box") -> tuple[str, str, float]:
    """The shelf slot whose item center is nearest ``point`` (``rail`` frame): (level, slot, distance m)."""
    best = min(((lv, sl) for lv in LEVELS for sl in SLOTS), key=lambda s: _slot_distance(point, *s, kind))
    return best[0], best[1], _slot_distance(point, *best, kind)


def _slot_distance(point, level: str, slot: str, kind: str) -> float:
    # The front face is what a camera (and depth) sees: compare against it, not the hidden center.
    face = item_center(level, slot, kind) - (0.0, scene.HALF[kind][1], 0.0)
    return float(np.linalg.norm(np.asarray(point) - face))


@dataclass(frozen=True)
class Move:
    """One step of a plan: a joint-space move to ``positions`` (rail + 7 joints), or a gripper command."""

    what: str  # "move" | "gripper"
    positions: np.ndarray | None = None
    opening: float = 0.0
    label: str = ""


class IkFailure(RuntimeError):
    """No joint solution within :data:`IK_TOLERANCE`; the message names the pose."""


class ArmModel:
    """The Panda on its rail as a kinematic model for IK (its own MuJoCo model, never the simulator's)."""

    def __init__(self) -> None:
        self.cell = Cell()

    def solve(
        self, grasp_point, tilt: float, back: float = 0.0, lift: float = 0.0, label: str = "", tol: float = IK_TOLERANCE
    ) -> np.ndarray:
        """Rail + 7 joint positions putting the grasp frame ``back`` m behind ``grasp_point`` (``rail`` frame) along
        its pointing axis and ``lift`` m higher, pitched ``tilt`` rad down; IkFailure when farther than ``tol``."""
        rot = arm.grasp_rot(tilt)
        goal = np.asarray(grasp_point, float) + RAIL_ORIGIN - back * rot[:, 2] + (0.0, 0.0, lift)
        rail = float(np.clip(goal[0], *RAIL_RANGE))
        q, err = arm.solve_ik(self.cell, rail, goal, rot, iters=150)
        if not math.isfinite(err) or err > tol:
            raise IkFailure(f"{label or 'pose'}: no IK solution within {tol} m (best {err:.3f} m)")
        return np.concatenate([[rail], q])

    def pick_to_conveyor(self, level: str, slot: str, kind: str) -> list[Move]:
        """Approach, grasp, close, back out, carry to the conveyor, release, back out."""
        src = arm.grasp_frame(item_center(level, slot, kind), kind)
        dst = arm.grasp_frame(conveyor_item_center(kind), kind)
        t_src, t_dst = TILT[level], TILT["conveyor"]
        return [
            Move("gripper", opening=arm.OPEN, label="open"),
            Move(
                "move", self.solve(src, t_src, back=arm.APPROACH, label="approach", tol=VIA_TOLERANCE), label="approach"
            ),
            Move("move", self.solve(src, t_src, label="grasp"), label="grasp"),
            Move("gripper", opening=0.0, label="close"),
            Move(
                "move",
                self.solve(src, t_src, back=arm.APPROACH, lift=0.03, label="retreat", tol=VIA_TOLERANCE),
                label="retreat",
            ),
            Move("confirm", label="confirm"),
            Move(
                "move",
                self.solve(dst, t_dst, back=arm.APPROACH, lift=0.03, label="over conveyor", tol=VIA_TOLERANCE),
                label="carry",
            ),
            Move("move", self.solve(dst, t_dst, lift=0.01, label="place"), label="place"),
            Move("gripper", opening=arm.OPEN, label="release"),
            Move("move", self.solve(dst, t_dst, back=arm.APPROACH, label="clear", tol=VIA_TOLERANCE), label="clear"),
        ]


def timed_points(start: np.ndarray, end: np.ndarray, speed_scale: float = 1.0) -> list[tuple[float, list[float]]]:
    """A cosine-eased joint-space move from ``start`` to ``end`` (rail + 7 joints) as (seconds, positions) points,
    its duration set by the joint and rail speed limits (the eased peak stays near them)."""
    joints = float(np.max(np.abs(end[1:] - start[1:]))) / JOINT_SPEED
    rail = abs(float(end[0] - start[0])) / RAIL_SPEED
    duration = max(0.3, 1.6 * max(joints, rail)) / speed_scale
    out = []
    for k in range(1, N_POINTS + 1):
        a = 0.5 - 0.5 * math.cos(math.pi * k / N_POINTS)
        out.append((duration * k / N_POINTS, [float(v) for v in start + a * (end - start)]))
    return out


JOINTS = ARM_COMMAND_JOINTS
