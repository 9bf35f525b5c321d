"""The cell loop without ROS: the camera model against the MuJoCo render, the simulator following trajectories,
grasping and releasing, and the planner's reading of tasks and answers, 3D evidence and IK plan."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("atp_ros.warehouse.cell.scene")  # sets MUJOCO_GL (egl) before MuJoCo loads

from atp_ros.cell_loop import camera, picking
from atp_ros.cell_loop.sim import JOINT_NAMES, CellSim
from atp_ros.warehouse.cell import arm, scene
from atp_ros.warehouse.cell.questions import candidates


@pytest.fixture(scope="module")
def sim():
    s = CellSim(320, 240, seed=3)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def arm_model():
    return picking.ArmModel()


def run_plan(sim: CellSim, plan: list[picking.Move]) -> None:
    """Execute a plan in the simulator the way the planner node does over ROS (no confirmation here)."""
    for move in plan:
        if move.what == "move":
            assert (
                sim.command_trajectory(picking.JOINTS, picking.timed_points(sim.command_state(), move.positions))
                is None
            )
            while sim.trajectory is not None:
                sim.step(0.05)
        elif move.what == "gripper":
            assert sim.command_gripper(move.opening) is None
            for _ in range(20):
                sim.step(0.05)


def test_rail_origin_matches_the_scene() -> None:
    assert camera.RAIL_ORIGIN[1] == scene.RAIL_Y


def test_quaternion_round_trip_and_bad_orientation() -> None:
    rot = camera.look_at_optical((1.0, -3.0, 2.0), (0.0, 0.5, 0.5))
    np.testing.assert_allclose(camera.matrix_from_quat(camera.quat_from_matrix(rot)), rot, atol=1e-9)
    with pytest.raises(ValueError, match=r"camera\.orientation"):
        camera.matrix_from_quat([0, 0, 0, 0])


def test_camera_model_agrees_with_the_render(sim) -> None:
    """Every visible shelf item's center projects inside its segmentation box, and the depth image at the box
    back-projects to its front face (a few cm), so relevant_box + depth gives the item in the base frame."""
    truth = sim.truth()
    depth = sim.depth()
    assert depth.shape == (240, 320) and depth.dtype == np.float32
    checked = 0
    for obj, thing in zip(truth.objects, sim.world.things, strict=True):
        if obj.box is None or thing.kind not in ("box", "tote") or obj.visible_fraction < 0.8:
            continue
        center = thing.pos - camera.RAIL_ORIGIN
        u, v = sim.camera.project(center)[0]
        x0, y0, x1, y1 = obj.box
        assert x0 <= u <= x1 and y0 <= v <= y1
        point = picking.evidence_point(sim.camera, obj.box, depth)
        assert np.linalg.norm(point - center) < 0.2
        assert picking.nearest_slot(point, thing.kind)[:2] == (thing.level, thing.slot)
        without_depth = picking.evidence_point(sim.camera, obj.box)  # the shelves' front plane instead
        assert picking.nearest_slot(without_depth, thing.kind)[:2] == (thing.level, thing.slot)
        checked += 1
    assert checked >= 3
    assert picking.evidence_point(sim.camera, (0, 0, 0, 0), depth) is None


def test_task_and_answer_parsing() -> None:
    task = picking.Task.parse("Bring the Red box to the conveyor.")
    assert (task.color, task.kind) == ("red", "box") and picking.Task.parse(task.text()) == task
    for bad in ("", "bring the pink box to the conveyor", "bring the red box to the shelf"):
        with pytest.raises(picking.TaskError, match="cannot parse task"):
            picking.Task.parse(bad)
    assert picking.parse_where("top-two") == ("top", "two") == picking.parse_where("top 2")
    assert picking.parse_where("bottom four.") == ("bottom", "four")
    assert picking.parse_where("") is None and picking.parse_where("top") is None
    assert picking.parse_where("top middle two") is None
    assert picking.parse_holding("red") == "red" and picking.parse_holding("nothing") == "nothing"
    assert picking.parse_holding("red blue") is None and picking.parse_holding("") is None


def test_trajectory_refusals_leave_the_arm_alone(sim) -> None:
    before = sim.joint_positions()
    assert "unknown joint names" in sim.command_trajectory(["elbow"], [(1.0, [0.0])])
    assert "not after" in sim.command_trajectory(["rail"], [(1.0, [0.5]), (0.5, [0.6])])
    assert "outside" in sim.command_trajectory(["rail"], [(1.0, [9.0])])
    assert "positions for" in sim.command_trajectory(["rail", "panda_joint1"], [(1.0, [0.5])])
    assert "outside" in sim.command_trajectory(["rail"], [(1.0, [float("nan")])])
    assert "gripper opening" in sim.command_gripper(0.5)
    sim.step(0.1)
    assert sim.joint_positions() == before and len(JOINT_NAMES) == len(before)


def test_a_planned_pick_delivers_the_item_to_the_conveyor(sim, arm_model) -> None:
    """The planner's IK plan for the slot a `where` question names, executed in the simulator: the item is
    grasped, follows the gripper and lands on the conveyor; a grasp at an empty slot closes on nothing."""
    sim.reset(3)
    (slots, answer, _), *_ = candidates(sim.truth(), "where")
    target = next(t for t in sim.world.things if (t.color, t.kind) == (slots["color"], slots["object_kind"]))
    level, slot = picking.parse_where(answer)
    plan = arm_model.pick_to_conveyor(level, slot, target.kind)
    assert [m.label for m in plan][:4] == ["open", "approach", "grasp", "close"]
    run_plan(sim, plan[:5])
    assert sim.world.holding is target and target.place == "gripper"
    run_plan(sim, plan[5:])
    assert sim.world.holding is None and target.place == "conveyor"
    kinds = [e.kind for e in sim.events]
    assert "grasped" in kinds and "released" in kinds and "trajectory_done" in kinds

    sim.reset(3)
    empty = next(
        (lv, sl)
        for lv in ("top", "middle", "bottom")
        for sl in ("one", "two", "three", "four")
        if sim.world.at(lv, sl) is None
    )
    run_plan(sim, arm_model.pick_to_conveyor(*empty, "box")[:5])
    assert sim.world.holding is None and sim.finger == 0.0
    assert any(e.kind == "closed_empty" for e in sim.events)


def test_every_slot_is_reachable(arm_model) -> None:
    for level in ("top", "middle", "bottom"):
        for slot in ("one", "two", "three", "four"):
            for kind in ("box", "tote"):
                plan = arm_model.pick_to_conveyor(level, slot, kind)
                assert sum(m.what == "move" for m in plan) == 6


def test_ik_failure_names_the_pose(arm_model) -> None:
    with pytest.raises(picking.IkFailure, match="far: no IK solution"):
        arm_model.solve(np.array([0.0, 3.0, 3.0]), 0.0, label="far")
    assert arm.OPEN > arm.CLOSED


def test_process_command_lines() -> None:
    pytest.importorskip("ament_index_python")
    from atp_ros.cell_loop import processes

    cmd = processes.command("cell_sim", "/ns", {"camera.position": [0, 1.5, 2], "publish_depth": False, "task": ""})
    assert cmd[0].endswith("/lib/atp_ros/cell_sim") and cmd[1:4] == ["--ros-args", "-r", "__ns:=/ns"]
    assert cmd[4:] == ["-p", "camera.position:=[0.0, 1.5, 2.0]", "-p", "publish_depth:=false"]
