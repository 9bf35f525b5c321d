"""The warehouse cell in the loop: `ros2 launch atp_ros cell.launch.py task:="bring the red box to the conveyor"`.

Starts the simulator (cell_sim), the perception node (vlm_node, lifecycle with autostart, on the simulator's camera)
and the pick planner (pick_planner, which runs `task` once and then takes more on ~/task), all in one namespace.
The camera pose is given once here and passed to both the simulator and the planner (no tf2 in this stack).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def _nodes(context, *args, **kwargs):
    arg = lambda name: LaunchConfiguration(name).perform(context)  # noqa: E731
    env = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if not (os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE") or os.environ.get("FASTRTPS_DEFAULT_PROFILES_FILE")):
        # camera frames of 640x480 and up need the large-frame profile on the sending side (the simulator)
        profile = os.path.join(get_package_share_directory("atp_ros"), "config", "fastdds_large_frames.xml")
        var = (
            "FASTRTPS_DEFAULT_PROFILES_FILE"
            if os.environ.get("ROS_DISTRO") == "humble"
            else "FASTDDS_DEFAULT_PROFILES_FILE"
        )
        env |= {var: profile, "RMW_FASTRTPS_USE_QOS_FROM_XML": "0"}
    camera = {}
    for name in ("camera.position", "camera.orientation"):
        text = arg(name.replace(".", "_"))
        if text:  # "[x, y, z]": else both nodes use the cell's nominal camera
            camera[name] = [float(v) for v in text.strip("[]").split(",")]
    ns = arg("namespace")
    sim = {
        "seed": int(arg("seed")),
        "width": int(arg("width")),
        "height": int(arg("height")),
        "camera_rate": float(arg("camera_rate")),
        "time_scale": float(arg("time_scale")),
    } | camera
    perception = {
        "model_id": arg("model_id"),
        "autostart": True,
        "max_new_tokens": 4,
        "atp.keep_ratio": float(arg("keep_ratio")),
    }
    confirm = arg("confirm").strip().lower()
    if confirm not in ("true", "false"):
        raise ValueError(f"confirm must be true or false, not {arg('confirm')!r}")
    planner = {"task": arg("task"), "target_from": arg("target_from"), "confirm": confirm == "true"} | camera
    common = {"namespace": ns, "output": "screen", "emulate_tty": True, "additional_env": env}
    return [
        Node(package="atp_ros", executable="cell_sim", name="cell_sim", parameters=[sim], **common),
        Node(
            package="atp_ros",
            executable="vlm_node",
            name="atp_vlm",
            # the shipped node parameters first (keyed /**/atp_vlm), this launch's values over them
            parameters=[os.path.join(get_package_share_directory("atp_ros"), "config", "vlm.yaml"), perception],
            remappings=[("image", "camera/image_raw")],
            **common,
        ),
        Node(package="atp_ros", executable="pick_planner", name="pick_planner", parameters=[planner], **common),
    ]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "task",
                default_value="bring the red box to the conveyor",
                description="the planner's first task (empty: wait for ~/task)",
            ),
            DeclareLaunchArgument(
                "model_id",
                default_value="warehouse-cell",
                description="the perception node's model (the cell's trained VLM, or a directory)",
            ),
            DeclareLaunchArgument(
                "keep_ratio", default_value="0.25", description="ATP keep ratio of the perception node"
            ),
            DeclareLaunchArgument(
                "seed",
                default_value="0",
                description="the cell's layout and look (ros2 param set /cell_sim seed N starts another)",
            ),
            DeclareLaunchArgument("width", default_value="640", description="camera width"),
            DeclareLaunchArgument("height", default_value="480", description="camera height"),
            DeclareLaunchArgument("camera_rate", default_value="5.0", description="camera frames per second"),
            DeclareLaunchArgument(
                "time_scale", default_value="1.0", description="simulated seconds per wall second (real time or faster)"
            ),
            DeclareLaunchArgument(
                "camera_position",
                default_value="",
                description="[x, y, z] of the camera's optical frame in the rail frame (empty: nominal)",
            ),
            DeclareLaunchArgument(
                "camera_orientation",
                default_value="",
                description="[qx, qy, qz, qw] of the optical frame in the rail frame (empty: nominal)",
            ),
            DeclareLaunchArgument(
                "target_from",
                default_value="answer",
                description="the planner's target: the slot the answer names, or relevant_box",
            ),
            DeclareLaunchArgument(
                "confirm",
                default_value="false",
                description="true: the planner confirms each grasp by asking what the gripper holds (off by default: "
                "the bundled warehouse-cell cannot yet name a held box, docs/cell_loop.md)",
            ),
            DeclareLaunchArgument("namespace", default_value="", description="namespace of all three nodes"),
            OpaqueFunction(function=_nodes),
        ]
    )
