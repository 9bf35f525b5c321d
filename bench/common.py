"""What every benchmark shares: where results go and the machine/date stamp each results file carries."""

from __future__ import annotations

import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def stamp() -> dict:
    """Machine (CPU model, cores, threads, accelerator), library versions and the date."""
    from atp_ros.evaluation.report import machine

    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), **machine()}
