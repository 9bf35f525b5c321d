"""The client: :class:`RemoteBackend` stands in for a local ``VlmBackend`` (the node's ``backend: ray``).

Same ``answer`` signature, the same metadata attributes (fetched from the deployment on
connect), and :class:`~atp_ros.backends.ServiceUnavailable` when the service is down,
unreachable or slower than ``timeout_s``; it reconnects on a later call.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray import serve

from atp_ros.backends.errors import GenerationStopped, ServiceUnavailable
from atp_ros.backends.results import VlmResult
from atp_ros.method import AtpConfig
from atp_ros.serving import ray_compat
from atp_ros.serving.cluster import SERVICE_ERRORS, lost, one_line, probe, resolve, start_ray
from atp_ros.serving.config import DEFAULT_APP
from atp_ros.serving.wire import IMAGE_FORMATS, Image, ServedResult, ServeRequest, make_request
from atp_ros.stream import ReuseConfig

POLL_S = 0.05  # how often a waiting client checks its stop hook
# ray.init and ray.shutdown act on the whole process: every client in it connects under this one lock.
_RAY_LOCK = threading.Lock()


def _metadata_field(key: str, convert: Callable[[Any], Any] = lambda value: value) -> property:
    """A read-only attribute of ``VlmBackend``'s that comes from the deployment's description."""
    return property(lambda self: convert(self.metadata()[key]), doc=f"The deployment's ``{key}``.")


class RemoteBackend:
    """The atp-serve deployment behind ``VlmBackend``'s interface (the node's ``backend: ray``).

    Connects lazily: the first ``answer`` or metadata read joins the Ray cluster at ``address``
    (``auto``, ``host:port``, ``ray://host:10001``; a process already connected to Ray keeps
    its connection) and gets the app's handle and metadata. Any failure to reach the service,
    and any request slower than ``timeout_s``, raises :class:`ServiceUnavailable` and drops the
    handle, so the next call connects anew. Metadata attributes keep the last values fetched.
    Thread safe: several threads may call ``answer`` at once (their requests batch together), and
    several clients may share a process (its one Ray connection).
    """

    def __init__(
        self,
        address: str = "auto",
        app_name: str = DEFAULT_APP,
        timeout_s: float = 10.0,
        image_format: str = "raw",
        jpeg_quality: int = 90,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be raw, png or jpeg, got {image_format!r}")
        self.address = address
        self.app_name = app_name
        self.timeout_s = float(timeout_s)
        self.image_format = image_format  # raw: exact and free locally; jpeg: far fewer bytes across hosts
        self.jpeg_quality = jpeg_quality
        self.batch_sizes: Counter[int] = Counter()  # formed batch sizes this client's requests rode in
        self.last_served: ServedResult | None = None
        self._handle: Any = None
        self._meta: dict[str, Any] | None = None
        self._owns_ray = False  # this client ran ray.init (and may shut it down to reconnect)
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- metadata (VlmBackend's attributes)

    def metadata(self) -> dict[str, Any]:
        """The deployment's description: the last one fetched, or fetched now (connecting)."""
        if self._meta is None:
            self.connect()
        assert self._meta is not None
        return self._meta

    family = _metadata_field("family")
    model_id = _metadata_field("model_id")
    device = _metadata_field("device")
    dtype = _metadata_field("dtype")
    num_visual_tokens = _metadata_field("num_visual_tokens")
    grid = _metadata_field("grid", lambda grid: None if grid is None else tuple(grid))  # None: per frame
    load_notes = _metadata_field("load_notes", list)

    def describe(self) -> str:
        """One line: the app, where it is, and the deployed backend's own description."""
        return f"ray app {self.app_name!r} at {self.address}: {self.metadata()['describe']}"

    # ---------------------------------------------------------------- connection

    def connect(self) -> Any:
        """The app's handle, connecting (Ray, app handle, metadata) if there is none."""
        with self._lock:
            if self._handle is None:
                try:
                    with _RAY_LOCK:
                        self._ensure_ray()
                except ServiceUnavailable as err:
                    raise self._unavailable(str(err)) from None
                try:
                    handle = self._app_handle()
                    self._meta = handle.describe.remote().result(timeout_s=self.timeout_s)
                except TimeoutError:
                    ray_compat.forget_controller()
                    raise self._unavailable(f"no description within {self.timeout_s:g} s") from None
                except SERVICE_ERRORS as err:
                    ray_compat.forget_controller()
                    raise self._unavailable(lost(err)) from None
                self._handle = handle
            return self._handle

    def _app_handle(self) -> Any:
        try:
            return serve.get_app_handle(self.app_name)
        except ray.exceptions.RayActorError:  # Serve's cached controller died (Serve restarted): once more
            ray_compat.forget_controller()
            return serve.get_app_handle(self.app_name)

    def close(self) -> None:
        """Forget the handle; disconnect from Ray if this client connected."""
        with self._lock, _RAY_LOCK:
            self._handle = None
            if self._owns_ray and ray.is_initialized():
                ray.shutdown()
            self._owns_ray = False

    def _ensure_ray(self) -> None:
        if ray.is_initialized():
            if not self._owns_ray:  # someone else's connection (a test, the demo, a benchmark driver)
                self._check_same_cluster()
                return
            try:
                probe(ray.get_runtime_context().gcs_address, min(self.timeout_s, 2.0))
                return
            except ServiceUnavailable:  # the cluster went away: drop the dead connection, join anew
                ray.shutdown()
                self._owns_ray = False
        target = resolve(self.address)
        probe(target, min(self.timeout_s, 2.0))
        try:
            start_ray(target)
        except (ConnectionError, RuntimeError) as err:
            raise ServiceUnavailable(one_line(err)) from None
        self._owns_ray = True

    def _check_same_cluster(self) -> None:
        """ServiceUnavailable when this process is connected to another cluster than ``address`` names."""
        if self.address in ("", "auto") or self.address.startswith("ray://"):
            return  # nothing to compare: the connection there is the one meant
        here = ray.get_runtime_context().gcs_address
        if resolve(self.address) != here:
            raise ServiceUnavailable(f"this process is already connected to Ray at {here}, one cluster per process")

    def _drop(self) -> None:
        with self._lock:
            self._handle = None

    def _unavailable(self, why: str) -> ServiceUnavailable:
        return ServiceUnavailable(f"atp-serve app {self.app_name!r} at {self.address}: {why}")

    # ---------------------------------------------------------------- answering

    def request(
        self, images: Sequence[Image], questions: Sequence[str] | str, atp: AtpConfig, max_new_tokens: int
    ) -> ServeRequest:
        """The request for these frames in this client's image format, checked here first."""
        return make_request(images, questions, atp, max_new_tokens, self.image_format, self.jpeg_quality)

    def answer(
        self,
        images: Sequence[Image],
        questions: Sequence[str] | str,
        atp: AtpConfig = AtpConfig(),
        max_new_tokens: int = 32,
        stop: Callable[[], bool] | None = None,
    ) -> VlmResult:
        """``VlmBackend.answer`` through the service (frames may also be JPEG / PNG bytes).

        ``stop`` is polled while waiting: once it returns True the request is cancelled and
        :class:`GenerationStopped` raised. Raises :class:`ServiceUnavailable` when the service is
        down or no answer came within ``timeout_s``; errors of the request itself (a bad frame)
        come back as their own type, e.g. ValueError.
        """
        return self.answer_served(images, questions, atp, max_new_tokens, stop).result

    def answer_served(
        self,
        images: Sequence[Image],
        questions: Sequence[str] | str,
        atp: AtpConfig = AtpConfig(),
        max_new_tokens: int = 32,
        stop: Callable[[], bool] | None = None,
    ) -> ServedResult:
        """Like :meth:`answer`, with how the request was batched."""
        served = self._send(self.request(images, questions, atp, max_new_tokens), stop)
        self.batch_sizes[served.batch_size] += 1
        return served

    def answer_stream(
        self,
        image: Image,
        question: str,
        stream: str,
        stamp_s: float,
        reuse: ReuseConfig,
        atp: AtpConfig = AtpConfig(),
        max_new_tokens: int = 32,
        stop: Callable[[], bool] | None = None,
    ) -> ServedResult:
        """One frame of camera stream ``stream`` at stream time ``stamp_s``: the replica answers it with that
        stream's reuse state (``reuse.mode`` answer or tokens; ``ServedResult.reused`` / ``recomputed`` say
        what it reused). With several replicas a stream's frames may land on different ones: each keeps
        its own state, so answers stay right and only less is reused."""
        request = make_request([image], question, atp, max_new_tokens, self.image_format, self.jpeg_quality,
                               stream, reuse, stamp_s)  # fmt: skip
        return self._send(request, stop)

    def _send(self, request: ServeRequest, stop: Callable[[], bool] | None) -> ServedResult:
        """The served result of ``request`` (see :meth:`answer` for the errors)."""
        deadline = time.monotonic() + self.timeout_s
        handle = self.connect()
        try:
            response = handle.remote(request)
        except SERVICE_ERRORS as err:
            self._drop()
            raise self._unavailable(lost(err)) from None
        served = self._wait(response, deadline, stop)
        self.last_served = served
        return served

    def _wait(self, response: Any, deadline: float, stop: Callable[[], bool] | None) -> ServedResult:
        while True:
            if stop is not None and stop():
                response.cancel()
                raise GenerationStopped("stopped while the service was answering")
            left = deadline - time.monotonic()
            if left <= 0:
                response.cancel()
                self._drop()
                raise self._unavailable(f"no answer within {self.timeout_s:g} s")
            try:
                return response.result(timeout_s=min(POLL_S, left))
            except TimeoutError:
                continue
            except ray.exceptions.RayTaskError as err:  # the request's own error, raised in the replica
                if isinstance(err.cause, SERVICE_ERRORS):
                    self._drop()
                    raise self._unavailable(lost(err.cause)) from None
                raise err.cause from None
            except SERVICE_ERRORS as err:
                self._drop()
                raise self._unavailable(lost(err)) from None
