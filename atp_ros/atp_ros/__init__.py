"""atp_ros: Adaptive Token Pruning for vision-language models, served as a ROS 2 node."""

__version__ = "0.1.0"
