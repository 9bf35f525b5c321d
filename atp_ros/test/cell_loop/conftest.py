"""Fixtures of the cell-loop tests: a cell model from the trainer's quick mode (answers badly: tests assert
behaviour, never task success)."""

from __future__ import annotations

import contextlib

import pytest

# Import order matters in one process: torch's compiler stack (torchvision -> torch._dynamo -> triton) segfaults
# when triton's LLVM loads after a MuJoCo EGL renderer has loaded the GL driver's. The whole suite imports it at
# collection (the backend tests); this folder run alone must too, before its first render.
with contextlib.suppress(ImportError):
    import torch._dynamo  # noqa: F401


@pytest.fixture(scope="session")
def quick_cell_model(tmp_path_factory: pytest.TempPathFactory):
    """A warehouse-cell checkpoint from ``python -m atp_ros.warehouse.cell.model --quick`` (about a minute)."""
    pytest.importorskip("atp_ros.warehouse.cell.scene")  # sets MUJOCO_GL (egl) before MuJoCo loads
    from atp_ros.warehouse.cell.model.__main__ import main

    root = tmp_path_factory.mktemp("cell_quick")
    assert main(["--out", str(root / "model"), "--work", str(root / "work"), "--quick"]) == 0
    return root / "model"
