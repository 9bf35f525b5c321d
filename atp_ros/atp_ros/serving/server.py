"""The deployment: :class:`AtpVlmServer`, one ATP-gated VLM replica answering batched requests.

Requests (:class:`~atp_ros.serving.wire.ServeRequest`) wait in ``@serve.batch``. Of each batch
Ray forms, the requests that share ``(AtpConfig, max_new_tokens)`` go through ONE
``backend.answer`` call (every image still gets its own K, e.g. with ``mass > 0``); different
settings make separate calls. The call's result is split back per request
(:meth:`VlmResult.part`) into a :class:`~atp_ros.serving.wire.ServedResult` that also says how
large the batch was.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
from ray import serve

from atp_ros.backends.streaming import answer_on_stream
from atp_ros.method import AtpConfig
from atp_ros.serving import ray_compat
from atp_ros.serving.config import ServeConfig, code_version
from atp_ros.serving.wire import ServedResult, ServeRequest, checked_frames
from atp_ros.stream import StreamCache

MAX_FORMED = 64  # formed batches handed to the coalescer at once (bounded by max_ongoing_requests anyway)
QUIET = {"log_level": "WARNING", "enable_access_log": False}  # Serve logging: errors and warnings only


def answer_requests(
    backend: Any, requests: Sequence[ServeRequest], streams: dict[str, StreamCache] | None = None
) -> list[ServedResult | Exception]:
    """Answer one formed batch: one ``backend.answer`` per distinct (AtpConfig, max_new_tokens).

    Every request is checked on arrival with the node's own image limits; one that fails gets
    its own ValueError and never reaches the model. When a shared call fails anyway, its
    requests are answered again one by one, so only the request that fails alone gets the
    error. A stream's frame with reuse on (``ServeRequest.streamed``) is answered alone with its
    stream's state in ``streams`` (``backends.streaming``: the cached answer, or the model with
    token reuse). Results come back in request order.
    """
    out: list[ServedResult | Exception | None] = [None] * len(requests)
    groups: dict[tuple[AtpConfig, int], list[tuple[int, list[np.ndarray]]]] = {}
    for i, request in enumerate(requests):
        try:
            frames = checked_frames(request)
            if request.streamed:
                out[i] = _answer_streamed(backend, request, frames[0], streams if streams is not None else {},
                                          len(requests))  # fmt: skip
                continue
            groups.setdefault(request.key, []).append((i, frames))
        except ValueError as err:  # a plain ValueError: it travels back through Ray whatever its type
            out[i] = ValueError(f"request rejected: {err}")
        except Exception as err:  # anything else a malformed request trips over stays its own
            out[i] = ValueError(f"request rejected: {type(err).__name__}: {err}")
    for members in groups.values():
        try:
            _answer_call(backend, requests, members, out)
        except Exception as err:
            if len(members) == 1:
                out[members[0][0]] = err
                continue
            for member in members:  # one request broke the shared call: the others must not fail with it
                try:
                    _answer_call(backend, requests, [member], out)
                except Exception as alone:
                    out[member[0]] = alone
    return out  # type: ignore[return-value]  # every slot was filled above


def _answer_streamed(
    backend: Any, request: ServeRequest, rgb: np.ndarray, streams: dict[str, StreamCache], batch: int
) -> ServedResult | Exception:
    """One stream frame with its stream's reuse state (a new reuse config starts the stream afresh)."""
    cache = streams.get(request.stream)
    if cache is None or cache.config != request.reuse:
        cache = streams[request.stream] = StreamCache(request.reuse)
    try:
        step = answer_on_stream(
            backend, cache, rgb, request.questions[0], request.atp, request.max_new_tokens, request.stamp_s
        )
    except Exception as err:
        return err
    call = uuid.uuid4().hex[:12]
    return ServedResult(step.result.part(0, 1), batch, 1, call, 0, reused=step.reuse, recomputed=step.recomputed)


def _answer_call(
    backend: Any,
    requests: Sequence[ServeRequest],
    members: list[tuple[int, list[np.ndarray]]],
    out: list[ServedResult | Exception | None],
) -> None:
    """One ``backend.answer`` over ``members`` (request index, frames), split back into ``out``."""
    atp, max_new_tokens = requests[members[0][0]].key
    images = [frame for _, frames in members for frame in frames]
    questions = [q for i, _ in members for q in requests[i].questions]
    result = backend.answer(images, questions, atp, max_new_tokens)
    call_id = uuid.uuid4().hex[:12]
    offset = 0
    for i, frames in members:
        part = result.part(offset, offset + len(frames))
        out[i] = ServedResult(part, len(requests), len(images), call_id, offset)
        offset += len(frames)


def backend_metadata(backend: Any) -> dict[str, Any]:
    """What a client needs to stand in for ``backend`` (plain values, picklable anywhere)."""
    return {
        "family": backend.family,
        "model_id": backend.model_id,
        "device": str(backend.device),
        "dtype": str(backend.dtype),
        "num_visual_tokens": int(backend.num_visual_tokens),
        "grid": tuple(int(g) for g in backend.grid) if backend.grid is not None else None,
        "load_notes": list(backend.load_notes),
        "describe": backend.describe(),
    }


class Coalescer:
    """Runs the batches Serve forms on the model one at a time, merging those that queued meanwhile.

    ``@serve.batch`` closes a batch when its wait ends, even while the model is still busy with
    the previous one, and queues it as it is: under a steady load (cameras whose next request
    leaves when their answer arrives) those batches are mostly single requests. Here every
    formed batch joins one pending list, and whenever the model is free it takes all that is
    pending, up to ``max_batch_size``, in one run.
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

        ray_compat.keep_replica_on_loopback()
        self.backend = load_backend(**model)
        self.streams: dict[str, StreamCache] = {}  # per camera stream: its reuse state (one model thread uses it)
        self.model = Coalescer(partial(answer_requests, self.backend, streams=self.streams))
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
        """The backend's metadata and the batching settings in force."""
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


def build_app(cfg: ServeConfig) -> serve.Application:
    """The Serve application of ``cfg`` (replicas, actor resources, batching as user_config)."""
    return ray_compat.versioned_options(
        AtpVlmServer,
        code_version(cfg),
        num_replicas=cfg.num_replicas,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        max_ongoing_requests=cfg.ongoing,
        user_config=cfg.user_config(),
    ).bind(cfg.model_kwargs())


def deploy(cfg: ServeConfig) -> Any:
    """Deploy (or update in place) ``cfg``'s app on the connected Ray cluster; its handle once it runs.

    Serve starts without an HTTP proxy (clients use handles). Changing only the batching
    settings reconfigures running replicas without reloading the model.
    """
    serve.start(proxy_location="Disabled", logging_config=QUIET)
    return serve.run(build_app(cfg), name=cfg.app, route_prefix=None, logging_config=QUIET)
