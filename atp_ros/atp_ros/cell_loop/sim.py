"""The warehouse cell as a robot simulator without ROS: a seeded layout, the Panda on its rail executing joint
trajectories and gripper commands, grasping and releasing items, the camera (RGB, depth) and the ground truth.

The cell is kinematic (contacts and gravity are off in its MuJoCo model): a trajectory is followed exactly
(a perfect position controller, linear between its points), and a grasp holds an item when the closing fingers
reach it with the grasp frame within :data:`GRASP_TOLERANCE` of the item's grasp point (:func:`arm.grasp_frame`).
:mod:`.sim_node` puts it on ROS 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from atp_ros.cell_loop.camera import NOMINAL_FOVY, RAIL_ORIGIN, PinholeCamera, nominal_pose
from atp_ros.warehouse.cell import arm, scene
from atp_ros.warehouse.cell.cell import ARM_JOINTS, Cell
from atp_ros.warehouse.cell.render import CellRenderer
from atp_ros.warehouse.cell.scene import mujoco
from atp_ros.warehouse.cell.truth import LEVELS, SLOTS, CellTruth
from atp_ros.warehouse.cell.world import Thing, World, apply, conveyor_center, populate, slot_center, truth

RAIL_JOINT = "rail"
FINGER_JOINTS = ("panda_finger_joint1", "panda_finger_joint2")
ARM_COMMAND_JOINTS = (RAIL_JOINT, *ARM_JOINTS)  # what a JointTrajectory may name
JOINT_NAMES = (*ARM_COMMAND_JOINTS, *FINGER_JOINTS)  # what JointState reports
RAIL_RANGE = (float(scene.RAIL_X[0]), float(scene.RAIL_X[1]))  # the rail's usable length (m)
GRASP_TOLERANCE = 0.03  # m between the grasp frame and an item's grasp point for the fingers to hold it
PLACE_TOLERANCE = 0.08  # m between a released item's center and a place (conveyor pick point, empty slot)
FINGER_SPEED = 0.1  # m/s per finger
START_RAIL = 0.3
MAX_POINTS = 10_000  # a longer trajectory is refused (bad input, not a plan)


@dataclass
class _Trajectory:
    """Knot times (s from acceptance) and full command-joint vectors; the first knot is the state at acceptance."""

    times: np.ndarray
    positions: np.ndarray
    elapsed: float = 0.0
    ident: str = ""


@dataclass
class Event:
    """Something the simulator did that a client hears about (grasp, release, trajectory done or refused)."""

    kind: str  # "grasped" | "released" | "closed_empty" | "trajectory_done" | "trajectory_rejected" | "reset"
    detail: dict = field(default_factory=dict)


class CellSim:
    """A seeded warehouse cell with a commandable arm; :meth:`step` advances simulated time."""

    def __init__(
        self,
        width: int = 640,
        height: int = 480,
        fovy: float = NOMINAL_FOVY,
        position=None,
        orientation=None,
        seed: int = 0,
    ) -> None:
        if not (16 <= width <= 4096 and 16 <= height <= 4096):
            raise ValueError(f"camera size must be 16..4096 pixels a side, not {width}x{height}")
        if not 1.0 <= fovy <= 170.0:
            raise ValueError(f"camera.fovy must be within [1, 170] degrees, not {fovy}")
        pos0, quat0 = nominal_pose()
        self.camera = PinholeCamera.from_fovy(
            width,
            height,
            fovy,
            position if position is not None else pos0,
            orientation if orientation is not None else quat0,
        )
        self.fovy = float(fovy)
        self.cell = Cell()
        self.renderer = CellRenderer(width, height)
        self.events: list[Event] = []
        self.reset(seed)

    # --- episode ------------------------------------------------------------------------------------------------
    def reset(self, seed: int) -> None:
        """A new seeded layout and look, the arm in its ready pose with the gripper open, nothing held."""
        self.seed = int(seed)
        rng = np.random.default_rng(self.seed)
        self.cell.vary_appearance(rng)  # lights, textures, props (its camera jitter is replaced below)
        self._place_camera()
        self.world: World = populate(rng)
        self.rail, self.q, self.finger = START_RAIL, arm.Q_READY.copy(), arm.OPEN
        self.finger_goal = arm.OPEN
        self.trajectory: _Trajectory | None = None
        self._offset = np.zeros(3)
        self.time = 0.0
        self._sync()
        self.events.append(Event("reset", {"seed": self.seed}))

    def _place_camera(self) -> None:
        c, m = self.cell, self.cell.model
        # MuJoCo cameras look along their -z with y up: the optical frame's y and z flipped.
        mj_rot = self.camera.rotation @ np.diag([1.0, -1.0, -1.0])
        quat = np.zeros(4)
        mujoco.mju_mat2Quat(quat, np.ascontiguousarray(mj_rot).ravel())
        m.cam_pos[c.cam] = self.camera.position + RAIL_ORIGIN
        m.cam_quat[c.cam] = quat
        # The renderer widens a 4:3 frame's vertical view for other aspects (Cell.fovy_for): undo that here so the
        # published image has exactly camera.fovy.
        w, h = self.camera.width, self.camera.height
        c.fovy = math.degrees(2 * math.atan(math.tan(math.radians(self.fovy) / 2) * w / (h * 4 / 3)))

    def _sync(self) -> None:
        """Write the arm and the world into MuJoCo; the held item follows the grasp frame."""
        self.cell.set_arm(self.rail, self.q, self.finger)
        self.cell.forward()
        if self.world.holding is not None:
            self.world.holding.pos = self.cell.eef_pose()[0] + self._offset
        apply(self.cell, self.world)
        self.cell.forward()

    # --- commands -----------------------------------------------------------------------------------------------
    def command_trajectory(self, joint_names, points, ident: str = "") -> str | None:
        """Follow ``points`` [(seconds from now, positions)] for ``joint_names`` (a subset of
        :data:`ARM_COMMAND_JOINTS`; the others hold). Replaces a running trajectory. Returns None when accepted,
        else the reason it was refused (nothing changes then)."""
        names = list(joint_names)
        reason = _check_trajectory(names, points, self.cell.arm_range)
        if reason:
            self.events.append(Event("trajectory_rejected", {"id": ident, "reason": reason}))
            return reason
        index = [ARM_COMMAND_JOINTS.index(n) for n in names]
        now = self.command_state()
        times, positions = [0.0], [now]
        for t, values in points:
            full = positions[-1].copy()
            full[index] = values
            if t <= 0.0:  # a point at time 0 moves there at once (as joint_trajectory_controller does)
                positions[0] = full
                continue
            times.append(float(t))
            positions.append(full)
        self.trajectory = _Trajectory(np.array(times), np.array(positions), ident=ident)
        return None

    def command_gripper(self, opening: float) -> str | None:
        """Move each finger to ``opening`` meters (0 closed .. :data:`arm.OPEN`); None, or why it was refused."""
        if not math.isfinite(opening) or not 0.0 <= opening <= arm.OPEN + 1e-9:
            return f"gripper opening must be within [0, {arm.OPEN}] m, not {opening}"
        self.finger_goal = float(opening)
        return None

    def command_state(self) -> np.ndarray:
        """Rail and the 7 arm joints, as a trajectory names them."""
        return np.concatenate([[self.rail], self.q])

    # --- time ---------------------------------------------------------------------------------------------------
    def step(self, dt: float) -> None:
        """Advance ``dt`` simulated seconds: the trajectory, the fingers, grasp and release."""
        if self.trajectory is not None:
            tr = self.trajectory
            tr.elapsed += dt
            if tr.elapsed >= tr.times[-1]:
                state = tr.positions[-1]
                self.trajectory = None
                self.events.append(Event("trajectory_done", {"id": tr.ident}))
            else:
                state = np.array([np.interp(tr.elapsed, tr.times, tr.positions[:, j]) for j in range(8)])
            self.rail, self.q = float(state[0]), state[1:].copy()
        self._move_fingers(dt)
        self.time += dt
        self._sync()

    def _move_fingers(self, dt: float) -> None:
        goal, held = self.finger_goal, self.world.holding
        if held is not None:
            if goal > arm.CLOSED + 1e-4:  # opening: let go as soon as the fingers part from it
                self._release(held)
            else:
                return  # closed on the item: the fingers rest on its sides
        before = self.finger
        step = FINGER_SPEED * dt
        self.finger = goal if abs(goal - before) <= step else before + math.copysign(step, goal - before)
        if self.finger < before and self.finger <= arm.CLOSED < before:  # the fingers close past an item's width
            thing = self._graspable()
            if thing is not None:
                self.finger = arm.CLOSED
                self._sync_arm_only()
                self._offset = thing.pos - self.cell.eef_pose()[0]
                detail = {"id": thing.id, "from": _where(thing)}
                thing.place, thing.level, thing.slot = "gripper", None, None
                self.world.holding = thing
                self.events.append(Event("grasped", detail))
        if self.finger <= 1e-6 and before > 1e-6 and self.world.holding is None:
            self.events.append(Event("closed_empty", {}))

    def _sync_arm_only(self) -> None:
        self.cell.set_arm(self.rail, self.q, self.finger)
        self.cell.forward()

    def _graspable(self) -> Thing | None:
        """The box or tote whose grasp point is within :data:`GRASP_TOLERANCE` of the grasp frame, if any."""
        self._sync_arm_only()
        eef = self.cell.eef_pose()[0]
        best, best_d = None, GRASP_TOLERANCE
        for t in self.world.things:
            if t.kind not in ("box", "tote"):
                continue
            d = float(np.linalg.norm(arm.grasp_frame(t.pos, t.kind) - eef))
            if d <= best_d:
                best, best_d = t, d
        return best

    def _release(self, thing: Thing) -> None:
        """Let go of ``thing``: on the conveyor's pick point or into an empty slot when close to one, else dropped."""
        self.world.holding = None
        center = thing.pos
        dest = conveyor_center(scene.ITEM_Y, thing.kind)
        if np.linalg.norm(center - dest) <= PLACE_TOLERANCE:
            thing.pos, thing.place = dest, "conveyor"
        else:
            slot = next(
                (
                    (lv, sl)
                    for lv in LEVELS
                    for sl in SLOTS
                    if self.world.at(lv, sl) is None
                    and np.linalg.norm(center - slot_center(lv, sl, thing.kind)) <= PLACE_TOLERANCE
                ),
                None,
            )
            if slot is not None:
                thing.pos, thing.place, (thing.level, thing.slot) = slot_center(*slot, thing.kind), "shelf", slot
            else:  # nothing below it: it falls to the floor where it is
                thing.pos = np.array([center[0], center[1], scene.HALF[thing.kind][2]])
                thing.place = "floor"
        self.events.append(Event("released", {"id": thing.id, "to": _where(thing)}))

    # --- observation --------------------------------------------------------------------------------------------
    def joint_positions(self) -> list[float]:
        """Positions in :data:`JOINT_NAMES` order (the second finger joint mirrors the first, as in the MJCF)."""
        return [self.rail, *map(float, self.q), self.finger, -self.finger]

    def rgb(self) -> np.ndarray:
        """The camera image, uint8 HxWx3."""
        return self.renderer.rgb(self.cell)

    def depth(self) -> np.ndarray:
        """Planar depth image, float32 HxW meters."""
        return self.renderer.depth(self.cell)

    def truth(self) -> CellTruth:
        """The ground truth of the current scene (a segmentation render: visible boxes per object)."""
        _, geom = self.renderer.render(self.cell)
        return truth(self.cell, self.world, geom)

    def state(self) -> dict:
        """JSON-able world state: every object (id, kind, color, label, place, level, slot, position in ``rail``),
        the held object's id and the arm's joint positions."""
        return {
            "seed": self.seed,
            "time": round(self.time, 4),
            "holding": self.world.holding.id if self.world.holding else None,
            "joints": dict(zip(JOINT_NAMES, (round(v, 5) for v in self.joint_positions()), strict=True)),
            "moving": self.trajectory is not None,
            "objects": [
                {
                    "id": t.id,
                    "kind": t.kind,
                    "color": t.color,
                    "label": t.label,
                    "place": t.place,
                    "level": t.level,
                    "slot": t.slot,
                    "position": [round(float(v), 4) for v in t.pos - RAIL_ORIGIN],
                }
                for t in self.world.things
            ],
        }

    def close(self) -> None:
        """Free the renderer."""
        self.renderer.close()


