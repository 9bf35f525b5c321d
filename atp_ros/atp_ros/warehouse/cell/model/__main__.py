"""``python -m atp_ros.warehouse.cell.model --out DIR --work DIR [--quick] [--fresh]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from atp_ros.warehouse.cell.model import QUICK, Recipe
from atp_ros.warehouse.cell.model import __doc__ as DOC


def main(argv: list[str] | None = None) -> int:
    """Train (or resume, or find finished) the cell model; 0 when the checkpoint and its report are written."""
    ap = argparse.ArgumentParser(prog="python -m atp_ros.warehouse.cell.model", description=DOC.splitlines()[0])
    ap.add_argument("--out", default="out/warehouse-cell", help="where the checkpoint directory goes")
    ap.add_argument("--work", default="out/train-cell", help="resumable state (saved every few minutes)")
    ap.add_argument("--fresh", action="store_true", help="ignore saved state and start over")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny counts), not the model")
    ap.add_argument("--checkpoint-every", type=float, default=180.0, help="seconds between saved states")
    args = ap.parse_args(argv)
    recipe = Recipe(seed=args.seed, **(QUICK if args.quick else {}))
    from atp_ros.warehouse.cell.model.run import CellTrainer

    CellTrainer(Path(args.work), recipe, args.fresh).run(Path(args.out), args.checkpoint_every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
