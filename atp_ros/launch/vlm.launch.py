"""Start the atp_vlm node: `ros2 launch atp_ros vlm.launch.py model_id:=... image_topic:=/camera/image_raw`."""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description() -> LaunchDescription:
    default_params = os.path.join(get_package_share_directory("atp_ros"), "config", "vlm.yaml")

    model_id = LaunchConfiguration("model_id")
    params_file = LaunchConfiguration("params_file")
    image_topic = LaunchConfiguration("image_topic")
    query_topic = LaunchConfiguration("query_topic")
    namespace = LaunchConfiguration("namespace")
    device = LaunchConfiguration("device")

    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "model_id",
                default_value="llava-hf/llava-1.5-7b-hf",
                description="VLM checkpoint: hub id (cached) or local directory",
            ),
            DeclareLaunchArgument(
                "params_file", default_value=default_params, description="YAML file with the node's parameters"
            ),
            DeclareLaunchArgument(
                "image_topic",
                default_value="/camera/image_raw",
                description="camera topic remapped onto the node's 'image' input",
            ),
            DeclareLaunchArgument(
                "query_topic",
                default_value="/atp_vlm/query",
                description="std_msgs/String topic with the standing question",
            ),
            DeclareLaunchArgument("namespace", default_value="", description="namespace of the node"),
            DeclareLaunchArgument("device", default_value="auto", description="auto | cpu | cuda | cuda:N"),
            Node(
                package="atp_ros",
                executable="vlm_node",
                name="atp_vlm",
                namespace=namespace,
                output="screen",
                emulate_tty=True,
                parameters=[params_file, {"model_id": model_id, "device": device}],
                remappings=[
                    ("image", image_topic),
                    ("image/compressed", [image_topic, "/compressed"]),
                    ("query", query_topic),
                ],
            ),
        ]
    )
