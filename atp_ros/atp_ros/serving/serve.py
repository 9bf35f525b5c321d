"""The ATP-gated VLM as one batched Ray Serve service for many cameras, and its client.

* **Server** -- :class:`AtpVlmServer`, a Serve deployment holding one
  :func:`~atp_ros.backends.load_backend` model. Requests (:class:`ServeRequest`: frames,
  questions, an :class:`~atp_ros.method.AtpConfig`, ``max_new_tokens``) wait in ``@serve.batch``.
  Of each batch Ray forms, the requests that share ``(AtpConfig, max_new_tokens)`` go through
  ONE ``backend.answer`` call (every image still gets its own K, e.g. with ``mass > 0``);
  different settings make separate calls. The call's result is split back per request
  (:meth:`VlmResult.part`) into a :class:`ServedResult` that also says how large the batch was.
* **Client** -- :class:`RemoteBackend` stands in for a local ``VlmBackend`` (the node's
  ``backend: ray``): same ``answer`` signature, the same metadata attributes (fetched from the
  deployment on connect), and :class:`~atp_ros.backends.ServiceUnavailable` when the service is
  down, unreachable or slower than ``timeout_s``; it reconnects on a later call.
* **CLI** -- ``atp-serve --config serve.yaml`` starts (or joins) a Ray cluster, deploys the app
  and serves until Ctrl-C, then shuts down what it started.
* **Split deployments** -- :func:`embedding_payload` counts the bytes a robot would send per
  frame when ViT + ATP run on board and an LLM engine elsewhere takes the kept embeddings.

The only module importing Ray; nothing here imports ROS.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.serve.exceptions import RayServeException

from atp_ros.backends.errors import GenerationStopped, ServiceUnavailable
from atp_ros.backends.pipeline import questions_for
from atp_ros.backends.results import VlmResult
from atp_ros.method import AtpConfig

NAMESPACE = "atp_ros"  # the Ray namespace of atp-serve and its clients
DEFAULT_APP = "atp_vlm"  # the node's ray.app default
POLL_S = 0.05  # how often a waiting client checks its stop hook
MAX_FORMED = 64  # formed batches handed to the coalescer at once (bounded by max_ongoing_requests anyway)
QUIET = {"log_level": "WARNING", "enable_access_log": False}  # Serve logging: errors and warnings only
# What a lost service looks like from a client: no Serve or no app, a dead replica, a lost connection.
SERVICE_ERRORS: tuple[type[BaseException], ...] = (
    RayServeException,
    ray.exceptions.RayActorError,
    ray.exceptions.RaySystemError,
    ray.exceptions.ObjectLostError,
    ConnectionError,
)

Image = np.ndarray | bytes  # an HxWx3 uint8 RGB array, or a JPEG / PNG file's bytes


# =============================================================================== requests and results


@dataclass(frozen=True)
class ServeRequest:
    """One caller's frames and questions (one question per frame) with the settings to answer them."""

    images: tuple[Image, ...]
    questions: tuple[str, ...]
    atp: AtpConfig = field(default_factory=AtpConfig)
    max_new_tokens: int = 32

    @property
    def key(self) -> tuple[AtpConfig, int]:
        """Requests with equal keys share one backend call."""
        return self.atp, self.max_new_tokens


@dataclass(frozen=True)
class ServedResult:
    """A request's own part of a batched call, and how it was batched."""

    result: VlmResult  # this request's images only (timings: the whole call's)
    batch_size: int  # requests in the batch Ray formed
    call_images: int  # images in the backend call this request rode in
    call_id: str  # that call (unique across replicas)
    offset: int  # where this request's first image sat in that call


def encode_image(rgb: np.ndarray, fmt: str = "png", quality: int = 90) -> bytes:
    """An HxWx3 uint8 frame as PNG (lossless) or JPEG (``quality``) bytes."""
    from PIL import Image as PILImage

    if fmt not in ("png", "jpeg"):
        raise ValueError(f"image format must be png or jpeg, got {fmt!r}")
    buf = io.BytesIO()
    PILImage.fromarray(np.asarray(rgb, np.uint8)).save(buf, format=fmt.upper(), quality=quality)
    return buf.getvalue()


