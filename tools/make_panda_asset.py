"""One-off: build the reduced Franka Panda asset of the warehouse cell from the robosuite wheel (provenance record).

Needs network access and two tools that are not dependencies of atp_ros::

    pip download robosuite==1.5.2 --no-deps -d /tmp/robosuite
    pip install --target /tmp/fastsimp fast-simplification
    PYTHONPATH=/tmp/fastsimp python tools/make_panda_asset.py /tmp/robosuite/robosuite-1.5.2-py3-none-any.whl

What it does: unpacks robosuite's Panda arm (``robots/panda/robot.xml``) and hand (``grippers/panda_gripper.xml``),
mounts the hand on the arm as robosuite does, compiles that with MuJoCo, merges the visual meshes of each body by
color, reduces them with fast-simplification to about ``--triangles`` triangles in all, and writes one
self-contained MJCF (meshes inline as ``vertex``/``face``; no collision geoms, no actuators) to
``atp_ros/atp_ros/warehouse/cell/assets/panda.xml``. Every name is prefixed ``panda_``.
"""

from __future__ import annotations

import argparse
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import fast_simplification
import mujoco
import numpy as np

_OUT = Path(__file__).resolve().parents[1] / "atp_ros/atp_ros/warehouse/cell/assets/panda.xml"
_PREFIX = "robosuite/models/assets/"


def _combined_xml(root: Path) -> str:
    """The arm with the hand mounted in ``right_hand``, mesh files as absolute paths."""
    arm = ET.parse(root / "robots/panda/robot.xml").getroot()
    hand = ET.parse(root / "grippers/panda_gripper.xml").getroot()
    for tree, base in ((arm, root / "robots/panda"), (hand, root / "grippers")):
        for mesh in tree.iter("mesh"):
            mesh.set("file", str(base / mesh.get("file")))
        for tag in ("actuator", "sensor"):
            for node in tree.findall(tag):
                tree.remove(node)
    arm_assets = arm.find("asset")
    for node in hand.find("asset"):
        arm_assets.append(node)
    mount = next(b for b in arm.iter("body") if b.get("name") == "right_hand")
    for body in hand.find("worldbody"):
        mount.append(body)
    return ET.tostring(arm, encoding="unicode")


def _rgba(model: mujoco.MjModel, g: int) -> tuple[float, ...]:
    mat = model.geom_matid[g]
    rgba = model.mat_rgba[mat] if mat >= 0 else model.geom_rgba[g]
    return tuple(round(float(c), 3) for c in rgba)


def _body_meshes(model: mujoco.MjModel) -> dict[tuple[int, tuple[float, ...]], tuple[np.ndarray, np.ndarray]]:
    """Visual mesh geoms merged per (body, color), vertices in the body frame."""
    merged: dict[tuple[int, tuple[float, ...]], list[tuple[np.ndarray, np.ndarray]]] = {}
    for g in range(model.ngeom):
        if model.geom_type[g] != mujoco.mjtGeom.mjGEOM_MESH or model.geom_group[g] != 1:
            continue
        m = model.geom_dataid[g]
        va, vn = model.mesh_vertadr[m], model.mesh_vertnum[m]
        fa, fn = model.mesh_faceadr[m], model.mesh_facenum[m]
        rot = np.zeros(9)
        mujoco.mju_quat2Mat(rot, model.geom_quat[g])
        verts = model.mesh_vert[va : va + vn] @ rot.reshape(3, 3).T + model.geom_pos[g]
        merged.setdefault((int(model.geom_bodyid[g]), _rgba(model, g)), []).append(
            (verts, model.mesh_face[fa : fa + fn])
        )
    out = {}
    for key, parts in merged.items():
        verts, faces, offset = [], [], 0
        for v, f in parts:
            verts.append(v)
            faces.append(f + offset)
            offset += len(v)
        out[key] = _weld(np.concatenate(verts), np.concatenate(faces))
    return out


def _weld(verts: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge coincident vertices (MuJoCo splits them per normal) so the simplifier sees connected surfaces."""
    unique, inverse = np.unique(np.round(verts, 5), axis=0, return_inverse=True)
    faces = inverse.reshape(-1)[faces]
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    return unique, faces


def _fmt(values: np.ndarray, digits: int) -> str:
    return " ".join(f"{x:.{digits}f}".rstrip("0").rstrip(".") if digits else str(int(x)) for x in values.ravel())


def _write(model: mujoco.MjModel, meshes: dict, triangles: int, out: Path) -> int:
    total = sum(len(f) for _, f in meshes.values())
    keep = min(1.0, triangles / total)
    asset, bodies, written = ET.Element("asset"), {}, 0
    for (body, rgba), (verts, faces) in sorted(meshes.items()):
        if keep < 1.0 and len(faces) > 64:
            verts, faces = fast_simplification.simplify(verts.astype(np.float32), faces.astype(np.int32), 1 - keep)
        name = f"panda_m{len(asset)}"
        ET.SubElement(asset, "mesh", name=name, vertex=_fmt(verts, 4), face=_fmt(faces, 0))
        bodies.setdefault(body, []).append((name, rgba))
        written += len(faces)
    world = ET.Element("worldbody")
    elements = {0: world}
    for b in range(1, model.nbody):
        parent = elements[int(model.body_parentid[b])]
        name = "panda_" + mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_BODY, b)
        body = ET.SubElement(
            parent, "body", name=name, pos=_fmt(model.body_pos[b], 5), quat=_fmt(model.body_quat[b], 6)
        )
        mass = max(float(model.body_mass[b]), 0.01)
        inertia = np.maximum(model.body_inertia[b], 1e-4)
        ET.SubElement(
            body, "inertial", pos=_fmt(model.body_ipos[b], 4), mass=f"{mass:.3f}", diaginertia=_fmt(inertia, 4)
        )
        for j in range(model.body_jntadr[b], model.body_jntadr[b] + model.body_jntnum[b]):
            kind = "slide" if model.jnt_type[j] == mujoco.mjtJoint.mjJNT_SLIDE else "hinge"
            jname = "panda_" + mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_JOINT, j)
            ET.SubElement(body, "joint", name=jname, type=kind, axis=_fmt(model.jnt_axis[j], 4),
                          range=_fmt(model.jnt_range[j], 4), limited="true")  # fmt: skip
        for mesh, rgba in bodies.get(b, []):
            ET.SubElement(body, "geom", type="mesh", mesh=mesh, rgba=_fmt(np.array(rgba), 3), contype="0",
                          conaffinity="0", group="1", mass="0")  # fmt: skip
        elements[b] = body
    root = ET.Element("mujoco", model="panda")
    root.append(asset)
    root.append(world)
    ET.indent(root)
    out.write_text(ET.tostring(root, encoding="unicode") + "\n")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="robosuite-1.5.2-py3-none-any.whl")
    parser.add_argument("--triangles", type=int, default=25_000)
    parser.add_argument("--out", type=Path, default=_OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(args.wheel) as wheel:
        parts = ("robots/panda/", "grippers/panda_gripper.xml", "grippers/meshes/panda_gripper/")
        wanted = [n for n in wheel.namelist() if n.startswith(tuple(_PREFIX + p for p in parts))]
        wheel.extractall(tmp, members=wanted)
        model = mujoco.MjModel.from_xml_string(_combined_xml(Path(tmp) / _PREFIX))
    meshes = _body_meshes(model)
    before = sum(len(f) for _, f in meshes.values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    after = _write(model, meshes, args.triangles, args.out)
    print(f"{args.out}: {before} -> {after} triangles, {args.out.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
