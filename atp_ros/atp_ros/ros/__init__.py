"""The ROS 2 layer: the lifecycle node, its ROS-free inference worker, parameters, diagnostics,
message conversion, overlays, and the installed node as a child process. The only layer that
imports rclpy."""
