"""Replay evaluation of ATP on recorded bags and image datasets (``evaluate`` command; no ROS imports
except in :mod:`atp_ros.evaluation.live`)."""
