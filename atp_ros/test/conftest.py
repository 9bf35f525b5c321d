"""Shared fixtures: an isolated DDS domain per test session, ROS logs in pytest's temp folder, rclpy contexts."""

from __future__ import annotations

import contextlib
import os
import random
import sys
import time

import pytest

# The test tree mirrors the package (method/, backends/, ros/, ...); the helpers shared by several
# folders (node_harness, backend_checks) live at its root.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# One DDS domain per pytest session, so parallel runs on one machine never hear each other.
# Valid domain ids for Fast DDS default ports: 0..101 (avoid 0, the default everyone uses).
os.environ.setdefault("ROS_DOMAIN_ID", str(random.Random(os.getpid()).randint(1, 101)))
# Discovery and traffic stay on this machine.
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
# The shipped Fast DDS profile for large frames, as the tools use it; set before this process creates its
# first DDS participant (Fast DDS reads profiles once). ATP_ROS_DDS_PROFILE=0 runs the suite on the defaults.
# torch._dynamo (it loads triton) segfaults when first imported after a MuJoCo EGL context exists, so a
# run that renders the warehouse cell before the first model test would crash: import it up front.
with contextlib.suppress(ImportError):
    import torch._dynamo  # noqa: F401
try:
    from atp_ros.ros.process import use_dds_profile

    use_dds_profile()
except ImportError:  # no install space sourced: the tests that need ROS skip
    pass


_STARTED = time.time()
_EXIT: dict[str, int] = {}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the Fast DDS shared-memory segments this session's killed nodes left behind (unused ones only)."""
    from atp_ros.testing.shm import remove_orphaned_segments

    remove_orphaned_segments(_STARTED - 1.0)
    _EXIT["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave with the session's exit status once pytest is done (report printed, cache written), skipping the
    interpreter's teardown: after a green full run, tearing down torch, MuJoCo's EGL contexts and rclpy in one
    process segfaulted once under load, turning the run red. The node's ``main()`` leaves the same way
    (docs/node.md). ``ATP_ROS_TEST_TEARDOWN=1`` keeps the normal teardown."""
    if "status" in _EXIT and os.environ.get("ATP_ROS_TEST_TEARDOWN") != "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT["status"])


def pytest_report_header(config: pytest.Config) -> list[str]:
    try:
        import atp_ros

        where = atp_ros.__file__
    except ImportError as err:
        where = f"not importable ({err})"
    return [
        f"atp_ros imported from: {where}",
        f"ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']} python={sys.executable}",
    ]


@pytest.fixture(scope="session", autouse=True)
def ros_log_dir(tmp_path_factory: pytest.TempPathFactory):
    """rcl writes one log file per process to ~/.ros/log; this session's go to pytest's temp folder
    (kept for the last few sessions, like tmp_path), and the node processes the tests start inherit it."""
    if os.environ.get("ROS_LOG_DIR"):  # the caller chose a place
        yield os.environ["ROS_LOG_DIR"]
        return
    os.environ["ROS_LOG_DIR"] = str(tmp_path_factory.mktemp("ros_log"))
    try:
        yield os.environ["ROS_LOG_DIR"]
    finally:
        del os.environ["ROS_LOG_DIR"]


def _context():
    rclpy = pytest.importorskip("rclpy")
    context = rclpy.context.Context()
    rclpy.init(context=context)
    try:
        yield context
    finally:
        rclpy.try_shutdown(context=context)


@pytest.fixture
def rclpy_context():
    """A fresh rclpy context for one test, shut down afterwards."""
    yield from _context()


@pytest.fixture(scope="module")
def ros_ctx():
    """An rclpy context shared by one module's tests (node processes are started per test or module)."""
    yield from _context()


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random LLaVA checkpoint (64 visual tokens on an 8x8 grid) with its text tower."""
    from atp_ros.testing.tiny.llava import save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava") / "ckpt")