def decode_image(image: Image) -> np.ndarray:
    """An HxWx3 uint8 RGB array from raw pixels or JPEG / PNG bytes; ValueError when it is neither."""
    if isinstance(image, bytes | bytearray | memoryview):
        from PIL import Image as PILImage
        from PIL import UnidentifiedImageError

        try:
            with PILImage.open(io.BytesIO(image)) as img:
                return np.asarray(img.convert("RGB"))
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot decode image bytes ({len(image)} bytes): {err}") from None
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB array, got {arr.dtype} {arr.shape}")
    return arr


def _checked(request: ServeRequest) -> list[np.ndarray]:
    """The request's frames decoded; ValueError naming what is wrong with it."""
    frames = [decode_image(img) for img in request.images]
    questions_for(frames, list(request.questions))
    request.atp.check()
    if request.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
    return frames


def answer_requests(backend: Any, requests: Sequence[ServeRequest]) -> list[ServedResult | Exception]:
    """Answer one formed batch: one ``backend.answer`` per distinct (AtpConfig, max_new_tokens).

    A request that cannot be decoded or checked gets its own ValueError; a failing call fails
    only the requests in it. Results come back in request order.
    """
    out: list[ServedResult | Exception | None] = [None] * len(requests)
    groups: dict[tuple[AtpConfig, int], list[tuple[int, list[np.ndarray]]]] = {}
    for i, request in enumerate(requests):
        try:
            groups.setdefault(request.key, []).append((i, _checked(request)))
        except ValueError as err:
            out[i] = ValueError(f"request rejected: {err}")
    for (atp, max_new_tokens), members in groups.items():
        images = [frame for _, frames in members for frame in frames]
        questions = [q for i, _ in members for q in requests[i].questions]
        call_id = uuid.uuid4().hex[:12]
        try:
            result = backend.answer(images, questions, atp, max_new_tokens)
        except Exception as err:
            for i, _ in members:
                out[i] = err
            continue
        offset = 0
        for i, frames in members:
            part = result.part(offset, offset + len(frames))
            out[i] = ServedResult(part, len(requests), len(images), call_id, offset)
            offset += len(frames)
    return out  # type: ignore[return-value]  # every slot was filled above


def backend_metadata(backend: Any) -> dict[str, Any]:
    """What a client needs to stand in for ``backend`` (plain values, picklable anywhere)."""
    return {
        "family": backend.family,
        "model_id": backend.model_id,
        "device": str(backend.device),
        "dtype": str(backend.dtype),
        "num_visual_tokens": int(backend.num_visual_tokens),
        "grid": tuple(int(g) for g in backend.grid),
        "load_notes": list(backend.load_notes),
        "describe": backend.describe(),
    }


# =============================================================================== the deployment


