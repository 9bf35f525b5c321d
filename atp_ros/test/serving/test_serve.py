"""The ATP-gated VLM on Ray Serve: exact answers, batching, and a client that survives outages.

One local Ray instance for the module (2 CPUs, no dashboard) runs the app with the bundled
warehouse-tiny. Exactness is checked against the local backend on the very calls the
replica made: each served result names its backend call and its place in it, so the test
replays every call locally with the same frames (PNG and raw exactly; JPEG after the same
decode) and compares answers, generated ids, keep masks and kept counts.
"""

from __future__ import annotations

import asyncio
import queue
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from atp_ros.backends import AtpConfig, GenerationStopped, ServiceUnavailable, load_backend
from atp_ros.warehouse.scenes import questions_for_scene, render_scene, split_seed

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
from atp_ros.serving import ray_compat  # noqa: E402  (after the skip: Ray is an optional dependency elsewhere)
from atp_ros.serving.cli import main as serve_main  # noqa: E402
from atp_ros.serving.client import RemoteBackend  # noqa: E402
from atp_ros.serving.cluster import NAMESPACE  # noqa: E402
from atp_ros.serving.config import ServeConfig  # noqa: E402
from atp_ros.serving.server import Coalescer, answer_requests, deploy  # noqa: E402
from atp_ros.serving.wire import ServeRequest, decode_image, encode_image, make_request  # noqa: E402

APP = "atp_vlm_test"
# Batches of up to 8 requests, held open 0.5 s for the rest of a concurrent burst to arrive.
CFG = ServeConfig(app=APP, num_cpus=2, device="cpu", max_batch_size=8, batch_wait_timeout_s=0.5)
THREADS = 2  # torch threads of the replica (num_cpus=2) and of the local reference alike


