"""The node with ``backend: ray`` over real DDS: answers come from an atp-serve deployment in a
local Ray instance; the service going away is a counted ERROR in /diagnostics, and the node
answers again once it is back, without a restart.
"""

from __future__ import annotations

import time

import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("atp_ros_msgs.msg")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from atp_ros.serving.cluster import start_ray  # noqa: E402
from atp_ros.serving.config import ServeConfig  # noqa: E402
from atp_ros.serving.server import deploy  # noqa: E402
from atp_ros.warehouse.scenes import render_scene  # noqa: E402
from node_harness import Probe, image_msg, new_namespace, publish_until_answer, start_node, stop_node  # noqa: E402
from std_msgs.msg import String  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.dds]
APP = "atp_vlm_node_test"
CFG = ServeConfig(app=APP, num_cpus=1, device="cpu", max_batch_size=4, batch_wait_timeout_s=0.01)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance with the app deployed; its GCS address (the node joins it)."""
    start_ray(num_cpus=2)
    try:
        deploy(CFG)
        yield ray.get_runtime_context().gcs_address
    finally:
        serve.shutdown()
        ray.shutdown()


def frame(seed: int, stamp: int):
    return image_msg(render_scene(seed, 240, 320).rgb, stamp)


def test_node_answers_through_the_service_and_survives_its_outage(cluster, ros_ctx, tmp_path) -> None:
    ns = new_namespace()
    log = tmp_path / "node.log"
    proc = start_node(
        "warehouse-tiny", ns, log, backend="ray", ray__address=cluster, ray__app=APP, ray__timeout_s=20.0,
        max_new_tokens=4, atp__alpha=1.0,
    )  # fmt: skip
    probe = Probe(ros_ctx, ns)
    try:
        probe.wait_ready(proc, log, timeout=120)
        probe.pub_query.publish(String(data="what color is the box?"))
        answer = publish_until_answer(probe, frame(1, 1_000_000_000), timeout=120)
        assert answer.query == "what color is the box?" and answer.visual_tokens_total == 144
        assert sum(answer.keep_mask) == answer.visual_tokens_kept == 36  # keep_ratio 0.25 of 144
        probe.wait_for(lambda: probe.status_values().get("backend") == "ray", 10, "diagnostics")

        serve.delete(APP)  # the service goes away under a running node
        deadline = time.monotonic() + 120
        i = 0
        while "errors.service" not in probe.status_values():
            assert time.monotonic() < deadline, f"no service error in diagnostics:\n{log.read_text()}"
            probe.pub_image.publish(frame(2, 2_000_000_000 + i))
            i += 1
            time.sleep(0.5)
        values = probe.status_values()
        assert values["_level"] == "2" and proc.poll() is None  # ERROR, and still running

        deploy(CFG)  # back: the node reconnects by itself
        answer = publish_until_answer(probe, frame(3, 3_000_000_000), timeout=120)
        assert answer.query == "what color is the box?"
        assert log.read_text().count("[service]") >= 1 and "Traceback" not in log.read_text()
    finally:
        stop_node(proc)
        probe.close()
    assert proc.returncode == 0, log.read_text()