class Coalescer:
    """Runs the batches Serve forms on the model one at a time, merging those that queued meanwhile.

    ``@serve.batch`` closes a batch when its wait ends, even while the model is still busy with
    the previous one, and queues it as it is: under a steady load (cameras whose next request
    leaves when their answer arrives) those batches are mostly single requests (measured: 130 of
    156 batches of 8 streams). Here every formed batch joins one pending list, and whenever the
    model is free it takes all that is pending, up to ``max_batch_size``, in one run.
    """

    def __init__(self, run: Callable[[list[ServeRequest]], list], max_batch_size: int = 8) -> None:
        self.run = run  # a blocking call over the requests of one model run, one result each
        self.max_batch_size = max_batch_size
        self.run_sizes: Counter[int] = Counter()  # requests per model run -> runs
        self._pending: list[tuple[ServeRequest, asyncio.Future]] = []
        self._draining = False
        self._drainer: asyncio.Task | None = None
        # One thread runs the model, always the same: torch's OpenMP pool belongs to the calling thread,
        # and a pool per thread of asyncio's default executor would spin on the same cores.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atp-model")

    async def submit(self, requests: list[ServeRequest]) -> list:
        """The result of each request, once a model run that took it has finished."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in requests]
        self._pending += zip(requests, futures, strict=True)
        if not self._draining:
            self._draining = True
            self._drainer = loop.create_task(self._drain())  # kept: the loop holds tasks weakly
        return list(await asyncio.gather(*futures))

    async def _drain(self) -> None:
        try:
            while self._pending:
                take = self._pending[: self.max_batch_size]
                del self._pending[: len(take)]
                live = [(r, f) for r, f in take if not f.done()]  # a cancelled caller is not answered
                if not live:
                    continue
                self.run_sizes[len(live)] += 1
                try:  # off the loop: it keeps accepting requests, describe() and health checks
                    loop = asyncio.get_running_loop()
                    results = await loop.run_in_executor(self._thread, self.run, [r for r, _ in live])
                except Exception as err:  # not a request's own error: every request of the run gets it
                    results = [err] * len(live)
                for (_, future), result in zip(live, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._draining = False


@serve.deployment(name="AtpVlm")
class AtpVlmServer:
    """One ATP-gated VLM replica; batching settings come from ``user_config`` (changed in place)."""

    def __init__(self, model: dict[str, str]) -> None:
        from atp_ros.backends import load_backend

        self.backend = load_backend(**model)
        self.model = Coalescer(partial(answer_requests, self.backend))
        self.formed: Counter[int] = Counter()  # batch size as @serve.batch formed it -> batches
        self.batching: dict[str, Any] = {}  # set by reconfigure, which Serve calls right after __init__

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve calls this on deploy and whenever only ``user_config`` changes (no model reload)."""
        self.batching = {"max_batch_size": int(config["max_batch_size"]),
                         "batch_wait_timeout_s": float(config["batch_wait_timeout_s"])}  # fmt: skip
        self.answer_batch.set_max_batch_size(self.batching["max_batch_size"])
        self.answer_batch.set_batch_wait_timeout_s(self.batching["batch_wait_timeout_s"])
        self.model.max_batch_size = self.batching["max_batch_size"]

    def describe(self) -> dict[str, Any]:
        return backend_metadata(self.backend) | self.batching

    def stats(self) -> dict[str, Any]:
        """This replica's batch sizes since it started, ``{size: count}``: requests per model run
        (``batch_sizes``) and per batch as ``@serve.batch`` formed it (``formed``)."""
        return {
            "batch_sizes": dict(sorted(self.model.run_sizes.items())),
            "formed": dict(sorted(self.formed.items())),
        }

    async def __call__(self, request: ServeRequest) -> ServedResult:
        out = await self.answer_batch(request)
        if isinstance(out, Exception):
            raise out
        return out

    # Sizes replaced by reconfigure. Formed batches go straight to the coalescer (max_concurrent_batches),
    # never queue behind the model as they were formed.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=MAX_FORMED)
    async def answer_batch(self, requests: list[ServeRequest]) -> list[ServedResult | Exception]:
        self.formed[len(requests)] += 1
        return await self.model.submit(requests)


# =============================================================================== configuration


@dataclass(frozen=True)
class ServeConfig:
    """What ``atp-serve`` deploys and where (``config/serve.yaml`` holds the same, nested)."""

    app: str = DEFAULT_APP
    address: str = ""  # "": start a local Ray instance; "auto" or host:port: join that cluster
    ray_num_cpus: int = 0  # local instance only: CPUs Ray may schedule (0: all)
    model_id: str = "warehouse-tiny"
    text_encoder_id: str = ""
    device: str = "auto"
    dtype: str = "auto"
    num_replicas: int = 1
    num_cpus: float = 1.0  # per replica (torch uses as many threads)
    num_gpus: float = 0.0  # per replica; fractions share a GPU
    max_ongoing_requests: int = 0  # per replica; 0: 2 x max_batch_size (at least 8)
    max_batch_size: int = 8  # requests per formed batch; 1 turns batching off
    batch_wait_timeout_s: float = 0.01  # how long a batch waits to fill after its first request

    def check(self) -> None:
        """ValueError naming the first bad setting."""
        if not self.app or not self.model_id:
            raise ValueError("app and model.model_id must not be empty")
        for name in ("num_replicas", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ray_num_cpus", "num_cpus", "num_gpus", "max_ongoing_requests", "batch_wait_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def ongoing(self) -> int:
        return self.max_ongoing_requests or max(2 * self.max_batch_size, 8)

    def model_kwargs(self) -> dict[str, str]:
        return {
            "model_id": self.model_id,
            "text_encoder_id": self.text_encoder_id,
            "device": self.device,
            "dtype": self.dtype,
        }

    def user_config(self) -> dict[str, Any]:
        return {"max_batch_size": self.max_batch_size, "batch_wait_timeout_s": self.batch_wait_timeout_s}


# YAML section -> {key in that section: ServeConfig field}
SECTIONS: dict[str, dict[str, str]] = {
    "": {"app": "app"},
    "ray": {"address": "address", "num_cpus": "ray_num_cpus"},
    "model": {"model_id": "model_id", "text_encoder_id": "text_encoder_id", "device": "device", "dtype": "dtype"},
    "deployment": {"num_replicas": "num_replicas", "max_ongoing_requests": "max_ongoing_requests"},
    "deployment.ray_actor_options": {"num_cpus": "num_cpus", "num_gpus": "num_gpus"},
    "batching": {"max_batch_size": "max_batch_size", "batch_wait_timeout_s": "batch_wait_timeout_s"},
}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"section.sub": {key: value}}`` of a nested YAML mapping (leaves grouped by their section)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if value is None and path in SECTIONS:  # a section with every line commented out
            continue
        if isinstance(value, dict):
            out.update(_flatten(value, path))
        else:
            out.setdefault(prefix, {})[str(key)] = value
    return out


