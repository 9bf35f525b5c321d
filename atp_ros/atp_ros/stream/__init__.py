"""Reuse across the frames of one camera stream (issue 22): which patches changed, and when the last
answer still holds. Imports neither ROS nor model code; the node's worker uses it (``reuse.*`` parameters)."""

from atp_ros.stream.changes import changed_patches, patch_signature
from atp_ros.stream.reuse import REUSE_MODES, TOKEN_VARIANTS, ReuseConfig, ReuseDecision, StreamCache

__all__ = [
    "REUSE_MODES",
    "TOKEN_VARIANTS",
    "ReuseConfig",
    "ReuseDecision",
    "StreamCache",
    "changed_patches",
    "patch_signature",
]
