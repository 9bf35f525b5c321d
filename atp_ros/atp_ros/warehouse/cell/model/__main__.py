"""``python -m atp_ros.warehouse.cell.model --out DIR --work DIR [--quick] [--fresh] [--set FIELD=VALUE ...]``."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from atp_ros.warehouse.cell.grammar import TEMPLATES
from atp_ros.warehouse.cell.model import QUICK, Recipe
from atp_ros.warehouse.cell.model import __doc__ as DOC


def main(argv: list[str] | None = None) -> int:
    """Train (or resume, or find finished) the cell model; 0 when the checkpoint and its report are written."""
    ap = argparse.ArgumentParser(prog="python -m atp_ros.warehouse.cell.model", description=DOC.splitlines()[0])
    ap.add_argument("--out", default="out/warehouse-cell", help="where the checkpoint directory goes")
    ap.add_argument("--work", default="out/train-cell", help="resumable state (saved every few minutes)")
    ap.add_argument("--fresh", action="store_true", help="ignore saved state and start over")
    ap.add_argument("--init-from", type=Path, default=None, metavar="CKPT",
                    help="a trained cell checkpoint (e.g. the bundled warehouse-cell) whose recipe matches up to "
                         "phase 4: its weights stand for phases 1-4 and the run goes on with phase 5")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny counts), not the model")
    ap.add_argument("--checkpoint-every", type=float, default=180.0, help="seconds between saved states")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a Recipe field (e.g. --set bf16=false --set llava_turns=6); a change after "
                         "the CLIP phase keeps the saved CLIP and restarts the LLaVA phase")  # fmt: skip
    args = ap.parse_args(argv)
    try:
        overrides = recipe_overrides(args.set)
    except ValueError as err:
        ap.error(str(err))
    recipe = Recipe(**{"seed": args.seed, **(QUICK if args.quick else {}), **overrides})
    from atp_ros.warehouse.cell.model.run import CellTrainer

    init = args.init_from
    if init is not None:
        from atp_ros.backends import ModelLoadError, resolve_model_id

        try:
            init = Path(resolve_model_id(str(init)))  # a bundled name, as the node takes it
        except ModelLoadError as err:
            ap.error(str(err))
        if not init.is_dir():
            ap.error(f"--init-from {init}: no such checkpoint directory")
    CellTrainer(Path(args.work), recipe, args.fresh, init_from=init).run(Path(args.out), args.checkpoint_every)
    return 0


def recipe_overrides(items: list[str]) -> dict:
    """``["bf16=false", "llava_turns=6"]`` -> typed ``Recipe`` fields; ValueError naming a bad item."""
    types = {f.name: type(f.default) for f in fields(Recipe)}
    out: dict = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in types:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(types)}")
        kind = types[name]
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                out[name] = text.lower() in ("true", "1")
            elif kind is tuple:
                out[name] = tuple(v for v in text.split(",") if v)
            else:
                out[name] = kind(text)
        except ValueError:
            raise ValueError(f"--set {item!r}: {text!r} is not a {kind.__name__}") from None
        unknown = [v for v in out[name] if v not in TEMPLATES] if name.endswith("hard_kinds") else []
        if unknown:
            raise ValueError(f"--set {item!r}: {unknown[0]!r} is not a question kind (known: {', '.join(TEMPLATES)})")
    return out


if __name__ == "__main__":
    sys.exit(main())