def config_from_yaml(path: Path, base: ServeConfig = ServeConfig()) -> ServeConfig:
    """``base`` with the settings of a serve.yaml; ValueError naming an unknown key or a bad value."""
    import yaml

    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: expected a mapping at the top")
    types = {f.name: type(getattr(base, f.name)) for f in fields(ServeConfig)}
    values: dict[str, Any] = {}
    for section, leaves in _flatten(tree).items():
        for key, value in leaves.items():
            name = SECTIONS.get(section, {}).get(key)
            if name is None:
                raise ValueError(f"{path}: unknown setting {'.'.join(filter(None, (section, key)))!r}")
            try:
                values[name] = types[name](value if value is not None else "")
            except (TypeError, ValueError):
                raise ValueError(f"{path}: {section}.{key} must be a {types[name].__name__}, got {value!r}") from None
    return replace(base, **values)


# =============================================================================== deploying


def code_version(cfg: ServeConfig) -> str:
    """What the replicas run: the model settings, atp_ros's version and this file.

    ``serve.run`` gives an unversioned deployment a random version, so every deploy restarted the
    replicas (reloading the model) even when only ``user_config`` changed. With a version that
    stays the same for the same code and model, Serve reconfigures running replicas in place.
    """
    from atp_ros import __version__

    text = json.dumps(cfg.model_kwargs(), sort_keys=True) + __version__ + Path(__file__).read_text()
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def build_app(cfg: ServeConfig) -> serve.Application:
    """The Serve application of ``cfg`` (replicas, actor resources, batching as user_config)."""
    return AtpVlmServer.options(
        num_replicas=cfg.num_replicas,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        max_ongoing_requests=cfg.ongoing,
        user_config=cfg.user_config(),
        version=code_version(cfg),
        _internal=True,  # Serve keeps explicit versions to itself since 2.x; this is what its config files do
    ).bind(cfg.model_kwargs())


def deploy(cfg: ServeConfig) -> Any:
    """Deploy (or update in place) ``cfg``'s app on the connected Ray cluster; its handle once it runs.

    Serve starts without an HTTP proxy (clients use handles). Changing only the batching
    settings reconfigures running replicas without reloading the model.
    """
    serve.start(proxy_location="Disabled", logging_config=QUIET)
    return serve.run(build_app(cfg), name=cfg.app, route_prefix=None, logging_config=QUIET)


def start_ray(address: str = "", num_cpus: int = 0) -> bool:
    """Connect this process to Ray: join ``address``, or start a local instance when it is empty.

    Returns True when this process started the instance (it ends with this process).
    """
    quiet = {"namespace": NAMESPACE, "log_to_driver": False, "logging_level": logging.WARNING}
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no INFO line per handle and router
    if address:
        # Ray turns token authentication on by itself only for clusters it finds with "auto"; a local
        # instance (ray.init, ray start) requires it, so an explicit address uses this user's token too.
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        ray.init(address=address, **quiet)
        return False
    # Ray starts workers at niceness 15 (its raylet first); the replica IS the service here, and on a
    # robot computer sharing its cores a niced model falls far behind whatever else runs there.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=num_cpus or None, include_dashboard=False, **quiet)
    return True


