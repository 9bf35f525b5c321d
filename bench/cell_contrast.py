"""Replay-evaluation accuracy on a cell test set, the contrast questions apart: those naming an item by color and
object kind whose color an item of the other kind shares on the racking ("where is the red box?" with a red tote
on a shelf), against the other questions of the same kinds. Reads an ``evaluation.cli`` output's per-setting cache
and the dataset it ran on (``warehouse generate --world cell``; each frame's truth is rebuilt from its ``seed``).

    PYTHONPATH=atp_ros MUJOCO_GL=egl python bench/cell_contrast.py --dataset out/fresh_test_5000 \\
        --eval out/fresh_eval_14 [--json bench/results/cell_contrast_fresh.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from atp_ros.warehouse.cell.episodes import random_still
from atp_ros.warehouse.cell.questions import CONTRAST_KINDS, is_contrast
from PIL import Image
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

GROUPS = ("contrast", "otherwise")


def contrast_flags(dataset: Path) -> tuple[list[dict], list[bool | None]]:
    """The dataset's samples and, per sample, whether it is a contrast question (None: not a contrast kind)."""
    samples = [json.loads(line) for line in (dataset / "samples.jsonl").read_text().splitlines() if line.strip()]
    truths: dict[tuple, object] = {}
    flags: list[bool | None] = []
    for s in tqdm(samples, desc="truth", unit="q"):
        if s["kind"] not in CONTRAST_KINDS:
            flags.append(None)
            continue
        key = s["seed"], s["image"]
        if key not in truths:
            width, height = Image.open(dataset / s["image"]).size
            truths[key] = random_still(s["seed"], width=width, height=height).truth
        flags.append(is_contrast(truths[key], s["kind"], s["slots"]))
    return samples, flags


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--eval", type=Path, required=True, help="an evaluation.cli --out folder (its cache/)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    samples, flags = contrast_flags(args.dataset)
    rows = []
    for path in sorted((args.eval / "cache").glob("*.json")):
        cached = json.loads(path.read_text())
        setting = cached["setting"]
        records = cached["records"]
        records = records if isinstance(records, list) else list(records.values())
        groups: dict[str, list[float]] = {}
        for rec in records:
            i = int(rec["key"]) - 1  # dataset keys are 1-based line numbers
            if flags[i] is None:
                continue
            name = f"{samples[i]['kind']}/{'contrast' if flags[i] else 'otherwise'}"
            groups.setdefault(name, []).append(float(rec["accuracy"]))
            groups.setdefault("all/" + ("contrast" if flags[i] else "otherwise"), []).append(float(rec["accuracy"]))
        rows.append(
            {
                "selector": setting["selector"],
                "keep_ratio": setting["keep_ratio"],
                "groups": {
                    k: {"accuracy": round(float(np.mean(v)), 3), "n": len(v)} for k, v in sorted(groups.items())
                },
            }
        )
    rows.sort(key=lambda r: (r["selector"] != "keep_all", r["selector"], -r["keep_ratio"]))
    kinds = ["all", *sorted({g.split("/")[0] for r in rows for g in r["groups"]} - {"all"})]
    table = Table(title=f"{args.eval}: accuracy on contrast questions / on the others of the same kinds")
    table.add_column("setting")
    for k in kinds:
        n = [next((r["groups"][f"{k}/{c}"]["n"] for r in rows if f"{k}/{c}" in r["groups"]), 0) for c in GROUPS]
        table.add_column(f"{k} (n={n[0]}/{n[1]})", justify="right")
    for r in rows:
        cells = [
            " / ".join(
                f"{r['groups'][f'{k}/{c}']['accuracy']:.2f}" if f"{k}/{c}" in r["groups"] else "-" for c in GROUPS
            )
            for k in kinds
        ]
        table.add_row(f"{r['selector']} {r['keep_ratio']}", *cells)
    Console(width=200).print(table)
    if args.json:
        meta = {"dataset": str(args.dataset), "eval": str(args.eval)}
        args.json.write_text(json.dumps({"meta": meta, "settings": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
