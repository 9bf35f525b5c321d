"""The warehouse cell as one MuJoCo model: racking, boxes and totes, floor with a marked aisle, cones, pallets,
a conveyor, walls and a Franka Panda on a rail; varied per seed by editing model arrays (no recompilation).

Frame: x to the right as the camera sees it, y away from the camera (towards the racking), z up; meters.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")  # headless by default; must be set before mujoco is imported

import mujoco
import numpy as np

from atp_ros.warehouse.cell import textures
from atp_ros.warehouse.cell.truth import COLORS, LABELS, LEVELS, SLOTS

ASSETS = Path(__file__).with_name("assets")
COLOR_RGB = {
    "red": (0.80, 0.10, 0.08),
    "green": (0.12, 0.62, 0.18),
    "blue": (0.10, 0.25, 0.80),
    "yellow": (0.95, 0.82, 0.08),
    "orange": (0.98, 0.45, 0.05),
    "purple": (0.50, 0.15, 0.65),
}
assert set(COLOR_RGB) == set(COLORS)

SLOT_X = dict(zip(SLOTS, (-0.9, -0.3, 0.3, 0.9), strict=True))
DECK_Z = dict(zip(LEVELS, (1.25, 0.75, 0.25), strict=True))
ITEM_Y = 0.25  # item center depth on a shelf or on the conveyor's pick point
HALF = {"box": (0.17, 0.15, 0.13), "tote": (0.18, 0.15, 0.10)}
RAIL_Y, RAIL_X, PEDESTAL_Z = -0.6, (-1.0, 1.95), 0.55
CONVEYOR_X, CONVEYOR_Z, CONVEYOR_END_Y = 1.95, 0.72, 1.65  # the belt vanishes into the back wall at END_Y
AISLE_X, AISLE_Y = (-2.7, 2.9), (-2.0, -1.1)
N_ITEMS, N_CONES, N_PALLETS, N_PROPS = 16, 3, 2, 4
HIDDEN_GROUP = 3  # geoms in this group are not drawn (the default MjvOption shows groups 0..2)
_PLATE = (0.12, 0.004, 0.1)  # label plate half sizes: as large as the box front allows, for legibility


def _v(*xs: float) -> str:
    return " ".join(f"{x:.4g}" for x in xs)


def _geom(name: str, size: tuple, pos: tuple = (0, 0, 0), rgba: tuple | None = None, **kw: str) -> str:
    attrs = {"name": name, "type": kw.pop("type", "box"), "size": _v(*size), "pos": _v(*pos), **kw}
    if rgba is not None:
        attrs["rgba"] = _v(*rgba)
    return "<geom " + " ".join(f'{k}="{v}"' for k, v in attrs.items()) + "/>"


def _assets() -> str:
    tex = [f'<texture name="t_label_{c}" type="2d" file="label_{c}.png"/>' for c in LABELS]
    mat = [f'<material name="label_{c}" texture="t_label_{c}" specular="0.1"/>' for c in LABELS]
    for i in range(textures.FLOOR_VARIANTS):
        tex.append(f'<texture name="t_floor_{i}" type="2d" file="floor_{i}.png"/>')
        mat.append(f'<material name="floor_{i}" texture="t_floor_{i}" texrepeat="6 6" texuniform="true"/>')
    for i in range(textures.WALL_VARIANTS):
        tex.append(f'<texture name="t_wall_{i}" type="2d" file="wall_{i}.png"/>')
        mat.append(f'<material name="wall_{i}" texture="t_wall_{i}" texrepeat="0.4 0.4" texuniform="true"/>')
    tex += [
        '<texture name="t_hatch" type="2d" file="hatching.png"/>',
        '<texture name="t_belt" type="2d" file="belt.png"/>',
    ]
    mat += [
        '<material name="hatch" texture="t_hatch" texrepeat="2 2" texuniform="true"/>',
        '<material name="belt" texture="t_belt" texrepeat="4 4" texuniform="true"/>',
    ]
    ring = [(0.14 * np.cos(a), 0.14 * np.sin(a), 0.0) for a in np.linspace(0, 2 * np.pi, 16, endpoint=False)]
    cone = _v(*np.ravel([*ring, (0.0, 0.0, 0.5)]))
    band = [(0.08 * np.cos(a), 0.08 * np.sin(a), z) for z in (0.21, 0.32) for a in np.linspace(0, 2 * np.pi, 16, False)]
    mesh = [f'<mesh name="cone" vertex="{cone}"/>', f'<mesh name="cone_band" vertex="{_v(*np.ravel(band))}"/>']
    return "<asset>" + "".join(tex + mat + mesh) + "</asset>"


def _rack() -> list[str]:
    out = []
    ux = (-1.23, -0.615, 0.0, 0.615, 1.23)
    for i, x in enumerate(ux):
        for j, y in enumerate((0.02, 0.53)):
            out.append(_geom(f"rack_upright_{i}_{j}", (0.03, 0.03, 0.84), (x, y, 0.84), (0.1, 0.25, 0.65, 1)))
    for k, z in enumerate(DECK_Z.values()):
        for j, y in enumerate((0.02, 0.53)):
            out.append(_geom(f"rack_beam_{k}_{j}", (1.26, 0.025, 0.04), (0, y, z - 0.04), (0.95, 0.45, 0.05, 1)))
        out.append(_geom(f"rack_deck_{k}", (1.23, 0.27, 0.008), (0, 0.275, z - 0.008), (0.55, 0.55, 0.55, 1)))
    # A thin tie at the top of the frames, no deck: the top level is the highest deck.
    out.append(_geom("rack_tie", (1.26, 0.02, 0.02), (0, 0.02, 1.66), (0.1, 0.25, 0.65, 1)))
    return out


def _floor_and_walls() -> list[str]:
    out = [
        '<geom name="floor" type="plane" size="8 8 0.1" material="floor_0"/>',
        _geom("wall_back", (4.0, 0.1, 2.0), (0, 1.8, 2.0), material="wall_0"),
        _geom("wall_left", (0.1, 4.0, 2.0), (-3.6, -1.0, 2.0), material="wall_0"),
        _geom("wall_right", (0.1, 4.0, 2.0), (3.6, -1.0, 2.0), material="wall_0"),
        _geom("wall_band", (3.95, 0.02, 0.15), (0, 1.69, 0.15), material="hatch"),
        _geom("door", (0.02, 0.6, 1.1), (-3.49, -0.4, 1.1), (0.35, 0.4, 0.45, 1)),
    ]
    for i, y in enumerate(AISLE_Y):  # yellow aisle lines
        out.append(_geom(f"aisle_line_{i}", (3.0, 0.05, 0.002), (0.1, y, 0.002), (0.95, 0.8, 0.05, 1)))
    for i, x in enumerate(AISLE_X):  # hatched aisle ends
        out.append(_geom(f"aisle_hatch_{i}", (0.25, 0.5, 0.002), (x, sum(AISLE_Y) / 2, 0.002), material="hatch"))
    # Rail and its end stops in front of the racking.
    out.append(_geom("rail", (1.7, 0.12, 0.03), (0.5, RAIL_Y, 0.03), (0.3, 0.3, 0.32, 1)))
    out.append(_geom("rail_edge", (1.7, 0.125, 0.005), (0.5, RAIL_Y, 0.062), (0.95, 0.8, 0.05, 1)))
    return out


def _conveyor() -> list[str]:
    length = CONVEYOR_END_Y + 0.25
    cy = CONVEYOR_END_Y - length / 2
    out = [
        _geom("conv_belt", (0.28, length / 2, 0.02), (CONVEYOR_X, cy, CONVEYOR_Z - 0.02), material="belt"),
        _geom("conv_side_l", (0.02, length / 2, 0.05), (CONVEYOR_X - 0.3, cy, CONVEYOR_Z - 0.01), (0.7, 0.7, 0.72, 1)),
        _geom("conv_side_r", (0.02, length / 2, 0.05), (CONVEYOR_X + 0.3, cy, CONVEYOR_Z - 0.01), (0.7, 0.7, 0.72, 1)),
        _geom("conv_opening", (0.4, 0.02, 0.35), (CONVEYOR_X, 1.69, CONVEYOR_Z + 0.25), (0.05, 0.05, 0.05, 1)),
    ]
    for i, y in enumerate(np.linspace(cy - length / 2 + 0.1, cy + length / 2 - 0.1, 4)):
        for s in (-1, 1):
            leg = (0.025, 0.025, (CONVEYOR_Z - 0.05) / 2)
            out.append(_geom(f"conv_leg_{i}_{s}", leg, (CONVEYOR_X + s * 0.28, y, leg[2]), (0.4, 0.4, 0.42, 1)))
    return out


def _item(i: int) -> str:
    bx, by, bz = HALF["box"]
    tx, ty, tz = HALF["tote"]
    geoms = [
        _geom(f"item{i}_box", HALF["box"], rgba=(0.8, 0.1, 0.1, 1)),
        _geom(f"item{i}_tape", (0.03, by + 0.001, 0.002), (0, 0, bz), (0.85, 0.78, 0.6, 1)),
        _geom(f"item{i}_plate", _PLATE, (0, -by - _PLATE[1], 0.0), material="label_A"),
        _geom(f"item{i}_tote_bottom", (tx, ty, 0.01), (0, 0, -tz + 0.01), (0.1, 0.25, 0.8, 1)),
    ]
    for name, size, pos in (
        ("front", (tx, 0.01, tz), (0, -ty + 0.01, 0)),
        ("back", (tx, 0.01, tz), (0, ty - 0.01, 0)),
        ("left", (0.01, ty, tz), (-tx + 0.01, 0, 0)),
        ("right", (0.01, ty, tz), (tx - 0.01, 0, 0)),
    ):
        geoms.append(_geom(f"item{i}_tote_{name}", size, pos, (0.1, 0.25, 0.8, 1)))
    return f'<body name="item{i}" mocap="true" pos="{i} 5 -3">' + "".join(geoms) + "</body>"


def _cone(i: int) -> str:
    geoms = [
        _geom(f"cone{i}_base", (0.17, 0.17, 0.015), (0, 0, 0.015), (0.15, 0.15, 0.15, 1)),
        f'<geom name="cone{i}_body" type="mesh" mesh="cone" pos="0 0 0.02" rgba="1 0.35 0.02 1"/>',
        f'<geom name="cone{i}_band" type="mesh" mesh="cone_band" pos="0 0 0.02" rgba="0.95 0.95 0.95 1"/>',
    ]
    return f'<body name="cone{i}" mocap="true" pos="{i} 6 -3">' + "".join(geoms) + "</body>"


def _pallet(i: int) -> str:
    wood = (0.62, 0.47, 0.3, 1)
    geoms = [
        _geom(f"pallet{i}_top{k}", (0.05, 0.4, 0.011), (x, 0, 0.133), wood)
        for k, x in enumerate(np.linspace(-0.55, 0.55, 6))
    ]
    geoms += [
        _geom(f"pallet{i}_block{k}", (0.6, 0.05, 0.05), (0, y, 0.072), wood) for k, y in enumerate((-0.35, 0, 0.35))
    ]
    geoms += [
        _geom(f"pallet{i}_bottom{k}", (0.6, 0.05, 0.011), (0, y, 0.011), wood) for k, y in enumerate((-0.35, 0, 0.35))
    ]
    return f'<body name="pallet{i}" mocap="true" pos="{i} 7 -3">' + "".join(geoms) + "</body>"


def _props() -> list[str]:
    """Background clutter the seed moves around: barrels, a stack of pallets, a bin."""
    barrel = '<geom name="prop{i}_g" type="cylinder" size="0.28 0.45" pos="0 0 0.45" rgba="0.1 0.3 0.7 1"/>'
    stack = "".join(
        _geom(f"prop1_s{k}", (0.6, 0.4, 0.07), (0, 0, 0.07 + 0.15 * k), (0.6, 0.46, 0.3, 1)) for k in range(4)
    )
    bins = _geom("prop3_g", (0.3, 0.25, 0.3), (0, 0, 0.3), (0.25, 0.45, 0.3, 1))
    bodies = [barrel.format(i=0), stack, bins.replace("prop3", "prop2"), bins]
    return [f'<body name="prop{i}" mocap="true" pos="{i} 8 -3">{g}</body>' for i, g in enumerate(bodies)]


def _panda() -> tuple[str, str]:
    """The reduced Panda asset: its <asset> children and its base body, mounted on a pedestal that rides the rail."""
    root = ET.parse(ASSETS / "panda.xml").getroot()
    assets = "".join(ET.tostring(e, encoding="unicode") for e in root.find("asset"))
    base = "".join(ET.tostring(e, encoding="unicode") for e in root.find("worldbody"))
    carriage = (
        f'<body name="carriage" pos="0 {RAIL_Y} 0"><joint name="rail" type="slide" axis="1 0 0" range="-3 3"/>'
        '<inertial pos="0 0 0.3" mass="20" diaginertia="1 1 1"/>'
        + _geom(
            "pedestal",
            (0.11, 0.11, (PEDESTAL_Z - 0.08) / 2),
            (0, 0, 0.08 + (PEDESTAL_Z - 0.08) / 2),
            (0.2, 0.2, 0.22, 1),
        )
        + _geom("sled", (0.2, 0.17, 0.02), (0, 0, 0.08), (0.95, 0.8, 0.05, 1))
        + f'<body name="mount" pos="0 0 {PEDESTAL_Z}" quat="0.7071068 0 0 0.7071068">{base}</body></body>'
    )
    return assets, carriage


def build_xml() -> str:
    """The complete scene MJCF as a string (textures come from :func:`textures.all_textures`)."""
    panda_assets, carriage = _panda()
    assets = _assets().replace("</asset>", panda_assets + "</asset>")
    cam = look_at((-0.7, -4.5, 2.9), (0.4, -0.1, 0.55))
    world = [
        f'<camera name="cam" pos="{_v(*cam[0])}" quat="{_v(*cam[1])}" fovy="42"/>',
        '<light name="key" pos="-1 -2 4.5" dir="0.2 0.4 -1" directional="true" diffuse="0.6 0.6 0.58"/>',
        '<light name="fill" pos="2 -3 3.5" dir="-0.3 0.5 -0.8" diffuse="0.3 0.3 0.32"/>',
        '<light name="rack" pos="0 -1.2 3.2" dir="0 0.3 -1" diffuse="0.25 0.25 0.25" cutoff="60"/>',
        *_floor_and_walls(),
        *_rack(),
        *_conveyor(),
        carriage,
        *(_item(i) for i in range(N_ITEMS)),
        *(_cone(i) for i in range(N_CONES)),
        *(_pallet(i) for i in range(N_PALLETS)),
        *_props(),
    ]
    return (
        '<mujoco model="warehouse_cell"><compiler angle="radian" inertiafromgeom="false"/>'
        '<option gravity="0 0 0"/>'
        '<visual><global offwidth="1280" offheight="960"/><quality shadowsize="0" offsamples="0"/>'
        '<headlight ambient="0.35 0.35 0.35" diffuse="0.2 0.2 0.2" specular="0 0 0"/>'
        "</visual>"
        f"{assets}<worldbody>{''.join(world)}</worldbody></mujoco>"
    )


def look_at(eye: tuple, target: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Camera position and quaternion looking from ``eye`` at ``target`` with z up (MuJoCo cameras look along -z)."""
    eye, target = np.asarray(eye, float), np.asarray(target, float)
    back = eye - target
    back /= np.linalg.norm(back)
    right = np.cross((0.0, 0.0, 1.0), back)
    right /= np.linalg.norm(right)
    up = np.cross(back, right)
    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, np.column_stack([right, up, back]).ravel())
    return eye, quat


def compile_model() -> mujoco.MjModel:
    """Compile the scene once; vary it afterwards through :class:`~.cell.Cell` (no recompilation)."""
    return mujoco.MjModel.from_xml_string(build_xml(), textures.all_textures())
