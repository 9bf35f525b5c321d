import xml.etree.ElementTree as ET
from glob import glob
from pathlib import Path

from setuptools import find_packages, setup

package_name = "atp_ros"
# The version is written once, in package.xml (what ROS tooling reads); atp_ros.__version__ reads it back.
version = ET.parse(Path(__file__).resolve().parent / "package.xml").getroot().findtext("version")

setup(
    name=package_name,
    version=version,
    packages=find_packages(exclude=["test"]),
    # The bundled checkpoints (warehouse-tiny, warehouse-cell: safetensors, configs, tokenizer) ship inside the package.
    # apps/demo_episode: the recorded cell episode `make demo` replays where the cell cannot be rendered.
    package_data={"atp_ros": ["models/*/*", "models/*/*/*", "warehouse/cell/assets/*", "apps/demo_episode/*"]},
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.launch.py")),
        ("share/" + package_name + "/config", glob("config/*.yaml") + glob("config/*.xml")),
    ],
    install_requires=["setuptools"],
    extras_require={"test": ["pytest"]},  # colcon test picks pytest from this
    zip_safe=False,  # the bundled model is read from the installed files
    maintainer="atp_ros maintainers",
    maintainer_email="atp_ros@example.com",
    description="ROS 2 node answering questions about a camera stream with an ATP-pruned VLM.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "vlm_node = atp_ros.ros.node:main",
            "warehouse = atp_ros.warehouse.cli:main",
            "train_tiny = atp_ros.warehouse.train:main",
            "evaluate = atp_ros.evaluation.cli:main",
            "atp-serve = atp_ros.serving.cli:main",
            "cell_sim = atp_ros.cell_loop.sim_node:main",
            "pick_planner = atp_ros.cell_loop.planner_node:main",
        ],
    },
)
