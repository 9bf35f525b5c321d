"""Deprecated alias of the serving modules' public names (kept for one release).

Import from the modules instead: ``atp_ros.serving.client`` (RemoteBackend),
``server`` (deploy, AtpVlmServer), ``cluster`` (start_ray, shutdown), ``config``
(ServeConfig), ``wire`` (ServeRequest, encode/decode), ``payload``, ``cli`` (main).
"""

from __future__ import annotations

import sys

from atp_ros.serving.cli import config_from_args, main, parse_args
from atp_ros.serving.client import POLL_S, RemoteBackend
from atp_ros.serving.cluster import NAMESPACE, SERVICE_ERRORS, cluster_address, one_line, shutdown, start_ray
from atp_ros.serving.config import DEFAULT_APP, SECTIONS, ServeConfig, code_version, config_from_yaml
from atp_ros.serving.payload import Payload, embedding_payload
from atp_ros.serving.server import (
    MAX_FORMED,
    QUIET,
    AtpVlmServer,
    Coalescer,
    answer_requests,
    backend_metadata,
    build_app,
    deploy,
)
from atp_ros.serving.wire import Image, ServedResult, ServeRequest, decode_image, encode_image

__all__ = [
    "DEFAULT_APP",
    "MAX_FORMED",
    "NAMESPACE",
    "POLL_S",
    "QUIET",
    "SECTIONS",
    "SERVICE_ERRORS",
    "AtpVlmServer",
    "Coalescer",
    "Image",
    "Payload",
    "RemoteBackend",
    "ServeConfig",
    "ServeRequest",
    "ServedResult",
    "answer_requests",
    "backend_metadata",
    "build_app",
    "cluster_address",
    "code_version",
    "config_from_args",
    "config_from_yaml",
    "decode_image",
    "deploy",
    "embedding_payload",
    "encode_image",
    "main",
    "one_line",
    "parse_args",
    "shutdown",
    "start_ray",
]

if __name__ == "__main__":
    sys.exit(main())
