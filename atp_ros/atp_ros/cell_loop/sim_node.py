"""``cell_sim``: the warehouse cell (:class:`.sim.CellSim`) as a ROS 2 node: camera, depth, joint states and ground
truth out; joint trajectories and gripper commands in, executed at real time (``time_scale`` 1) or faster.

| kind | name | type | QoS |
| --- | --- | --- | --- |
| pub | ``camera/image_raw`` | sensor_msgs/Image rgb8 | sensor data |
| pub | ``camera/camera_info`` | sensor_msgs/CameraInfo | sensor data |
| pub | ``camera/depth/image_raw`` | sensor_msgs/Image 32FC1, planar meters (``publish_depth``) | sensor data |
| pub | ``joint_states`` | sensor_msgs/JointState (rail, 7 arm joints, 2 fingers) | reliable, 10 |
| pub | ``~/truth`` | std_msgs/String, JSON: world state + frame truth (for evaluation) | reliable, latched |
| pub | ``~/events`` | std_msgs/String, JSON: grasped, released, trajectory_done / _rejected, reset | reliable, 50 |
| sub | ``arm/joint_trajectory`` | trajectory_msgs/JointTrajectory (``rail``, ``panda_joint1..7``) | reliable, 10 |
| sub | ``gripper/command`` | std_msgs/Float64: finger opening, m (0 .. 0.04) | reliable, 10 |

Parameters: ``seed`` (changing it at run time starts a new episode), ``width``, ``height``, ``camera.fovy``,
``camera.position``, ``camera.orientation`` (the optical frame in ``rail``), ``camera_rate``, ``publish_depth``,
``truth_rate``, ``time_scale``, ``physics_rate``.
"""

from __future__ import annotations

import json
import math
import sys
import time

import rclpy
from rcl_interfaces.msg import SetParametersResult
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image, JointState
from std_msgs.msg import Float64, String
from trajectory_msgs.msg import JointTrajectory

from atp_ros.cell_loop.camera import BASE_FRAME, NOMINAL_FOVY, OPTICAL_FRAME, nominal_pose
from atp_ros.cell_loop.sim import JOINT_NAMES, CellSim
from atp_ros.ros.callbacks import install_signal_handlers, shutdown, spin

RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
MAX_STEP = 0.1  # wall seconds per physics tick at most (a stalled process does not teleport the arm)


def stamp_of(header) -> float:
    return header.stamp.sec + header.stamp.nanosec * 1e-9


