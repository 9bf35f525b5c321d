from glob import glob

from setuptools import find_packages, setup

package_name = "atp_ros"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.launch.py")),
        ("share/" + package_name + "/config", glob("config/*.yaml")),
    ],
    install_requires=["setuptools"],
    extras_require={"test": ["pytest"]},  # colcon test picks pytest from this
    zip_safe=True,
    maintainer="atp_ros maintainers",
    maintainer_email="atp_ros@example.com",
    description="ROS 2 node answering questions about a camera stream with an ATP-pruned VLM.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "vlm_node = atp_ros.vlm_node:main",
        ],
    },
)
