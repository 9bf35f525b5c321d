"""The warehouse cell in the loop: a ROS 2 simulator node, a pick planner acting on the perception node's answers,
and the closed-loop evaluation (no module here is imported by the perception node; MuJoCo stays out of it)."""
