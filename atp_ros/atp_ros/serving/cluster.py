"""This process and its Ray cluster: joining or starting one, finding it, leaving it, and the
errors that mean the service is gone; shared by ``atp-serve`` and its client."""

from __future__ import annotations

import logging
import socket

import ray
from ray import serve
from ray.serve.exceptions import RayServeException

from atp_ros.backends.errors import ServiceUnavailable
from atp_ros.serving import ray_compat

NAMESPACE = "atp_ros"  # the Ray namespace of atp-serve and its clients
# What a lost service looks like from a client: no Serve or no app, a dead replica, a lost connection.
SERVICE_ERRORS: tuple[type[BaseException], ...] = (
    RayServeException,
    ray.exceptions.RayActorError,
    ray.exceptions.RaySystemError,
    ray.exceptions.ObjectLostError,
    ConnectionError,
)


def start_ray(address: str = "", num_cpus: int = 0) -> bool:
    """Connect this process to Ray: join ``address``, or start a local instance when it is empty
    (bound to 127.0.0.1: nothing outside this machine reaches it).

    Returns True when this process started the instance (it ends with this process).
    """
    quiet = {"namespace": NAMESPACE, "log_to_driver": False, "logging_level": logging.WARNING}
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no INFO line per handle and router
    if address:
        ray_compat.enable_token_auth()
        found = address if address.startswith("ray://") else resolve(address)
        if not found.startswith("ray://") and ray_compat.on_loopback(found):  # a loopback instance: this driver too
            ray_compat.init_on_loopback(address=found, **quiet)
        else:
            ray.init(address=address, **quiet)
        return False
    ray_compat.run_workers_unniced()
    ray_compat.init_on_loopback(num_cpus=num_cpus or None, include_dashboard=False, **quiet)
    return True


def cluster_address() -> str:
    """The GCS address of the Ray cluster this process is connected to (what clients join)."""
    return ray.get_runtime_context().gcs_address


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


def one_line(err: BaseException, limit: int = 300) -> str:
    """A readable single line for an exception (Ray's carry remote tracebacks over many lines)."""
    text = str(err)
    for line in text.splitlines():  # a replica that failed to load says why on the ModelLoadError line
        if "ModelLoadError:" in line:
            return line.split("ModelLoadError:", 1)[1].strip()[:limit]
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    return first[:limit]


def lost(err: BaseException) -> str:
    """Why a service error means the service is gone, on one line with the error's kind."""
    return f"{type(err).__name__}: {one_line(err)}"


def probe(address: str, timeout: float) -> None:
    """ServiceUnavailable unless a TCP connection to ``host:port`` opens within ``timeout``.

    ``ray.init`` on an address nobody listens at retries for minutes; this answers at once.
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as err:
        raise ServiceUnavailable(f"Ray at {address} is unreachable ({err})") from None


def resolve(address: str) -> str:
    """``auto`` (or RAY_ADDRESS) -> the host:port of a running cluster; others unchanged.

    A loopback address stays loopback when a cluster listens there (atp-serve's own local
    instance); otherwise it becomes this machine's interface address, as Ray has it.
    """
    if address.startswith("ray://"):
        return address
    try:
        here = ray_compat.canonical_address(address, keep_loopback=True)
        if here is not None and ray_compat.on_loopback(here) and _listening(here):
            return here
        found = ray_compat.canonical_address(address)
    except ConnectionError as err:  # "auto" and no cluster running here
        raise ServiceUnavailable(f"no Ray cluster found for address {address!r} ({one_line(err)})") from None
    if found is None:
        raise ServiceUnavailable(f"no Ray cluster found for address {address!r}")
    return found


def _listening(address: str) -> bool:
    try:
        probe(address, 1.0)
    except ServiceUnavailable:
        return False
    return True
