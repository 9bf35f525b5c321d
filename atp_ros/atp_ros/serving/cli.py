"""``atp-serve --config serve.yaml``: start (or join) a Ray cluster, deploy the app, serve until
Ctrl-C (or SIGTERM), then shut down what it started."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from ray import serve

from atp_ros.serving.cluster import cluster_address, one_line, shutdown, start_ray
from atp_ros.serving.config import DEFAULT_APP, ServeConfig, config_from_yaml
from atp_ros.serving.server import deploy


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    """atp-serve's flags (each unset one is None: serve.yaml or the default decides)."""
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


def _ready_line(cfg: ServeConfig, address: str) -> str:
    """What atp-serve prints once the app runs: the deployment and the node parameters that reach it."""
    return (
        f"atp-serve: app {cfg.app!r} ready: {cfg.model_id}, {cfg.num_replicas} replica(s) x "
        f"{cfg.num_cpus:g} CPU / {cfg.num_gpus:g} GPU, batches of <= {cfg.max_batch_size} requests, wait "
        f"{cfg.batch_wait_timeout_s * 1e3:g} ms. Nodes: -p backend:=ray -p ray.address:={address} "
        f"-p ray.app:={cfg.app}. Ctrl-C stops."
    )


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
        signal.signal(signal.SIGTERM, _interrupt)  # again: ray.init put in its own, which exits mid-flight
        try:
            deploy(cfg)
        except RuntimeError as err:
            raise RuntimeError(_deploy_failure(cfg.app, err)) from None
        deployed = True
        print(_ready_line(cfg, cluster_address()), flush=True)
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


if __name__ == "__main__":
    sys.exit(main())