def _lost(err: BaseException) -> str:
    """Why a service error means the service is gone, on one line with the error's kind."""
    return f"{type(err).__name__}: {one_line(err)}"


def one_line(err: BaseException, limit: int = 300) -> str:
    """A readable single line for an exception (Ray's carry remote tracebacks over many lines)."""
    text = str(err)
    for line in text.splitlines():  # a replica that failed to load says why on the ModelLoadError line
        if "ModelLoadError:" in line:
            return line.split("ModelLoadError:", 1)[1].strip()[:limit]
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    return first[:limit]


# =============================================================================== the client


def _probe(address: str, timeout: float) -> None:
    """ServiceUnavailable unless a TCP connection to ``host:port`` opens within ``timeout``.

    ``ray.init`` on an address nobody listens at retries for minutes; this answers at once.
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as err:
        raise ServiceUnavailable(f"Ray at {address} is unreachable ({err})") from None


def _forget_controller() -> None:
    """Drop Serve's cached handle of its controller in this process.

    Serve keeps it for the whole Ray session; after Serve was shut down and started again (a
    restarted atp-serve on a ``ray start`` cluster) it names a dead actor, and every later
    ``get_app_handle`` would fail. Without it, the next one finds the live controller by name.
    """
    from ray.serve import context

    context._disconnect()


def _resolve(address: str) -> str:
    """``auto`` (or RAY_ADDRESS) -> the host:port of a running cluster; others unchanged."""
    if address.startswith("ray://"):
        return address
    from ray._private.services import canonicalize_bootstrap_address

    try:
        found = canonicalize_bootstrap_address(address)
    except ConnectionError as err:  # "auto" and no cluster running here
        raise ServiceUnavailable(f"no Ray cluster found for address {address!r} ({one_line(err)})") from None
    if found is None:
        raise ServiceUnavailable(f"no Ray cluster found for address {address!r}")
    return found


class RemoteBackend:
    """The atp-serve deployment behind ``VlmBackend``'s interface (the node's ``backend: ray``).

    Connects lazily: the first ``answer`` or metadata read joins the Ray cluster at ``address``
    (``auto``, ``host:port``, ``ray://host:10001``; a process already connected to Ray keeps
    its connection) and gets the app's handle and metadata. Any failure to reach the service,
    and any request slower than ``timeout_s``, raises :class:`ServiceUnavailable` and drops the
    handle, so the next call connects anew. Metadata attributes keep the last values fetched.
    Thread safe: several threads may call ``answer`` at once (their requests batch together).
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
        if image_format not in ("raw", "png", "jpeg"):
            raise ValueError(f"image_format must be raw, png or jpeg, got {image_format!r}")
        self.address = address
        self.app_name = app_name
        self.timeout_s = float(timeout_s)
        self.image_format = image_format  # raw: exact and free locally; jpeg: ~20x fewer bytes across hosts
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

    @property
    def family(self) -> str:
        return self.metadata()["family"]

    @property
    def model_id(self) -> str:
        return self.metadata()["model_id"]

    @property
    def device(self) -> str:
        return self.metadata()["device"]

    @property
    def dtype(self) -> str:
        return self.metadata()["dtype"]

    @property
    def num_visual_tokens(self) -> int:
        return self.metadata()["num_visual_tokens"]

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.metadata()["grid"])

    @property
    def load_notes(self) -> list[str]:
        return list(self.metadata()["load_notes"])

    def describe(self) -> str:
        return f"ray app {self.app_name!r} at {self.address}: {self.metadata()['describe']}"

    # ---------------------------------------------------------------- connection

    def connect(self) -> Any:
        """The app's handle, connecting (Ray, app handle, metadata) if there is none."""
        with self._lock:
            if self._handle is None:
                try:
                    self._ensure_ray()
                except ServiceUnavailable as err:
                    raise self._unavailable(str(err)) from None
                try:
                    handle = self._app_handle()
                    self._meta = handle.describe.remote().result(timeout_s=self.timeout_s)
                except TimeoutError:
                    _forget_controller()
                    raise self._unavailable(f"no description within {self.timeout_s:g} s") from None
                except SERVICE_ERRORS as err:
                    _forget_controller()
                    raise self._unavailable(_lost(err)) from None
                self._handle = handle
            return self._handle

    def _app_handle(self) -> Any:
        try:
            return serve.get_app_handle(self.app_name)
        except ray.exceptions.RayActorError:  # Serve's cached controller died (Serve restarted): once more
            _forget_controller()
            return serve.get_app_handle(self.app_name)

    def close(self) -> None:
        """Forget the handle; disconnect from Ray if this client connected."""
        with self._lock:
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
                _probe(ray.get_runtime_context().gcs_address, min(self.timeout_s, 2.0))
                return
            except ServiceUnavailable:  # the cluster went away: drop the dead connection, join anew
                ray.shutdown()
                self._owns_ray = False
        target = _resolve(self.address)
        _probe(target, min(self.timeout_s, 2.0))
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
        if _resolve(self.address) != here:
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
        """The request for these frames, checked here first (a bad one never travels)."""
        qs = questions_for(list(images), questions)
        atp.check()
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        payload = []
        for img in images:
            if self.image_format == "raw" or isinstance(img, bytes):
                payload.append(img if isinstance(img, bytes) else decode_image(img))
            else:
                payload.append(encode_image(decode_image(img), self.image_format, self.jpeg_quality))
        return ServeRequest(tuple(payload), tuple(qs), atp, int(max_new_tokens))

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
        request = self.request(images, questions, atp, max_new_tokens)
        deadline = time.monotonic() + self.timeout_s
        handle = self.connect()
        try:
            response = handle.remote(request)
        except SERVICE_ERRORS as err:
            self._drop()
            raise self._unavailable(_lost(err)) from None
        served = self._wait(response, deadline, stop)
        self.batch_sizes[served.batch_size] += 1
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
                    raise self._unavailable(_lost(err.cause)) from None
                raise err.cause from None
            except SERVICE_ERRORS as err:
                self._drop()
                raise self._unavailable(_lost(err)) from None


