"""Fixtures of the backend tests: a module's ``tester`` (one family, see ``backend_checks``) gives its tiny
checkpoint and backend; the contract module parametrizes ``tester`` over every family."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from atp_ros.backends import VlmBackend, load_backend
from backend_checks import FamilyTester, frames


@pytest.fixture(scope="module")
def ckpt(tester: FamilyTester, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The family's tiny checkpoint with its text tower, saved like a real one."""
    for module in tester.requires:
        pytest.importorskip(module)
    return tester.save(tmp_path_factory.mktemp(tester.name) / "tiny")


@pytest.fixture(scope="module")
def backend(ckpt: Path) -> VlmBackend:
    """That checkpoint loaded on the CPU through ``load_backend``."""
    return load_backend(str(ckpt), device="cpu")


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return frames()
