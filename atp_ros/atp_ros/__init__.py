"""atp_ros: Adaptive Token Pruning for vision-language models, served as a ROS 2 node."""

from importlib.metadata import PackageNotFoundError, version

try:  # written once, in package.xml; setup.py installs it as the distribution's version
    __version__ = version("atp_ros")
except PackageNotFoundError:  # a source tree that was never installed (colcon build / pip install)
    __version__ = "0+unknown"
