"""Start the atp_vlm node: `ros2 launch atp_ros vlm.launch.py model_id:=... image_topic:=/camera/color/image_raw`."""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def _node(context, *args, **kwargs):
    # model_id / device override the parameters file only when given: an always-passed
    # default would silently win over the value in a user's params_file.
    overrides = {}
    for name in ("model_id", "device"):
        value = LaunchConfiguration(name).perform(context)
        if value:
            overrides[name] = value
    parameters = [LaunchConfiguration("params_file")]
    if overrides:
        parameters.append(overrides)  # later entries win over the file
    image_topic = LaunchConfiguration("image_topic").perform(context)
    # else the node's own `image` (/image, or /<namespace>/image), as with `ros2 run atp_ros vlm_node`; with
    # image_transport: compressed the node follows the remapped base (<image_topic>/compressed)
    remappings = [("image", image_topic)] if image_topic else []
    query_topic = LaunchConfiguration("query_topic").perform(context)
    if query_topic:  # else the node's own ~/query, as with `ros2 run atp_ros vlm_node`
        remappings.append(("~/query", query_topic))
    # transformers' "Loading weights" bars redraw with carriage returns: under launch they become blank lines
    env = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    chosen = os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE") or os.environ.get("FASTRTPS_DEFAULT_PROFILES_FILE")
    if LaunchConfiguration("dds_profile").perform(context).lower() in ("true", "1", "yes") and not chosen:
        # Fast DDS profile for large frames (shared memory sized for 1080p); the camera driver needs it too
        profile = os.path.join(get_package_share_directory("atp_ros"), "config", "fastdds_large_frames.xml")
        # one variable only: Humble's Fast DDS reads the old spelling, later ones warn about it
        var = (
            "FASTRTPS_DEFAULT_PROFILES_FILE"
            if os.environ.get("ROS_DISTRO") == "humble"
            else "FASTDDS_DEFAULT_PROFILES_FILE"
        )
        env |= {var: profile, "RMW_FASTRTPS_USE_QOS_FROM_XML": "0"}
    return [
        Node(
            package="atp_ros",
            executable="vlm_node",
            additional_env=env,
            name="atp_vlm",
            namespace=LaunchConfiguration("namespace"),
            output="screen",
            emulate_tty=True,
            parameters=parameters,
            remappings=remappings,
        )
    ]


def generate_launch_description() -> LaunchDescription:
    default_params = os.path.join(get_package_share_directory("atp_ros"), "config", "vlm.yaml")
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "model_id",
                default_value="",
                description="VLM checkpoint: warehouse-cell or warehouse-tiny (bundled), hub id (cached) or local "
                "directory (empty: model_id of params_file, warehouse-cell in the shipped one)",
            ),
            DeclareLaunchArgument(
                "params_file", default_value=default_params, description="YAML file with the node's parameters"
            ),
            DeclareLaunchArgument(
                "image_topic",
                default_value="",
                description="camera topic remapped onto the node's 'image' input ('<image_topic>/compressed' with "
                "image_transport: compressed); empty: the node's own 'image', the same as `ros2 run atp_ros vlm_node`",
            ),
            DeclareLaunchArgument(
                "query_topic",
                default_value="",
                description="std_msgs/String topic with the standing question (empty: the node's ~/query, "
                "i.e. /<namespace>/atp_vlm/query, the same as `ros2 run atp_ros vlm_node`)",
            ),
            DeclareLaunchArgument("namespace", default_value="", description="namespace of the node"),
            DeclareLaunchArgument(
                "dds_profile",
                default_value="true",
                description="run the node with the shipped Fast DDS profile for large frames "
                "(config/fastdds_large_frames.xml); false: Fast DDS defaults or your own FASTDDS_DEFAULT_PROFILES_FILE",
            ),
            DeclareLaunchArgument(
                "device", default_value="", description="auto | cpu | cuda | cuda:N (empty: device of params_file)"
            ),
            OpaqueFunction(function=_node),
        ]
    )
