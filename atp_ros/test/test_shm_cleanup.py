"""The session's cleanup of Fast DDS shared-memory files that killed nodes leave in /dev/shm."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from atp_ros.testing.shm import SHM, orphaned_segments


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm")
def test_only_unused_segments_of_this_session_are_orphans() -> None:
    start = time.time() - 1.0
    tag = f"fastdds_atp_test_{os.getpid()}"
    dead, held, old = (SHM / f"{tag}_{name}" for name in ("dead", "held", "old"))
    paths: list[Path] = [dead, held, old]
    try:
        for p in paths:
            p.write_bytes(b"\0" * 64)
        os.utime(old, (start - 3600, start - 3600))  # from before the session: someone else's
        with open(held, "rb"):  # a live process (this one) holds it
            found = set(orphaned_segments(start))
        assert dead in found and held not in found and old not in found
    finally:
        for p in paths:
            p.unlink(missing_ok=True)
