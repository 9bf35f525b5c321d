"""Fast DDS shared-memory segments left behind by processes that died (``/dev/shm/fastdds_*``).

A participant killed by a signal never unlinks its segments; a test suite that starts and kills
nodes leaves about a gigabyte per run on this machine. :func:`orphaned_segments` lists the ones
no live process has mapped or open, created after a given time (so another user's or a running
system's segments are left alone); the test session removes them when it ends.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

SHM = Path("/dev/shm")


def _in_use() -> set[str]:
    """Names under /dev/shm that a live process maps or holds open."""
    names: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for line in (proc / "maps").read_text().splitlines():
                if "/dev/shm/" in line:
                    names.add(line.rsplit("/dev/shm/", 1)[1].split(" ")[0])
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("/dev/shm/"):
                        names.add(target[len("/dev/shm/") :])
    return names


def orphaned_segments(since: float, root: Path = SHM) -> list[Path]:
    """Fast DDS files in ``root`` modified at or after ``since`` (epoch seconds) that no live process uses."""
    if not root.is_dir():
        return []
    used = _in_use() if root == SHM else set()
    out = []
    for path in root.iterdir():
        name = path.name
        if not (name.startswith("fastdds_") or name.startswith("sem.fastdds_")) or name in used:
            continue
        with contextlib.suppress(OSError):
            if path.stat().st_mtime >= since:
                out.append(path)
    return out


def remove_orphaned_segments(since: float) -> int:
    """Delete :func:`orphaned_segments`; how many went."""
    gone = 0
    for path in orphaned_segments(since):
        with contextlib.suppress(OSError):
            path.unlink()
            gone += 1
    return gone


__all__ = ["orphaned_segments", "remove_orphaned_segments"]
