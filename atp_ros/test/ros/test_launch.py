"""`ros2 launch atp_ros vlm.launch.py` starts the node (launch_pytest; runs under `colcon test` on a ROS
machine). Skipped where launch/launch_ros/launch_pytest are not installed, as on our pip-only CI machines."""

from __future__ import annotations

import pytest

launch_pytest = pytest.importorskip(
    "launch_pytest", reason="launch_pytest is not installed (pip-only ROS 2 wheels); runs under colcon test on ROS"
)
pytest.importorskip("launch_ros", reason="launch_ros is not installed")

import os  # noqa: E402
from pathlib import Path  # noqa: E402

from ament_index_python.packages import get_package_share_directory  # noqa: E402
from atp_ros.testing.tiny.llava import save_tiny_llava  # noqa: E402
from launch import LaunchDescription  # noqa: E402
from launch.actions import IncludeLaunchDescription  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402

pytestmark = pytest.mark.dds


@launch_pytest.fixture
def launch_description(tmp_path: Path):
    # The model and the params file live in pytest's tmp_path (a launch_pytest fixture is a pytest
    # fixture): nothing is left in $TMPDIR or the working directory.
    model_dir = save_tiny_llava(tmp_path / "model")
    params_file = tmp_path / "params.yaml"
    # model_id and device come only from the params file (no launch arguments for them): the
    # launch file must not override them with defaults. A namespace: the file must still apply.
    params_file.write_text(f'/**/atp_vlm:\n  ros__parameters:\n    model_id: "{model_dir}"\n    device: "cpu"\n')
    launch_file = os.path.join(get_package_share_directory("atp_ros"), "launch", "vlm.launch.py")
    include = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(launch_file),
        launch_arguments={
            "params_file": str(params_file),
            "namespace": "/launch_ns",
            "image_topic": "/launch_test/image",
        }.items(),
    )
    return LaunchDescription([include, launch_pytest.actions.ReadyToTest()])


@pytest.mark.launch(fixture=launch_description)
def test_node_starts_from_params_file_in_a_namespace_with_remapped_topics():
    import time

    import rclpy

    rclpy.init()
    probe = rclpy.create_node("atp_launch_probe")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            rclpy.spin_once(probe, timeout_sec=0.2)
            if probe.count_publishers("/launch_ns/atp_vlm/answer") > 0:  # model loaded
                break
        assert ("atp_vlm", "/launch_ns") in probe.get_node_names_and_namespaces()
        assert probe.count_publishers("/launch_ns/atp_vlm/answer") > 0
        assert probe.count_subscribers("/launch_test/image") > 0  # absolute image_topic: as given
        assert probe.count_subscribers("/launch_ns/atp_vlm/query") > 0  # relative query_topic: in the namespace
    finally:
        probe.destroy_node()
        rclpy.shutdown()
