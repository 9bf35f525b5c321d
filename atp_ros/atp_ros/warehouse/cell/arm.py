"""Arm poses for the cell: grasp frames in front of items and a damped-least-squares IK on MuJoCo Jacobians.

Own IK instead of mink: the cell only needs a handful of horizontal front grasps with the rail already driven to
the item's column, which a few dozen DLS iterations solve; mink would add scipy for that.
"""

from __future__ import annotations

import numpy as np

from atp_ros.warehouse.cell.cell import Cell
from atp_ros.warehouse.cell.scene import HALF, mujoco

# The ready pose's grasp frame pitched up to point into the racking (+y); columns are its axes in the world.
GRASP_ROT = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
Q_READY = np.array([0.0, -0.5, 0.0, -2.3, 0.0, 1.8, 0.785])
APPROACH = 0.22  # how far in front of the grasp the gripper lines up before moving in
OPEN, CLOSED = 0.04, 0.025


def grasp_frame(item_pos, kind: str) -> np.ndarray:
    """Where the grasp frame goes to hold an item: at its front face, a little inside, at mid height."""
    pos = np.asarray(item_pos, float).copy()
    pos[1] -= HALF[kind][1] - 0.03
    return pos


def rail_for(x: float) -> float:
    """The rail position that puts the arm base in line with a column at world x."""
    return float(np.clip(x, -1.0, 1.95))


def grasp_rot(tilt: float) -> np.ndarray:
    """:data:`GRASP_ROT` pointed ``tilt`` radians below horizontal (its wrist cannot reach low shelves level)."""
    c, s = np.cos(tilt), np.sin(tilt)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]]) @ GRASP_ROT


def solve_ik(
    cell: Cell,
    rail: float,
    target: np.ndarray,
    rot: np.ndarray = GRASP_ROT,
    q0: np.ndarray | None = None,
    iters: int = 80,
) -> tuple[np.ndarray, float]:
    """Joint angles putting the grasp frame at ``target`` turned as ``rot``, the rail fixed; returns (q, error m)."""
    m, d = cell.model, cell.data
    q = (Q_READY if q0 is None else q0).copy()
    lo, hi = cell.arm_range[:, 0], cell.arm_range[:, 1]
    jacp, jacr = np.zeros((3, m.nv)), np.zeros((3, m.nv))
    d.qpos[cell.rail_adr] = rail
    err = np.inf
    for _ in range(iters):
        d.qpos[cell.arm_adr] = q
        mujoco.mj_kinematics(m, d)
        mujoco.mj_comPos(m, d)
        pos, cur = d.xpos[cell.eef], d.xmat[cell.eef].reshape(3, 3)
        e_pos = target - pos
        # Orientation error as a rotation vector (small-angle form of R_target R^T).
        e_rot = 0.5 * sum(np.cross(cur[:, k], rot[:, k]) for k in range(3))
        err = float(np.linalg.norm(e_pos))
        if err < 1e-3 and np.linalg.norm(e_rot) < 5e-3:
            break
        mujoco.mj_jacBody(m, d, jacp, jacr, cell.eef)
        jac = np.vstack([jacp[:, cell.arm_dof], jacr[:, cell.arm_dof]])
        e = np.concatenate([e_pos, 0.5 * e_rot])
        lam = 0.05
        jjt = jac @ jac.T + lam**2 * np.eye(6)
        dq = jac.T @ np.linalg.solve(jjt, e)
        # Pull toward a natural, elbow-up posture in the null space so poses look like a real arm's.
        pinv = jac.T @ np.linalg.solve(jjt, np.eye(6))
        dq += (np.eye(7) - pinv @ jac) @ (0.1 * (Q_READY - q))
        step = np.max(np.abs(dq))
        if step > 0.3:
            dq *= 0.3 / step
        q = np.clip(q + dq, lo + 1e-3, hi - 1e-3)
    return q, err


class ArmPoser:
    """Memoized IK for the few grasp targets a cell uses (targets repeat: slots and the conveyor pick point)."""

    def __init__(self, cell: Cell) -> None:
        self.cell = cell
        self._cache: dict[tuple, np.ndarray] = {}

    def pose(self, target, tilt: float, back: float = 0.0, lift: float = 0.0) -> tuple[float, np.ndarray]:
        """(rail, q) putting the grasp frame ``back`` m behind ``target`` along its pointing axis, ``lift`` m higher."""
        rot = grasp_rot(tilt)
        goal = np.asarray(target, float) - back * rot[:, 2] + (0.0, 0.0, lift)
        rail = rail_for(goal[0])
        key = (*np.round(goal, 3), round(tilt, 3))
        if key not in self._cache:
            saved = self.cell.data.qpos.copy()
            self._cache[key], _ = solve_ik(self.cell, rail, goal, rot, iters=150)
            self.cell.data.qpos[:] = saved
        return rail, self._cache[key]