class CellSimNode(Node):
    """The simulator node; all work happens on its timers (one thread)."""

    def __init__(self) -> None:
        super().__init__("cell_sim")
        pos0, quat0 = nominal_pose()
        p = self.declare_parameter
        self.seed = int(p("seed", 0).value)
        width, height = int(p("width", 640).value), int(p("height", 480).value)
        fovy = float(p("camera.fovy", NOMINAL_FOVY).value)
        position = list(p("camera.position", pos0).value)
        orientation = list(p("camera.orientation", quat0).value)
        self.camera_rate = float(p("camera_rate", 5.0).value)
        self.publish_depth = bool(p("publish_depth", True).value)
        self.truth_rate = float(p("truth_rate", 1.0).value)
        self.time_scale = float(p("time_scale", 1.0).value)
        physics_rate = float(p("physics_rate", 50.0).value)
        for name, value in (
            ("camera_rate", self.camera_rate),
            ("truth_rate", self.truth_rate),
            ("time_scale", self.time_scale),
            ("physics_rate", physics_rate),
        ):
            if not (math.isfinite(value) and 0.0 < value <= 1000.0):
                raise ValueError(f"{name} must be within (0, 1000], not {value}")
        if len(position) != 3:
            raise ValueError(f"camera.position must be [x, y, z] in {BASE_FRAME}, not {position}")
        self.sim = CellSim(width, height, fovy, position, orientation, self.seed)
        self.pub_image = self.create_publisher(Image, "camera/image_raw", qos_profile_sensor_data)
        self.pub_info = self.create_publisher(CameraInfo, "camera/camera_info", qos_profile_sensor_data)
        self.pub_depth = self.create_publisher(Image, "camera/depth/image_raw", qos_profile_sensor_data)
        self.pub_joints = self.create_publisher(JointState, "joint_states", RELIABLE)
        self.pub_truth = self.create_publisher(String, "~/truth", LATCHED)
        self.pub_events = self.create_publisher(
            String, "~/events", QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        )
        self.create_subscription(JointTrajectory, "arm/joint_trajectory", self._on_trajectory, RELIABLE)
        self.create_subscription(Float64, "gripper/command", self._on_gripper, RELIABLE)
        self.add_on_set_parameters_callback(self._on_parameters)
        self._pending_seed: int | None = None
        self._last = time.monotonic()
        self.create_timer(1.0 / physics_rate, self._physics)
        self.create_timer(1.0 / self.camera_rate, self._camera)
        self.create_timer(1.0 / self.truth_rate, self._publish_truth)
        self._publish_truth()
        self.get_logger().info(
            f"cell_sim: seed {self.seed}, camera {width}x{height} at {self.camera_rate:g} Hz"
            f"{' + depth' if self.publish_depth else ''}, time scale {self.time_scale:g}"
        )

    # --- inputs -------------------------------------------------------------------------------------------------
    def _on_parameters(self, params) -> SetParametersResult:
        for param in params:
            if param.name != "seed":
                return SetParametersResult(successful=False, reason=f"{param.name} is read at start only")
            if not isinstance(param.value, int):
                return SetParametersResult(successful=False, reason="seed must be an integer")
        for param in params:
            self._pending_seed = int(param.value)  # applied on the next physics tick (on the timer's thread)
        return SetParametersResult(successful=True)

    def _on_trajectory(self, msg: JointTrajectory) -> None:
        points = [(p.time_from_start.sec + p.time_from_start.nanosec * 1e-9, list(p.positions)) for p in msg.points]
        ident = f"{msg.header.stamp.sec}.{msg.header.stamp.nanosec:09d}"
        reason = self.sim.command_trajectory(list(msg.joint_names), points, ident)
        if reason:
            self.get_logger().warning(f"trajectory {ident} refused: {reason}")
        self._flush_events()

    def _on_gripper(self, msg: Float64) -> None:
        reason = self.sim.command_gripper(float(msg.data))
        if reason:
            self.get_logger().warning(f"gripper command refused: {reason}")

    # --- timers -------------------------------------------------------------------------------------------------
    def _physics(self) -> None:
        now = time.monotonic()
        dt, self._last = min(MAX_STEP, now - self._last) * self.time_scale, now
        if self._pending_seed is not None:
            self.seed, self._pending_seed = self._pending_seed, None
            self.sim.reset(self.seed)
        self.sim.step(dt)
        msg = JointState()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = BASE_FRAME
        msg.name = list(JOINT_NAMES)
        msg.position = self.sim.joint_positions()
        self.pub_joints.publish(msg)
        if self._flush_events():
            self._publish_truth()  # the world changed: evaluators see it at once

    def _flush_events(self) -> bool:
        events, self.sim.events = self.sim.events, []
        for e in events:
            self.pub_events.publish(String(data=json.dumps({"event": e.kind, **e.detail})))
            if e.kind in ("grasped", "released", "reset"):
                self.get_logger().info(f"{e.kind} {e.detail}")
        return any(e.kind in ("grasped", "released", "reset") for e in events)

    def _camera(self) -> None:
        stamp = self.get_clock().now().to_msg()
        cam = self.sim.camera
        rgb = self.sim.rgb()
        image = Image(height=cam.height, width=cam.width, encoding="rgb8", is_bigendian=0, step=cam.width * 3)
        image.header.stamp, image.header.frame_id = stamp, OPTICAL_FRAME
        image.data = rgb.tobytes()
        info = CameraInfo(height=cam.height, width=cam.width, distortion_model="plumb_bob")
        info.header = image.header
        info.d, info.k, info.p = [0.0] * 5, cam.k(), cam.p()
        info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        self.pub_image.publish(image)
        self.pub_info.publish(info)
        if self.publish_depth:
            depth = self.sim.depth()
            msg = Image(height=cam.height, width=cam.width, encoding="32FC1", is_bigendian=0, step=cam.width * 4)
            msg.header = image.header
            msg.data = depth.tobytes()
            self.pub_depth.publish(msg)

    def _publish_truth(self) -> None:
        stamp = self.get_clock().now()
        body = {"stamp": stamp.nanoseconds * 1e-9, "state": self.sim.state(), "frame": self.sim.truth().to_json()}
        self.pub_truth.publish(String(data=json.dumps(body)))


def run(args: list[str] | None = None) -> int:
    """Init, spin until Ctrl-C / SIGTERM, clean up; 1 with one line when the parameters are invalid."""
    install_signal_handlers()  # before rclpy.init, which chains its handler to ours
    rclpy.init(args=args)
    node = None
    executor = SingleThreadedExecutor()
    try:
        try:
            node = CellSimNode()
        except ValueError as err:
            print(f"cell_sim: {err}", file=sys.stderr)
            return 1
        executor.add_node(node)
        spin(node, executor)  # a callback's error is logged and spinning goes on
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        shutdown(node, executor)  # later signals ignored; the node destroyed once the executor is idle
        if node is not None:
            node.sim.close()
    return 0


def main(args: list[str] | None = None) -> None:
    """Entry point of ``cell_sim``."""
    sys.exit(run(args))


if __name__ == "__main__":
    main()