def _where(t: Thing) -> str:
    return f"{t.level}-{t.slot}" if t.place == "shelf" else t.place


def _check_trajectory(names: list[str], points, arm_range: np.ndarray) -> str | None:
    """Why a trajectory cannot be followed (unknown or repeated joints, bad sizes, times, values), or None."""
    unknown = [n for n in names if n not in ARM_COMMAND_JOINTS]
    if not names or unknown:
        return f"unknown joint names {unknown} (known: {', '.join(ARM_COMMAND_JOINTS)})" if unknown else "no joints"
    if len(set(names)) != len(names):
        return "a joint is named twice"
    if not points:
        return "no points"
    if len(points) > MAX_POINTS:
        return f"{len(points)} points (at most {MAX_POINTS})"
    lo = {RAIL_JOINT: RAIL_RANGE[0], **{j: float(arm_range[k, 0]) for k, j in enumerate(ARM_JOINTS)}}
    hi = {RAIL_JOINT: RAIL_RANGE[1], **{j: float(arm_range[k, 1]) for k, j in enumerate(ARM_JOINTS)}}
    last = -1.0
    for i, (t, values) in enumerate(points):
        if not math.isfinite(t) or t < 0 or t <= last:
            return f"point {i}: time_from_start {t} is not after the previous point's"
        last = t
        if len(values) != len(names):
            return f"point {i}: {len(values)} positions for {len(names)} joints"
        for n, v in zip(names, values, strict=True):
            if not math.isfinite(v) or not lo[n] - 1e-6 <= v <= hi[n] + 1e-6:
                return f"point {i}: {n} = {v} outside [{lo[n]:.3f}, {hi[n]:.3f}]"
    return None