# =============================================================================== split deployments


@dataclass(frozen=True)
class Payload:
    """Bytes per frame a robot sends when the LLM runs elsewhere (embeddings after the projector)."""

    tokens: int  # visual tokens sent
    embedding_bytes: int  # tokens x width x bytes per value
    position_bytes: int  # the kept tokens' original position ids (int16): ATP's "original" positions

    @property
    def total(self) -> int:
        return self.embedding_bytes + self.position_bytes


def embedding_payload(num_tokens: int, width: int, keep_ratio: float = 1.0, bytes_per_value: int = 2) -> Payload:
    """Bytes of one frame's visual embeddings (``num_tokens`` x ``width``, fp16 by default) at a keep ratio.

    K = ceil(keep_ratio x N), the node's budget rule. Below 1 the receiver also needs each kept
    token's position among all N (2 bytes each) to keep the original position ids.
    """
    if num_tokens < 1 or width < 1 or not 0 < keep_ratio <= 1:
        raise ValueError(
            f"need num_tokens, width >= 1 and keep_ratio in (0, 1], got {num_tokens}, {width}, {keep_ratio}"
        )
    kept = num_tokens if keep_ratio >= 1 else math.ceil(keep_ratio * num_tokens)
    return Payload(kept, kept * width * bytes_per_value, 0 if kept == num_tokens else 2 * kept)