@pytest.fixture(scope="module")
def local():
    """The local reference, computing with the replica's thread count (same kernels, same bits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        yield load_backend("warehouse-tiny", device="cpu")
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance for this module; its GCS address."""
    ray_compat.init_on_loopback(num_cpus=2, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def app(cluster):
    deploy(CFG)
    return cluster


@pytest.fixture(scope="module")
def frames():
    """Six 640x480 test-split frames with one question each."""
    out = []
    for i in range(6):
        scene = render_scene(split_seed("test", 700_000 + i), 480, 640)
        out.append((scene.rgb, questions_for_scene(scene, np.random.default_rng(i), 1)[0].question))
    return out


def _same(served, reference) -> None:
    assert served.answers == reference.answers
    assert served.generated_ids == reference.generated_ids
    assert served.visual_tokens_kept == reference.visual_tokens_kept
    assert torch.equal(served.selection.mask, reference.selection.mask)
    assert torch.equal(served.selection.indices, reference.selection.indices)


def _replay(local, requests: list[ServeRequest], served: list) -> int:
    """Replay every backend call the replica made, locally, and compare each request's part; calls replayed."""
    calls: dict[str, list[int]] = {}
    for i, s in enumerate(served):
        calls.setdefault(s.call_id, []).append(i)
    for members in calls.values():
        members.sort(key=lambda i: served[i].offset)
        assert len({requests[i].key for i in members}) == 1  # one call answers one (AtpConfig, max_new_tokens)
        images = [decode_image(img) for i in members for img in requests[i].images]
        assert served[members[0]].call_images == len(images)
        questions = [q for i in members for q in requests[i].questions]
        atp, max_new_tokens = requests[members[0]].key
        reference = local.answer(images, questions, atp, max_new_tokens)
        for i in members:
            n = len(requests[i].images)
            _same(served[i].result, reference.part(served[i].offset, served[i].offset + n))
    return len(calls)


# ----------------------------------------------------------------------------- no Ray needed


def test_ray_is_the_version_ray_compat_was_checked_against() -> None:
    """A Ray upgrade starts by re-reading the internals in ray_compat, then moving CHECKED_WITH."""
    assert ray.__version__ == ray_compat.CHECKED_WITH


def test_the_serve_alias_keeps_the_old_import_path() -> None:
    from atp_ros.serving import serve as alias

    assert alias.RemoteBackend is RemoteBackend and alias.deploy is deploy and alias.main is serve_main
    assert all(hasattr(alias, name) for name in alias.__all__)


def test_result_part_is_the_batch_row(local, frames) -> None:
    images, questions = [f[0] for f in frames[:3]], [f[1] for f in frames[:3]]
    res = local.answer(images, questions, AtpConfig(mass=0.5), 4)  # adaptive: a K per image
    part = res.part(1, 3)
    assert part.answers == res.answers[1:3] and part.visual_tokens_kept == res.visual_tokens_kept[1:3]
    assert part.selection.indices.shape == (2, max(res.visual_tokens_kept[1:3]))  # padding trimmed to the part
    assert torch.equal(part.selection.mask, res.selection.mask[1:3])
    assert part.timings == res.timings and part.scoring == res.scoring
    with pytest.raises(ValueError):
        res.part(2, 2)


def test_answer_requests_one_call_per_setting_and_bad_requests_alone(local, frames) -> None:
    calls = []

    class Recording:  # the real backend; records the calls it gets
        def answer(self, *args):
            calls.append(len(args[0]))
            return local.answer(*args)

    png = encode_image(frames[0][0])
    reqs = [
        ServeRequest((png,), (frames[0][1],), AtpConfig(keep_ratio=0.25), 4),
        ServeRequest((frames[1][0],), (frames[1][1],), AtpConfig(keep_ratio=0.5), 4),
        ServeRequest((b"not an image",), ("q",), AtpConfig(), 4),
        ServeRequest((frames[2][0], frames[3][0]), (frames[2][1], frames[3][1]), AtpConfig(keep_ratio=0.25), 4),
    ]
    out = answer_requests(Recording(), reqs)
    assert calls == [3, 1]  # the two keep-0.25 requests (3 images) share one call
    assert isinstance(out[2], ValueError) and "cannot decode" in str(out[2])
    assert [o.offset for o in (out[0], out[3])] == [0, 1] and out[0].call_id == out[3].call_id
    assert all(o.batch_size == 4 for o in (out[0], out[1], out[3]))
    assert _replay(local, [reqs[i] for i in (0, 1, 3)], [out[i] for i in (0, 1, 3)]) == 2


def test_coalescer_merges_the_batches_that_queued_while_the_model_ran() -> None:
    started, release, runs = threading.Event(), threading.Event(), []

    def run(requests: list) -> list:
        runs.append(list(requests))
        started.set()
        release.wait(30)  # the first run holds the model until the others have queued
        return [r * 10 for r in requests]

    async def main() -> list:
        coalescer = Coalescer(run, max_batch_size=4)
        first = asyncio.ensure_future(coalescer.submit([1]))
        await asyncio.to_thread(started.wait, 30)
        later = [asyncio.ensure_future(coalescer.submit([i])) for i in range(2, 7)]  # five single batches
        await asyncio.sleep(0)  # they join the pending list
        release.set()
        return [await first, *[await f for f in later]]

    assert asyncio.run(main()) == [[10], [20], [30], [40], [50], [60]]
    assert runs == [[1], [2, 3, 4, 5], [6]]  # one run per free model, up to max_batch_size


def test_a_request_that_breaks_a_shared_call_fails_alone(local, frames) -> None:
    """Checked on arrival (0x0 frames never reach the model); a call that fails anyway is retried per request."""
    calls = []
    poison = frames[2][0]

    class Fragile:  # the real backend, failing every call that holds one particular frame
        def answer(self, images, *args):
            calls.append(len(images))
            if any(img is poison for img in images):
                raise RuntimeError("shape '[1, 3, 192, 192]' is invalid for input of size 0")
            return local.answer(images, *args)

    atp = AtpConfig(keep_ratio=0.25)
    reqs = [ServeRequest((frames[i][0],), (frames[i][1],), atp, 4) for i in range(4)]
    reqs.insert(1, ServeRequest((np.zeros((0, 0, 3), np.uint8),), ("q",), atp, 4))
    reqs.insert(2, ServeRequest(("not a frame",), ("q",), atp, 4))
    out = answer_requests(Fragile(), reqs)
    assert isinstance(out[1], ValueError) and "zero-size image 0x0" in str(out[1])
    assert isinstance(out[2], ValueError) and "request rejected" in str(out[2])
    assert isinstance(out[4], RuntimeError) and "invalid for input" in str(out[4])  # frames[2]: its own error
    healthy = [0, 3, 5]
    assert all(not isinstance(out[i], Exception) for i in healthy)
    assert calls == [4, 1, 1, 1, 1]  # the shared call (4 checked requests) failed: each once more alone
    assert _replay(local, [reqs[i] for i in healthy], [out[i] for i in healthy]) == 3


# ----------------------------------------------------------------------------- atp-serve


def _atp_serve() -> Path:
    from ament_index_python.packages import get_package_prefix

    return Path(get_package_prefix("atp_ros")) / "lib" / "atp_ros" / "atp-serve"


def test_atp_serve_bad_input_is_one_line(capsys) -> None:
    proc = subprocess.run([str(_atp_serve()), "--config", "/no/such/serve.yaml"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr == "atp-serve: config file not found: /no/such/serve.yaml\n"
    for args, message in ((["--model", "/no/such/model"], "/no/such/model"), (["--max-batch-size", "0"], ">= 1")):
        assert serve_main(args) == 2  # in this process: nothing started before the check
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err


def _ready_line(server: subprocess.Popen, timeout: float) -> str:
    """atp-serve's "ready" line from its stdout ("" if it exited or said nothing in time)."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in server.stdout:
            lines.put(line)
        lines.put("")  # EOF: the server exited

    threading.Thread(target=read, daemon=True).start()
    try:
        while "ready" not in (line := lines.get(timeout=timeout)):
            if not line:
                return ""
        return line
    except queue.Empty:
        return ""


def test_atp_serve_serves_until_ctrl_c_and_the_client_sees_it_go(tmp_path, local, frames) -> None:
    """The real CLI in its own process and Ray instance; this process joins it as a client (the node's path).

    Runs before any test here starts the module's own Ray instance: a process joins one cluster.
    """
    assert not ray.is_initialized()
    config = tmp_path / "serve.yaml"
    config.write_text(  # 2 logical CPUs for the replica: torch runs 2 threads like the local reference
        "app: atp_cli_test\nray:\n  num_cpus: 2\nmodel:\n  device: cpu\n"
        "deployment:\n  ray_actor_options:\n    num_cpus: 2\n"
    )
    with open(tmp_path / "stderr.txt", "w") as err:
        # SIGINT at its default: run as a background job (a detached CI run), this test's children would
        # inherit it ignored, and Python installs its Ctrl-C handler only where SIGINT is not ignored.
        server = subprocess.Popen(
            [str(_atp_serve()), "--config", str(config)], stdout=subprocess.PIPE, stderr=err, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
    remote = None
    try:
        ready = _ready_line(server, 240)
        assert ready, (tmp_path / "stderr.txt").read_text()[-2000:]
        address = re.search(r"ray\.address:=(\S+)", ready).group(1)
        remote = RemoteBackend(address, "atp_cli_test", timeout_s=60, image_format="png")
        rgb, q = frames[0]
        res = remote.answer([rgb], q, AtpConfig(keep_ratio=0.25), 4)  # joins the cluster: ray.init here
        _same(res, local.answer([rgb], q, AtpConfig(keep_ratio=0.25), 4))
        assert remote.family == "llava"
    finally:
        server.send_signal(signal.SIGINT)
        rc = server.wait(timeout=120)
    try:
        assert rc == 0
        assert "Traceback" not in (tmp_path / "stderr.txt").read_text()
        with pytest.raises(ServiceUnavailable):  # the app went away under the handle
            remote.answer([rgb], q, AtpConfig(keep_ratio=0.25), 4)
        with pytest.raises(ServiceUnavailable, match="unreachable") as gone:  # and the whole cluster with it
            remote.answer([rgb], q, AtpConfig(keep_ratio=0.25), 4)
        assert "\n" not in str(gone.value)
    finally:
        if remote is not None:
            remote.close()
    assert not ray.is_initialized()  # the client let go of the dead connection


# ----------------------------------------------------------------------------- through Ray Serve


def test_metadata_comes_from_the_deployment(app, local) -> None:
    remote = RemoteBackend(app, APP, timeout_s=60)
    assert (remote.family, remote.num_visual_tokens, remote.grid) == ("llava", 144, (12, 12))
    assert (remote.model_id, remote.device, remote.dtype) == (local.model_id, "cpu", "torch.float32")
    assert remote.load_notes == local.load_notes
    assert remote.metadata()["max_batch_size"] == CFG.max_batch_size


def test_concurrent_mixed_requests_batch_and_answer_like_the_local_backend(app, local, frames) -> None:
    remote = RemoteBackend(app, APP, timeout_s=60)
    settings = (AtpConfig(keep_ratio=0.25), AtpConfig(keep_ratio=0.5), AtpConfig(mass=0.5))
    encodings = ("raw", "png", "jpeg")
    requests = []
    for i, (rgb, q) in enumerate(frames):
        kind = encodings[i % 3]
        payload = rgb if kind == "raw" else encode_image(rgb, kind, quality=85)
        requests.append(ServeRequest((payload,), (q,), settings[i % 3], 4))
    with ThreadPoolExecutor(len(requests)) as pool:
        served = list(
            pool.map(lambda r: remote.answer_served(r.images, r.questions, r.atp, r.max_new_tokens), requests)
        )
    assert max(s.batch_size for s in served) > 1  # a concurrent burst forms a batch
    assert _replay(local, requests, served) >= 3  # at least one call per setting
    assert any(size > 1 for size in remote.batch_sizes)
    stats = serve.get_app_handle(APP).stats.remote().result(timeout_s=30)
    assert sum(size * n for size, n in stats["batch_sizes"].items()) >= len(requests)


def test_one_request_of_several_frames_matches_the_local_call(app, local, frames) -> None:
    remote = RemoteBackend(app, APP, timeout_s=60)
    images, questions = [f[0] for f in frames[:2]], [f[1] for f in frames[:2]]
    served = remote.answer_served(images, questions, AtpConfig(keep_ratio=0.25), 4)
    if served.call_images == 2:  # alone in its call (nothing else is sent now)
        _same(served.result, local.answer(images, questions, AtpConfig(keep_ratio=0.25), 4))
    assert len(served.result.answers) == 2


def test_stream_requests_keep_per_camera_reuse_state_in_the_replica(app, local, frames) -> None:
    from atp_ros.stream import ReuseConfig

    remote = RemoteBackend(app, APP, timeout_s=60)
    reuse = ReuseConfig(mode="tokens", refresh_frames=30, refresh_s=600.0)
    (rgb, q), (other, _) = frames[0], frames[1]
    atp = AtpConfig(keep_ratio=0.25)
    first = remote.answer_stream(rgb, q, "cam0", 0.0, reuse, atp, 4)
    assert first.reused is None, "a stream's first frame runs the model"
    _same(first.result, local.answer([rgb], q, atp, 4))  # the whole tower ran: the local call's answer
    again = remote.answer_stream(rgb, q, "cam0", 0.1, reuse, atp, 4)
    assert again.reused is not None and again.reused.frames_since_full == 1
    assert again.result.answers == first.result.answers
    assert remote.answer_stream(rgb, q, "cam1", 0.1, reuse, atp, 4).reused is None, "another camera, its own state"
    moved = remote.answer_stream(other, q, "cam0", 0.2, reuse, atp, 4)
    assert moved.reused is None and moved.recomputed is not None, "a new scene: the model, its tower from the cache"
    assert moved.recomputed > 0
    with pytest.raises(ValueError, match="one frame"):  # checked before it travels
        make_request([rgb, rgb], q, atp, 4, stream="cam0", reuse=reuse)


def test_request_errors_stop_and_timeout(app, frames) -> None:
    remote = RemoteBackend(app, APP, timeout_s=60)
    with pytest.raises(ValueError, match="cannot decode image bytes"):
        remote.answer([b"\x89PNG broken"], "is the gripper open?")  # checked by the replica, raised here
    with pytest.raises(ValueError, match="one question per image"):
        remote.answer([frames[0][0]], ["a", "b"])  # checked before sending
    with pytest.raises(GenerationStopped):
        remote.answer([frames[0][0]], frames[0][1], stop=lambda: True)
    remote.connect()
    remote.timeout_s = 1e-6  # no answer can come this fast
    with pytest.raises(ServiceUnavailable, match="no answer within") as err:
        remote.answer([frames[0][0]], frames[0][1], max_new_tokens=4)
    assert err.value.cause == "service" and "\n" not in str(err.value)
    remote.timeout_s = 60
    assert len(remote.answer([frames[0][0]], frames[0][1], max_new_tokens=4).answers) == 1


def test_bad_frames_fail_only_their_own_request_among_concurrent_clients(app, local, frames) -> None:
    """Healthy clients and clients sending frames no model can take, all at once into the same batches."""
    healthy = RemoteBackend(app, APP, timeout_s=60)
    handle = serve.get_app_handle(APP)  # past the client's own checks: what a client of another version sends
    atp = AtpConfig(keep_ratio=0.25)
    bad_frames = [np.zeros((0, 0, 3), np.uint8), np.zeros((0, 8, 3), np.uint8), b"\x89PNG broken"]

    def bad(i: int):
        try:
            handle.remote(ServeRequest((bad_frames[i % 3],), ("q",), atp, 4)).result(timeout_s=60)
        except Exception as err:  # Ray wraps the replica's ValueError
            return err
        return None

    def good(i: int):
        rgb, q = frames[i % len(frames)]
        return healthy.answer_served([rgb], q, atp, 4)

    with ThreadPoolExecutor(10) as pool:
        goods = [pool.submit(good, i) for i in range(7)]
        bads = [pool.submit(bad, i) for i in range(3)]
        served = [f.result() for f in goods]
        errors = [f.result() for f in bads]
    assert all(err is not None and "request rejected" in str(err) for err in errors), errors
    assert "zero-size image 0x0" in str(errors[0])
    requests = [ServeRequest((frames[i % len(frames)][0],), (frames[i % len(frames)][1],), atp, 4) for i in range(7)]
    assert _replay(local, requests, served) >= 1


def test_two_clients_in_one_process_connect_at_once(app) -> None:
    """Their first calls race to join Ray (ray.init is per process); both must answer."""
    code = f"""
import sys, threading
import numpy as np
from atp_ros.serving.client import RemoteBackend
clients = [RemoteBackend({app!r}, {APP!r}, timeout_s=60) for _ in range(2)]
barrier, out = threading.Barrier(2), []
def first(c):
    barrier.wait()
    try:
        res = c.answer([np.full((48, 64, 3), 90, np.uint8)], "is the gripper open?", max_new_tokens=2)
        out.append(len(res.answers))
    except Exception as err:
        out.append(repr(err))
threads = [threading.Thread(target=first, args=(c,)) for c in clients]
[t.start() for t in threads]
[t.join() for t in threads]
print(out)
for c in clients:
    c.close()
sys.exit(0 if out == [1, 1] else 1)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


def test_client_raises_service_unavailable_then_recovers(app, local, frames) -> None:
    """Runs last: it takes the app and Serve down, then deploys the app again."""
    missing = RemoteBackend(app, "no_such_app", timeout_s=30)
    with pytest.raises(ServiceUnavailable, match="does not exist"):
        missing.answer([frames[0][0]], frames[0][1])
    with pytest.raises(ServiceUnavailable):
        missing.family  # noqa: B018  (metadata needs the service too)

    remote = RemoteBackend(app, APP, timeout_s=30)
    rgb, q = frames[0]
    first = remote.answer([rgb], q, AtpConfig(keep_ratio=0.25), 4)
    serve.delete(APP)
    with pytest.raises(ServiceUnavailable) as err:
        remote.answer([rgb], q, AtpConfig(keep_ratio=0.25), 4)
    assert "\n" not in str(err.value) and APP in str(err.value)
    stale = ray_compat.controller_client()  # this process's handle of the Serve controller
    serve.shutdown()
    with pytest.raises(ServiceUnavailable, match="no Serve instance"):
        remote.answer([rgb], q, AtpConfig(keep_ratio=0.25), 4)
    deploy(CFG)  # back up: the same client answers again...
    # ...even holding what a node process holds when another process restarted Serve: the dead controller
    ray_compat.set_controller_client(stale)
    again = remote.answer([rgb], q, AtpConfig(keep_ratio=0.25), 4)
    _same(again, first)
    _same(again, local.answer([rgb], q, AtpConfig(keep_ratio=0.25), 4))
    assert remote.family == "llava"
