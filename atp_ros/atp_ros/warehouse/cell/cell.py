"""A compiled warehouse cell with its MuJoCo data: the handles a frame varies (items, cones, pallets, props, arm,
camera, lights, materials) and the geometry questions about it (eef pose, projection to pixels)."""

from __future__ import annotations

import numpy as np

from atp_ros.warehouse.cell import scene, textures
from atp_ros.warehouse.cell.scene import HALF, HIDDEN_GROUP, N_CONES, N_ITEMS, N_PALLETS, N_PROPS, mujoco

ARM = -2  # owner code of the arm's geoms in :attr:`Cell.owner`
CONE0, PALLET0 = N_ITEMS, N_ITEMS + N_CONES  # owner codes of cones and pallets follow the items
ARM_JOINTS = tuple(f"panda_joint{k}" for k in range(1, 8))


class Cell:
    """The model, its data and index tables; ``owner[geom]`` maps geoms to items/cones/pallets (or :data:`ARM`)."""

    def __init__(self, model: mujoco.MjModel | None = None) -> None:
        m = self.model = model if model is not None else scene.compile_model()
        self.data = mujoco.MjData(m)
        m.opt.disableflags |= mujoco.mjtDisableBit.mjDSBL_CONTACT  # kinematics only: nothing collides
        mocap = lambda name: int(m.body_mocapid[m.body(name).id])  # noqa: E731
        self.item_mocap = [mocap(f"item{i}") for i in range(N_ITEMS)]
        self.cone_mocap = [mocap(f"cone{i}") for i in range(N_CONES)]
        self.pallet_mocap = [mocap(f"pallet{i}") for i in range(N_PALLETS)]
        self.prop_mocap = [mocap(f"prop{i}") for i in range(N_PROPS)]
        self.owner = np.full(m.ngeom, -1, np.int32)
        self.box_geoms, self.tote_geoms, self.plate = [], [], []
        for i in range(N_ITEMS):
            geoms = np.flatnonzero(m.geom_bodyid == m.body(f"item{i}").id)
            self.owner[geoms] = i
            names = [m.geom(g).name for g in geoms]
            self.tote_geoms.append([g for g, n in zip(geoms, names, strict=True) if "_tote_" in n])
            self.box_geoms.append([g for g, n in zip(geoms, names, strict=True) if "_tote_" not in n])
            self.plate.append(m.geom(f"item{i}_plate").id)
        for base, prefix, count in ((CONE0, "cone", N_CONES), (PALLET0, "pallet", N_PALLETS)):
            for i in range(count):
                self.owner[m.geom_bodyid == m.body(f"{prefix}{i}").id] = base + i
        arm_bodies = [b for b in range(m.nbody) if m.body(b).name.startswith("panda_")]
        self.owner[np.isin(m.geom_bodyid, arm_bodies)] = ARM
        self.label_material = {c: m.material(f"label_{c}").id for c in scene.LABELS}
        self.floor_materials = [m.material(f"floor_{i}").id for i in range(textures.FLOOR_VARIANTS)]
        self.wall_materials = [m.material(f"wall_{i}").id for i in range(textures.WALL_VARIANTS)]
        self.rail_adr = int(m.joint("rail").qposadr[0])
        self.arm_adr = np.array([m.joint(j).qposadr[0] for j in ARM_JOINTS])
        self.arm_dof = np.array([m.joint(j).dofadr[0] for j in ARM_JOINTS])
        self.arm_range = m.jnt_range[[m.joint(j).id for j in ARM_JOINTS]].copy()
        self.finger_adr = [int(m.joint(f"panda_finger_joint{k}").qposadr[0]) for k in (1, 2)]
        self.eef = m.body("panda_eef").id
        self.cam = m.camera("cam").id
        self.fovy = float(m.cam_fovy[self.cam])  # vertical field of view of a 4:3 frame, degrees
        self._base = {
            "cam_pos": m.cam_pos[self.cam].copy(),
            "cam_quat": m.cam_quat[self.cam].copy(),
            "cam_fovy": float(m.cam_fovy[self.cam]),
            "light_diffuse": m.light_diffuse.copy(),
            "light_pos": m.light_pos.copy(),
            "geom_rgba": m.geom_rgba.copy(),
        }
        self._rack = np.array([g for g in range(m.ngeom) if m.geom(g).name.startswith("rack_")])
        self._walls = [m.geom(n).id for n in ("wall_back", "wall_left", "wall_right")]
        for i in range(N_ITEMS):
            self.set_item(i, None)

    # --- appearance ---------------------------------------------------------------------------------------------
    def vary_appearance(self, rng: np.random.Generator) -> None:
        """Per-episode look: camera pose jitter, light strength and placement, floor/wall textures, rack paint."""
        m, b = self.model, self._base
        m.cam_pos[self.cam] = b["cam_pos"] + rng.normal(0, (0.12, 0.1, 0.08))
        tilt = rng.normal(0, 0.015, 3)  # small rotation (radians) about the camera's own axes
        quat = np.zeros(4)
        mujoco.mju_mulQuat(quat, b["cam_quat"], np.array([1.0, *(tilt / 2)]) / np.linalg.norm([1.0, *(tilt / 2)]))
        m.cam_quat[self.cam] = quat
        self.fovy = b["cam_fovy"] + rng.uniform(-2.0, 2.0)
        m.light_diffuse[:] = b["light_diffuse"] * rng.uniform(0.7, 1.3, (m.nlight, 1))
        m.light_pos[:] = b["light_pos"] + rng.normal(0, 0.4, b["light_pos"].shape)
        m.vis.headlight.ambient[:] = rng.uniform(0.25, 0.45)
        m.geom_matid[m.geom("floor").id] = rng.choice(self.floor_materials)
        wall = rng.choice(self.wall_materials)
        m.geom_matid[self._walls] = wall
        rgba = b["geom_rgba"][self._rack] * rng.uniform(0.85, 1.1, (1, 4))
        m.geom_rgba[self._rack] = np.clip(rgba, 0, 1)
        m.geom_rgba[self._rack, 3] = 1.0
        props = ((-3.1, 1.2), (-2.9, -0.5), (3.05, 1.25), (-2.2, 1.3))  # clear of the floor spots of world.py
        for k, (x, y) in zip(self.prop_mocap, props, strict=True):
            self.data.mocap_pos[k] = (x + rng.uniform(-0.1, 0.1), y + rng.uniform(-0.1, 0.1), 0)
            if rng.random() < 0.25:  # sometimes a prop is not there at all
                self.data.mocap_pos[k, 2] = -5

    # --- state --------------------------------------------------------------------------------------------------
    def set_item(self, i: int, kind: str | None, color: str = "red", label: str | None = None, pos=None) -> None:
        """Show item ``i`` as a box (plate if ``label``) or a tote, centered at ``pos``; ``kind=None`` hides it."""
        m = self.model
        show_box, show_tote = kind == "box", kind == "tote"
        m.geom_group[self.box_geoms[i]] = 0 if show_box else HIDDEN_GROUP
        m.geom_group[self.tote_geoms[i]] = 0 if show_tote else HIDDEN_GROUP
        if show_box:
            m.geom_group[self.plate[i]] = 0 if label else HIDDEN_GROUP
            if label:
                m.geom_matid[self.plate[i]] = self.label_material[label]
            m.geom_rgba[self.box_geoms[i][0]] = (*scene.COLOR_RGB[color], 1)
        if show_tote:
            m.geom_rgba[self.tote_geoms[i]] = (*scene.COLOR_RGB[color], 1)
        where = (0.0, 5.0 + i, -5.0) if kind is None or pos is None else pos
        self.data.mocap_pos[self.item_mocap[i]] = where

    def set_mocap(self, index: int, pos, yaw: float = 0.0) -> None:
        """Place a mocap body (cone, pallet or prop) at ``pos`` turned by ``yaw`` about z."""
        self.data.mocap_pos[index] = pos
        self.data.mocap_quat[index] = (np.cos(yaw / 2), 0, 0, np.sin(yaw / 2))

    def set_arm(self, rail: float, q: np.ndarray, opening: float = 0.04) -> None:
        """Rail position, the 7 arm joint angles and the finger opening (meters per finger)."""
        self.data.qpos[self.rail_adr] = rail
        self.data.qpos[self.arm_adr] = q
        self.data.qpos[self.finger_adr[0]] = opening
        self.data.qpos[self.finger_adr[1]] = -opening

    def arm_state(self) -> tuple[float, np.ndarray, float]:
        """(rail, joint angles, finger opening) as last set."""
        q = self.data.qpos
        return float(q[self.rail_adr]), q[self.arm_adr].copy(), float(q[self.finger_adr[0]])

    def forward(self) -> None:
        """Update body, geom and camera poses after edits (kinematics only)."""
        mujoco.mj_kinematics(self.model, self.data)
        mujoco.mj_camlight(self.model, self.data)

    # --- geometry -----------------------------------------------------------------------------------------------
    def eef_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """World position and 3x3 rotation of the gripper's grasp frame."""
        return self.data.xpos[self.eef].copy(), self.data.xmat[self.eef].reshape(3, 3).copy()

    def fovy_for(self, width: int, height: int) -> float:
        """The vertical field of view that keeps the 4:3 frame's horizontal view at this aspect (degrees)."""
        half = np.tan(np.deg2rad(self.fovy) / 2) * (4 / 3) * height / width
        return float(np.rad2deg(2 * np.arctan(half)))

    def project(self, points: np.ndarray, width: int, height: int) -> np.ndarray:
        """Pixel coordinates (x right, y down) of world points in the cell camera; rows behind it are NaN."""
        pos = self.data.cam_xpos[self.cam]
        rot = self.data.cam_xmat[self.cam].reshape(3, 3)
        local = (np.atleast_2d(points) - pos) @ rot  # camera frame: x right, y up, looking along -z
        f = 0.5 * height / np.tan(np.deg2rad(self.fovy_for(width, height)) / 2)
        depth = -local[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            px = np.column_stack([width / 2 + f * local[:, 0] / depth, height / 2 - f * local[:, 1] / depth])
        px[depth <= 0] = np.nan
        return px

    @staticmethod
    def item_corners(pos, kind: str) -> np.ndarray:
        """The 8 corners of an item's bounding box (items never rotate)."""
        half = np.array(HALF[kind])
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
        return np.asarray(pos) + signs * half
