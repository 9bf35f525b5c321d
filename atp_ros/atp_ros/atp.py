"""Deprecated alias of :mod:`atp_ros.method` (the method moved into a package); kept for one release."""

from atp_ros.method import *  # noqa: F403
from atp_ros.method import __all__  # noqa: F401
