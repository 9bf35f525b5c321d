"""Fixtures of the cell-loop tests: a cell model from the trainer's quick mode (answers badly: tests assert
behaviour, never task success)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def quick_cell_model(tmp_path_factory: pytest.TempPathFactory):
    """A warehouse-cell checkpoint from ``python -m atp_ros.warehouse.cell.model --quick`` (about a minute)."""
    pytest.importorskip("atp_ros.warehouse.cell.scene")  # sets MUJOCO_GL (egl) before MuJoCo loads
    from atp_ros.warehouse.cell.model.__main__ import main

    root = tmp_path_factory.mktemp("cell_quick")
    assert main(["--out", str(root / "model"), "--work", str(root / "work"), "--quick"]) == 0
    return root / "model"
