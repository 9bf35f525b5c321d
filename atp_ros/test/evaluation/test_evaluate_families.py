"""``evaluate`` through ``--model`` with the families whose token grid follows the frame (Qwen2.5-VL, SmolVLM2):
a warehouse bag written by the warehouse writer, the offline sweep through ``main``, per-frame token counts,
evidence recall on each frame's own grid, and the overlays of the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from atp_ros.evaluation.cli import main
from atp_ros.warehouse.cli import write_bag


@pytest.fixture(scope="module")
def bag(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bags") / "warehouse"
    write_bag(path, "test", 4, 0, 10.0, (240, 320), 4)
    return path


def _qwen(root: Path) -> tuple[Path, int]:
    from atp_ros.testing.tiny.qwen2_5_vl import save_tiny_qwen2_5_vl

    # 320x240 -> smart_resize within 64x64 px: 48x72 px = 12x18 patches = 6x9 = 54 LLM tokens
    return save_tiny_qwen2_5_vl(root / "qwen", with_text_tower=False), 54


def _smolvlm(root: Path) -> tuple[Path, int]:
    pytest.importorskip("num2words")
    from atp_ros.testing.tiny.smolvlm import save_tiny_smolvlm

    # 320x240 -> 64x48 px -> 2x2 tiles of 4x4 tokens (+ the global tile, not counted)
    return save_tiny_smolvlm(root / "smolvlm"), 64


@pytest.mark.parametrize("build", [_qwen, _smolvlm], ids=["qwen2_5_vl", "smolvlm"])
def test_offline_sweep_with_a_per_frame_grid_family(build, bag: Path, tmp_path: Path, capsys) -> None:
    model, n = build(tmp_path)
    out = tmp_path / "report"
    argv = ["--bag", str(bag), "--model", str(model), "--device", "cpu", "--out", str(out)]
    argv += ["--keep-ratios", "0.25", "--alphas", "0", "--selectors", "atp", "--bootstrap", "50"]
    assert main(argv) == 0, capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    by_name = {r["name"]: r["summary"] for r in results["settings"]}
    full, atp = by_name["full"], by_name["atp a=0 k=0.25"]
    assert full["tokens_kept"]["mean"] == n and full["fidelity"]["mean"] == 1.0  # keep-all answers as stock
    assert atp["tokens_kept"]["mean"] == math.ceil(0.25 * n) and atp["flops_prefill"] < full["flops_prefill"]
    assert (out / "overlays.png").stat().st_size > 1000
