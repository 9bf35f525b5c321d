"""``pick_planner``: an integrator's pick planner that acts on the perception node's answers.

Given "bring the red box to the conveyor" it asks the node through its ``~/ask`` action "where is the red box?",
turns the answer (the slot it names) and its ``relevant_box`` (with the depth image at the answer's stamp) into a
3D target in the robot base frame with the camera model, solves IK, sends ``JointTrajectory`` and gripper commands,
confirms the grasp with a standing question ("what is the gripper holding?" on ``~/query``, read from ``~/answer``)
and reports success or the cause it gave up (:data:`.picking.CAUSES`) on ``~/result`` (std_msgs/String, JSON).

It uses only the perception node's public interface and the robot's topics: ``camera/camera_info``,
``camera/depth/image_raw``, ``joint_states`` in; ``arm/joint_trajectory``, ``gripper/command`` out. Tasks come from
the ``task`` parameter (run once at start) and the ``~/task`` topic (std_msgs/String).
"""

from __future__ import annotations

import collections
import json
import math
import queue
import sys
import threading
import time
from typing import Any

import numpy as np
import rclpy
from builtin_interfaces.msg import Duration
from rclpy.action import ActionClient
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image, JointState
from std_msgs.msg import Float64, String
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from atp_ros.cell_loop import picking
from atp_ros.cell_loop.camera import BASE_FRAME, PinholeCamera, nominal_pose
from atp_ros.cell_loop.picking import HOLDING_QUESTION, WHERE_QUESTION, ArmModel, IkFailure, Task, TaskError
from atp_ros.ros.callbacks import install_signal_handlers, shutdown, spin
from atp_ros.warehouse.cell import arm
from atp_ros_msgs.action import Ask
from atp_ros_msgs.msg import VlmAnswer

RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
RESULTS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
JOINT_TOLERANCE = 2e-3  # rad (and m on the rail) from a move's last point counts as arrived
DEPTH_MATCH_S = 0.5  # a depth frame this close to the answer's stamp is the answer's depth


class GaveUp(Exception):
    """A task ends without success; ``cause`` is one of :data:`picking.CAUSES`."""

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause


def _stamp(header: Any) -> float:
    return header.stamp.sec + header.stamp.nanosec * 1e-9


