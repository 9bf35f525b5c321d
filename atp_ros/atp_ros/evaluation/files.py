"""Writing result files so that no reader ever sees half of one: a temp file per writer, then a rename."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path, data: str | bytes | Callable[[Path], None]) -> None:
    """``path`` with ``data`` (text, bytes, or a function that writes the file it is given), all or nothing.

    The temp file's name is unique per process and write, so evaluations sharing an ``--out``
    never write into each other's; an interrupted write leaves the old file (or none) behind.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            data(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