# =============================================================================== atp-serve


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    ap = argparse.ArgumentParser(prog="atp-serve", description="Serve the ATP-gated VLM on Ray Serve with batching.")
    ap.add_argument("--config", type=Path, help="serve.yaml (flags override it)")
    ap.add_argument("--app", help=f"Serve application name (default {DEFAULT_APP})")
    ap.add_argument("--address", help='"" start a local Ray instance; auto or host:port join a cluster')
    ap.add_argument("--model", dest="model_id", help="bundled name, checkpoint dir or hub id")
    ap.add_argument("--device", help="auto | cpu | cuda")
    ap.add_argument("--num-replicas", type=int)
    ap.add_argument("--num-cpus", type=float, help="CPUs per replica")
    ap.add_argument("--num-gpus", type=float, help="GPUs per replica")
    ap.add_argument("--max-batch-size", type=int, help="requests per formed batch (1: no batching)")
    ap.add_argument("--batch-wait-timeout-s", type=float, help="how long a batch waits to fill")
    return ap.parse_args(argv), ap


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """serve.yaml (if given) with the flags that were set on top; checked."""
    cfg = config_from_yaml(args.config) if args.config is not None else ServeConfig()
    flags = {f.name: getattr(args, f.name) for f in fields(ServeConfig) if getattr(args, f.name, None) is not None}
    cfg = replace(cfg, **flags)
    cfg.check()
    return cfg


def _check_model(model_id: str) -> None:
    """ValueError unless ``model_id``'s config can be read here: what a local replica would read first.

    Only for a local instance: on a joined cluster the model may live on other machines only.
    A replica that fails to load is retried by Serve (three times per replica) before the
    deploy fails, each try importing torch again; this answers in one go.
    """
    from atp_ros.backends import ModelLoadError, _model_type, resolve_model_id

    if model_id.startswith((".", "/", "~")) and not Path(model_id).expanduser().is_dir():
        raise ValueError(f"model {model_id!r}: no such directory")  # not worth asking the hub about
    try:
        _model_type(resolve_model_id(model_id))
    except ModelLoadError as err:
        raise ValueError(one_line(err)) from None


def _deploy_failure(app: str, err: BaseException) -> str:
    """Why deploying ``app`` failed: the replica's own error (Serve's status message) when there is one."""
    try:
        status = serve.status().applications[app]
        messages = [d.message for d in status.deployments.values() if d.message] + [status.message]
        return next(one_line(RuntimeError(m)) for m in messages if "ModelLoadError:" in m)
    except Exception:  # no status to read (Serve gone, app never created): Serve's own line
        return one_line(err)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the service like Ctrl-C


def main(argv: list[str] | None = None) -> int:
    """``atp-serve``: deploy, serve until Ctrl-C (or SIGTERM), shut down what was started."""
    args, _ = parse_args(argv)
    try:
        cfg = config_from_args(args)
        if not cfg.address:
            _check_model(cfg.model_id)
    except ValueError as err:
        print(f"atp-serve: {err}", file=sys.stderr)
        return 2
    deployed, rc = False, 0
    try:
        signal.signal(signal.SIGTERM, _interrupt)
        start_ray(cfg.address, cfg.ray_num_cpus)
        try:
            deploy(cfg)
        except RuntimeError as err:
            raise RuntimeError(_deploy_failure(cfg.app, err)) from None
        deployed = True
        address = cluster_address()
        print(
            f"atp-serve: app {cfg.app!r} ready: {cfg.model_id}, {cfg.num_replicas} replica(s) x "
            f"{cfg.num_cpus:g} CPU / {cfg.num_gpus:g} GPU, batches of <= {cfg.max_batch_size} requests, wait "
            f"{cfg.batch_wait_timeout_s * 1e3:g} ms. Nodes: -p backend:=ray -p ray.address:={address} "
            f"-p ray.app:={cfg.app}. Ctrl-C stops.",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    except Exception as err:  # a replica that cannot load, a cluster that cannot be joined: one line
        print(f"atp-serve: {one_line(err)}", file=sys.stderr)
        rc = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the shutdown short
        shutdown(cfg.app if deployed else None)
    return rc


def shutdown(app: str | None) -> None:
    """Undo a deploy: delete ``app`` (its replicas stop; None: nothing to delete), then leave Ray.

    A local instance ends with this process's ``ray.shutdown`` (Serve with it); on a joined
    cluster Serve and any other apps stay. (``serve.shutdown`` first would only add Ray's
    warning about the controller it kills.)
    """
    if not ray.is_initialized():
        return
    try:
        if app is not None:
            serve.delete(app)
    finally:
        ray.shutdown()


def cluster_address() -> str:
    """The GCS address of the Ray cluster this process is connected to (what clients join)."""
    return ray.get_runtime_context().gcs_address


if __name__ == "__main__":
    sys.exit(main())
