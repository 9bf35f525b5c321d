"""Every use of Ray internals by atp_ros, in one place: what to re-check when Ray is upgraded.

Checked against Ray :data:`CHECKED_WITH` (``requirements/serve.txt``, ``constraints.txt``).
Each function names the private API it stands for; none of them is covered by Ray's
compatibility promises, so a new Ray version may move or drop any of them.
"""

from __future__ import annotations

import os
from typing import Any

CHECKED_WITH = "2.60.0"  # the Ray version these internals were read in


def versioned_options(deployment: Any, version: str, **options: Any) -> Any:
    """``deployment.options(**options)`` with an explicit code ``version``.

    Serve accepts ``version`` only with ``_internal=True`` (what its own config files pass); a
    deployment without one gets a random version, so every deploy would restart its replicas.
    """
    return deployment.options(version=version, _internal=True, **options)


def enable_token_auth() -> None:
    """Use this user's Ray token (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN``) when there is one.

    Ray turns token authentication on by itself only for clusters it finds with ``auto``; a local
    instance (``ray.init``, ``ray start``) requires it, so an explicit address needs it too.
    Private: ``ray._private.authentication.authentication_token_setup``.
    """
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def canonical_address(address: str, keep_loopback: bool = False) -> str | None:
    """The ``host:port`` of the cluster ``address`` names (``auto``: the one running here), None if none.

    Ray turns a loopback host into this machine's interface address; ``keep_loopback`` keeps
    it (what a loopback-only instance needs). Raises ConnectionError when ``auto`` finds no
    cluster. Private: ``ray._private.services``, ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``.
    """
    from ray._private import ray_constants
    from ray._private.services import canonicalize_bootstrap_address

    flag = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = flag and not keep_loopback
    try:
        return canonicalize_bootstrap_address(address)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = flag


def forget_controller() -> None:
    """Drop Serve's cached handle of its controller in this process (``ray.serve.context._disconnect``).

    Serve keeps it for the whole Ray session; after Serve was shut down and started again it
    names a dead actor, and every later ``get_app_handle`` would fail. Without it, the next one
    finds the live controller by name.
    """
    from ray.serve import context

    context._disconnect()


def controller_client() -> Any:
    """Serve's cached controller client of this process (``ray.serve.context._global_client``)."""
    from ray.serve import context

    return context._global_client


def set_controller_client(client: Any) -> None:
    """Replace Serve's cached controller client (``ray.serve.context._set_global_client``)."""
    from ray.serve import context

    context._set_global_client(client)


def run_workers_unniced() -> None:
    """Start Ray's workers at niceness 0 unless the environment says otherwise.

    Ray starts them at 15 (its ``RAY_worker_niceness`` system config); the replica is the
    service, and a niced model falls far behind whatever else shares a robot computer's cores.
    """
    os.environ.setdefault("RAY_worker_niceness", "0")


def init_on_loopback(**options: Any) -> None:
    """``ray.init(**options)`` on loopback: a local instance that listens on 127.0.0.1 only, or a
    driver joining such an instance (``address`` on 127.0.0.1).

    ``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough: Ray replaces a loopback
    address by the machine's interface address unless its cluster mode is off
    (``ray._private.ray_constants.ENABLE_RAY_CLUSTER``, env ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``),
    so both are switched off while Ray starts (the processes it starts inherit the setting). A
    driver joining with the interface address would wait forever for a raylet there.
    """
    import ray
    from ray._private import ray_constants

    env, flag = os.environ.get(_CLUSTER_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTER_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(_node_ip_address=LOOPBACK, **options)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = flag
        if env is None:
            os.environ.pop(_CLUSTER_ENV, None)
        else:
            os.environ[_CLUSTER_ENV] = env


def on_loopback(address: str) -> bool:
    """Whether ``host:port`` names this machine's loopback interface."""
    host = address.removeprefix("ray://").rpartition(":")[0].strip("[]")
    return host in (LOOPBACK, "localhost", "::1")


def keep_replica_on_loopback() -> None:
    """In a replica of a loopback-only instance, bind Serve's inter-deployment gRPC server to loopback.

    Serve binds it to every interface (``"[::]:0"`` in ``ray.serve._private.replica``), whatever
    address the node has. Called from the deployment's constructor, which Serve runs before it
    starts that server; a replica on a cluster node (not loopback) is left alone.
    """
    import ray
    from ray.serve._private import replica

    if ray.util.get_node_ip_address() != LOOPBACK or getattr(replica, "_atp_loopback", False):
        return
    bind = replica.add_port_to_grpc_server
    replica.add_port_to_grpc_server = lambda server, address: bind(server, address.replace("[::]", LOOPBACK))
    replica._atp_loopback = True


LOOPBACK = "127.0.0.1"
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
