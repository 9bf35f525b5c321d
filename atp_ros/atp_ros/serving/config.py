"""What ``atp-serve`` deploys: :class:`ServeConfig`, read from ``config/serve.yaml``; no Ray here."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

DEFAULT_APP = "atp_vlm"  # the node's ray.app default


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
        """ValueError naming the first bad setting: every number finite and in range, counts whole."""
        if not self.app or not self.model_id:
            raise ValueError("app and model.model_id must not be empty")
        for name, low in LOWEST.items():
            value = getattr(self, name)
            whole = isinstance(getattr(ServeConfig, name), int)  # the field's default says its type
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or (whole and value != int(value)):
                raise ValueError(f"{label(name)} must be {'an integer' if whole else 'a finite number'}, got {value!r}")
            if value < low:
                raise ValueError(f"{label(name)} must be >= {low}, got {value!r}")

    @property
    def ongoing(self) -> int:
        """Requests a replica takes at once (``max_ongoing_requests``, or its default)."""
        return self.max_ongoing_requests or max(2 * self.max_batch_size, 8)

    def model_kwargs(self) -> dict[str, str]:
        """The replica's ``load_backend`` arguments."""
        return {
            "model_id": self.model_id,
            "text_encoder_id": self.text_encoder_id,
            "device": self.device,
            "dtype": self.dtype,
        }

    def user_config(self) -> dict[str, Any]:
        """The settings a running replica takes in place (Serve's ``user_config``)."""
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


# Numeric settings -> the least each may be.
LOWEST: dict[str, int] = {
    "num_replicas": 1,
    "max_batch_size": 1,
    "ray_num_cpus": 0,
    "num_cpus": 0,
    "num_gpus": 0,
    "max_ongoing_requests": 0,
    "batch_wait_timeout_s": 0,
}
NO_FLAG = frozenset({"ray_num_cpus", "max_ongoing_requests"})  # settings only serve.yaml sets


def label(name: str) -> str:
    """How a user finds setting ``name``: its serve.yaml key and its atp-serve flag."""
    key = next(f"{section}.{k}".lstrip(".") for section, keys in SECTIONS.items() for k, v in keys.items() if v == name)
    flag = "" if name in NO_FLAG else f" / --{name.replace('_', '-')}"
    return f"{key}{flag}"


def _typed(value: Any, kind: type) -> Any:
    """``value`` of a serve.yaml key as ``kind``; ValueError unless it is one (2.9 is no integer)."""
    if kind is str:
        return "" if value is None else str(value)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError
    number = float(value)
    if kind is int:
        if not math.isfinite(number) or number != int(number):
            raise ValueError
        return int(number)
    return number


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
                values[name] = _typed(value, types[name])
            except (TypeError, ValueError):
                what = {int: "an integer", float: "a number"}[types[name]]
                raise ValueError(f"{path}: {section}.{key} must be {what}, got {value!r}") from None
    cfg = replace(base, **values)
    try:
        cfg.check()
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return cfg


def code_version(cfg: ServeConfig) -> str:
    """What the replicas run: the model settings, atp_ros's version and the serving package's source.

    Serve gives a deployment without a version a random one, so every deploy would restart the
    replicas (reloading the model) even when only ``user_config`` changed. With a version that
    stays the same for the same code and model, Serve reconfigures running replicas in place.
    """
    from atp_ros import __version__

    digest = hashlib.sha1((json.dumps(cfg.model_kwargs(), sort_keys=True) + __version__).encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:16]
