"""Is CPU bfloat16 autocast worth it for the cell model's training on this machine?

Times one training step of the bundled cell model's CLIP vision tower (forward and backward over a batch of
256 px frames, as phases 1, 1b and the tower touch-up run it) in float32 and under ``torch.autocast("cpu",
bfloat16)``, interleaved round by round so both see the same machine load, and reports the ratio next to
what the training run would choose here (``tower_precision``: bfloat16 only on a CPU with AVX512-BF16 or AMX).
Writes ``bench/results/cpu_bf16[_quick].json``.

    PYTHONPATH=atp_ros python bench/bench_cpu_bf16.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from atp_ros.warehouse.cell.model.recipe import IMAGE_SIZE, Recipe, native_bf16, tower_precision
from common import stamp
from rich.console import Console
from rich.progress import track
from rich.table import Table
from transformers import CLIPModel

MODEL = Path(__file__).resolve().parents[1] / "atp_ros" / "atp_ros" / "models" / "warehouse-cell" / "atp_text_tower"
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def step_seconds(vision, pixels: torch.Tensor, bf16: bool) -> float:
    """Wall seconds of one forward + backward of ``vision`` over ``pixels``."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        hidden = vision(pixel_values=pixels).last_hidden_state
    hidden.float().pow(2).mean().backward()
    vision.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller batch, fewer rounds")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    batch, rounds = (4, 2) if args.quick else (20, 5)
    torch.manual_seed(0)
    vision = CLIPModel.from_pretrained(MODEL, dtype=torch.float32).vision_model.train()
    pixels = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE)
    step_seconds(vision, pixels, False)  # warm-up: allocator and oneDNN kernels
    step_seconds(vision, pixels, True)
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for _ in track(range(rounds), description="fp32 / bf16 steps"):
        times["float32"].append(step_seconds(vision, pixels, False))
        times["bfloat16"].append(step_seconds(vision, pixels, True))
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        **stamp(),
        "what": f"one forward+backward of the cell CLIP vision tower, batch {batch} at {IMAGE_SIZE} px, median of "
        f"{rounds} interleaved rounds",
        "native_bf16": native_bf16(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "seconds_median": {k: round(v, 3) for k, v in median.items()},
        "bf16_over_fp32": round(median["bfloat16"] / median["float32"], 2),
        "training_chooses": tower_precision(Recipe()),
    }
    table = Table(title="CPU bfloat16 autocast vs float32 (tower training step)")
    for col in ("native bf16", "fp32 s", "bf16 s", "bf16 / fp32", "training runs in"):
        table.add_column(col)
    table.add_row(
        str(result["native_bf16"]),
        f"{median['float32']:.3f}",
        f"{median['bfloat16']:.3f}",
        f"{result['bf16_over_fp32']:.2f}",
        result["training_chooses"],
    )
    Console().print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cpu_bf16{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