class PickPlanner(Node):
    """The planner node. :meth:`run_task` blocks (call it off the executor's thread); the node must be spun."""

    def __init__(self, context: Any = None, namespace: str | None = None, **overrides: Any) -> None:
        super().__init__("pick_planner", namespace=namespace, context=context)
        pos0, quat0 = nominal_pose()
        defaults = {
            "task": "",
            "vlm": "atp_vlm",  # the perception node's name (relative: the planner's namespace)
            "camera.position": pos0,
            "camera.orientation": quat0,
            "target_from": "answer",
            "use_depth": True,
            "confirm": True,
            "max_age_s": 1.0,
            "ask_timeout_s": 60.0,
            "confirm_timeout_s": 60.0,
            "move_timeout_s": 20.0,
            "speed_scale": 1.0,
        }
        values = {name: self.declare_parameter(name, overrides.get(name, d)).value for name, d in defaults.items()}
        self.vlm = str(values["vlm"])
        self.cam_position = list(values["camera.position"])
        self.cam_orientation = list(values["camera.orientation"])
        self.target_from = str(values["target_from"])
        if self.target_from not in ("answer", "relevant_box"):
            raise ValueError(f"target_from must be answer or relevant_box, not {self.target_from!r}")
        self.use_depth = bool(values["use_depth"])
        self.confirm = bool(values["confirm"])
        self.max_age_s = float(values["max_age_s"])
        self.ask_timeout_s = float(values["ask_timeout_s"])
        self.confirm_timeout_s = float(values["confirm_timeout_s"])
        self.move_timeout_s = float(values["move_timeout_s"])
        self.speed_scale = float(values["speed_scale"])
        if not (math.isfinite(self.speed_scale) and 0.05 <= self.speed_scale <= 20):
            raise ValueError(f"speed_scale must be within [0.05, 20], not {self.speed_scale}")
        PinholeCamera.from_fovy(2, 2, 40.0, self.cam_position, self.cam_orientation)  # checks the pose parameters
        self.startup_task = str(values["task"])
        self.arm_model = ArmModel()
        self._lock = threading.Condition()
        self._joints: dict[str, float] = {}
        self._joint_stamp = 0.0
        self._info: CameraInfo | None = None
        self._depths: collections.deque = collections.deque(maxlen=10)
        self._answers: collections.deque = collections.deque(maxlen=20)
        self.create_subscription(JointState, "joint_states", self._on_joints, RELIABLE)
        self.create_subscription(CameraInfo, "camera/camera_info", self._on_info, qos_profile_sensor_data)
        if self.use_depth:
            self.create_subscription(Image, "camera/depth/image_raw", self._on_depth, qos_profile_sensor_data)
        self.create_subscription(VlmAnswer, f"{self.vlm}/answer", self._on_answer, RELIABLE)
        self.pub_trajectory = self.create_publisher(JointTrajectory, "arm/joint_trajectory", RELIABLE)
        self.pub_gripper = self.create_publisher(Float64, "gripper/command", RELIABLE)
        self.pub_query = self.create_publisher(String, f"{self.vlm}/query", LATCHED)
        self.pub_result = self.create_publisher(String, "~/result", RESULTS)
        self.ask = ActionClient(self, Ask, f"{self.vlm}/ask")
        self.tasks: queue.Queue[str | None] = queue.Queue()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self.create_subscription(String, "~/task", lambda m: self.tasks.put(m.data), RELIABLE)

    # --- inputs -------------------------------------------------------------------------------------------------
    def _on_joints(self, msg: JointState) -> None:
        with self._lock:
            self._joints = dict(zip(msg.name, msg.position, strict=False))
            self._joint_stamp = time.monotonic()
            self._lock.notify_all()

    def _on_info(self, msg: CameraInfo) -> None:
        with self._lock:
            self._info = msg

    def _on_depth(self, msg: Image) -> None:
        if msg.encoding != "32FC1" or len(msg.data) != msg.height * msg.width * 4:
            return  # not a planar float depth image: used as if none came
        depth = np.frombuffer(bytes(msg.data), np.float32).reshape(msg.height, msg.width)
        with self._lock:
            self._depths.append((_stamp(msg.header), depth))

    def _on_answer(self, msg: VlmAnswer) -> None:
        with self._lock:
            self._answers.append(msg)
            self._lock.notify_all()

    def has_state(self) -> bool:
        """Whether joint states and camera info have arrived (what a task needs before it starts)."""
        with self._lock:
            return bool(self._joints) and self._info is not None

    def _wait(self, predicate, timeout: float, cause: str, what: str) -> Any:
        """Until ``predicate()`` (called under the lock) returns a truthy value; GaveUp(cause) after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                value = predicate()
                if value:
                    return value
                if self._stopping.is_set():
                    raise GaveUp(cause, f"the planner stopped while waiting for {what}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GaveUp(cause, f"timed out after {timeout:g} s waiting for {what}")
                self._lock.wait(min(left, 0.05))

    # --- the task -----------------------------------------------------------------------------------------------
    def run_task(self, text: str) -> dict:
        """Do one task; returns (and publishes on ``~/result``) what happened, with ``success`` and ``cause``."""
        start = time.monotonic()
        report: dict = {"task": text, "success": False, "cause": None, "message": "", "timings": {}}
        try:
            self._do(text, report)
            report["success"], report["message"] = True, "delivered to the conveyor"
        except GaveUp as err:
            report["cause"], report["message"] = err.cause, str(err)
        report["timings"]["total_s"] = round(time.monotonic() - start, 3)
        self.pub_result.publish(String(data=json.dumps(report)))
        # Two call sites: rclpy's logger refuses a second severity from one line (ValueError).
        if report["success"]:
            self.get_logger().info(f"task {text!r}: success: {report['message']}")
        else:
            self.get_logger().warning(f"task {text!r}: {report['cause']}: {report['message']}")
        return report

    def _do(self, text: str, report: dict) -> None:
        try:
            task = Task.parse(text)
        except TaskError as err:
            raise GaveUp("bad_task", str(err)) from None
        self._wait(lambda: self._joints and self._info, 30.0, "timeout", "joint states and camera info")
        answer = self._ask(WHERE_QUESTION.format(color=task.color, kind=task.kind), report)
        target = self._target(task, answer, report)
        try:
            plan = self.arm_model.pick_to_conveyor(*target, task.kind)
        except IkFailure as err:
            raise GaveUp("ik_failure", str(err)) from None
        self.execute(plan, task, report)

    def execute(self, plan: list[picking.Move], task: Task, report: dict) -> None:
        """Send a plan's moves and gripper commands and wait for each; the confirmation step asks the standing
        question (when ``confirm``). GaveUp with the cause when a step fails; ``report`` gets the motion time."""
        motion_start = time.monotonic()
        for move in plan:
            if move.what == "move":
                self._move(move.positions, move.label)
            elif move.what == "gripper":
                self._grip(move.opening, move.label)
            elif move.what == "confirm" and self.confirm:
                paused = time.monotonic()
                self._confirm(task, report)
                motion_start += time.monotonic() - paused
        report.setdefault("timings", {})["motion_s"] = round(time.monotonic() - motion_start, 3)

    def _ask(self, question: str, report: dict) -> VlmAnswer:
        """The answer of the ``~/ask`` action about the camera's latest frame; GaveUp(no_answer) without one."""
        if not self.ask.wait_for_server(timeout_sec=min(30.0, self.ask_timeout_s)):
            raise GaveUp("no_answer", f"no ~/ask action server at {self.vlm}")
        sent = time.monotonic()
        goal = self.ask.send_goal_async(Ask.Goal(question=question, max_age_s=self.max_age_s))
        handle = self._wait(lambda: goal.done() and goal.result(), self.ask_timeout_s, "no_answer", "the goal response")
        if not handle.accepted:
            raise GaveUp("no_answer", "the ~/ask goal was rejected")
        result = handle.get_result_async()
        try:
            self._wait(result.done, self.ask_timeout_s, "no_answer", f"the answer to {question!r}")
        except GaveUp:
            handle.cancel_goal_async()
            raise
        outcome = result.result().result
        report["timings"]["ask_s"] = round(time.monotonic() - sent, 3)
        if not outcome.success:
            raise GaveUp("no_answer", f"the node did not answer {question!r}: {outcome.message}")
        a = outcome.answer
        report["question"], report["answer"] = question, a.answer
        report["timings"]["inference_ms"] = round(float(a.inference_ms), 1)
        report["timings"]["latency_ms"] = round(float(a.latency_ms), 1)
        report["tokens"] = [int(a.visual_tokens_kept), int(a.visual_tokens_total)]
        report["relevant_box"] = [round(float(v), 1) for v in a.relevant_box]
        return a

    def _camera(self) -> PinholeCamera:
        info = self._info
        return PinholeCamera.from_k(info.width, info.height, info.k, self.cam_position, self.cam_orientation)

    def _depth_at(self, stamp: float) -> np.ndarray | None:
        with self._lock:
            near = [(abs(s - stamp), d) for s, d in self._depths]
        best = min(near, key=lambda x: x[0], default=None)
        return best[1] if best is not None and best[0] <= DEPTH_MATCH_S else None

    def _target(self, task: Task, answer: VlmAnswer, report: dict) -> tuple[str, str]:
        """The slot to pick from: the answer's (``target_from: answer``) or the relevant box's (``relevant_box``);
        both are reported, with the 3D evidence point in the base frame."""
        where = picking.parse_where(answer.answer)
        depth = self._depth_at(_stamp(answer.header)) if self.use_depth else None
        point = picking.evidence_point(self._camera(), answer.relevant_box, depth)
        evidence = None
        if point is not None:
            level, slot, dist = picking.nearest_slot(point, task.kind)
            report["evidence_point"] = [round(float(v), 3) for v in point]
            report["evidence_depth"] = depth is not None
            if dist <= picking.SLOT_RADIUS:
                evidence = (level, slot)
                report["evidence_slot"] = f"{level}-{slot}"
        report["answer_slot"] = f"{where[0]}-{where[1]}" if where else None
        if self.target_from == "relevant_box":
            if evidence is None:
                raise GaveUp(
                    "no_evidence", f"the relevant box {[float(v) for v in answer.relevant_box]} is not on the racking"
                )
            target = evidence
        else:
            if where is None:
                raise GaveUp("answer_not_understood", f"the answer {answer.answer!r} names no shelf slot")
            target = where
        report["target"] = f"{target[0]}-{target[1]}"
        report["target_point"] = [round(float(v), 3) for v in picking.item_center(*target, task.kind)]
        return target

    def _current(self) -> np.ndarray:
        with self._lock:
            return np.array([self._joints[j] for j in picking.JOINTS])

    def _move(self, goal: np.ndarray, label: str) -> None:
        points = picking.timed_points(self._current(), goal, self.speed_scale)
        msg = JointTrajectory(joint_names=list(picking.JOINTS))
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = BASE_FRAME
        for t, positions in points:
            sec = int(t)
            msg.points.append(
                JointTrajectoryPoint(
                    positions=positions, time_from_start=Duration(sec=sec, nanosec=int((t - sec) * 1e9))
                )
            )
        self.pub_trajectory.publish(msg)

        def arrived() -> bool:
            if not self._joints:
                return False
            return max(abs(self._joints[j] - g) for j, g in zip(picking.JOINTS, goal, strict=True)) < JOINT_TOLERANCE

        self._wait(arrived, points[-1][0] + self.move_timeout_s, "timeout", f"the arm to reach '{label}'")

    def _grip(self, opening: float, label: str) -> None:
        self.pub_gripper.publish(Float64(data=float(opening)))
        finger = "panda_finger_joint1"
        history: list[float] = []

        def settled() -> bool:
            value = self._joints.get(finger)
            if value is None:
                return False
            if abs(value - opening) < 1e-4:
                return True
            history.append(value)  # closing on an item: the fingers stop at its width and stay there
            stopped = len(history) >= 5 and max(history[-5:]) - min(history[-5:]) < 1e-6
            return opening < arm.CLOSED and value <= arm.CLOSED + 1e-4 and stopped

        self._wait(settled, 10.0 + self.move_timeout_s, "timeout", f"the gripper to '{label}'")

    def _confirm(self, task: Task, report: dict) -> None:
        """The standing question after the grasp: the first answer about a frame taken after it decides."""
        after = self.get_clock().now().nanoseconds * 1e-9
        sent = time.monotonic()
        self.pub_query.publish(String(data=HOLDING_QUESTION))

        def fresh() -> VlmAnswer | None:
            return next((a for a in self._answers if a.query == HOLDING_QUESTION and _stamp(a.header) >= after), None)

        answer = self._wait(fresh, self.confirm_timeout_s, "timeout", "an answer to the standing question")
        report["timings"]["confirm_s"] = round(time.monotonic() - sent, 3)
        report["confirm_answer"] = answer.answer
        held = picking.parse_holding(answer.answer)
        if held == "nothing":
            raise GaveUp("grasp_not_confirmed", f"the node says the gripper holds nothing ({answer.answer!r})")
        if held is None:
            raise GaveUp("grasp_not_confirmed", f"the answer {answer.answer!r} names neither a color nor nothing")
        if held != task.color:
            raise GaveUp(
                "wrong_box_grasped", f"the node says the gripper holds {answer.answer!r}, expected {task.color}"
            )

    def serve(self) -> None:
        """Run the startup task, then each task from ``~/task`` until :meth:`stop`."""
        if self.startup_task:
            self.run_task(self.startup_task)
        while True:
            text = self.tasks.get()
            if text is None:
                return
            self.run_task(text)

    def start(self) -> None:
        """Serve tasks on a worker thread (the executor keeps the callbacks going meanwhile)."""
        self._worker = threading.Thread(target=self.serve, name="pick_planner_tasks", daemon=True)
        self._worker.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """End the task in progress at its next wait and the worker; True when it ended within ``timeout``."""
        self._stopping.set()
        self.tasks.put(None)
        with self._lock:
            self._lock.notify_all()
        if self._worker is not None:
            self._worker.join(timeout)
            return not self._worker.is_alive()
        return True


def run(args: list[str] | None = None) -> int:
    """Init, plan tasks on a worker thread while spinning, until Ctrl-C / SIGTERM."""
    install_signal_handlers()  # before rclpy.init, which chains its handler to ours
    rclpy.init(args=args)
    node = None
    executor = SingleThreadedExecutor()
    try:
        try:
            node = PickPlanner()
        except ValueError as err:
            print(f"pick_planner: {err}", file=sys.stderr)
            return 1
        executor.add_node(node)
        node.start()
        spin(node, executor)  # a callback's error is logged and spinning goes on
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        # The vlm node's shutdown: later signals ignored, the worker joined before the node is destroyed
        # (destroying it under a worker still using it crashed the process now and then).
        shutdown(node, executor)
    return 0


def main(args: list[str] | None = None) -> None:
    """Entry point of ``pick_planner``."""
    sys.exit(run(args))


if __name__ == "__main__":
    main()
