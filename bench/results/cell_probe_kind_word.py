"""Probe (outside the package): does a cell model's answer to "where is the <color> <kind>?" depend on the kind word?
On the closed loop's contrast tasks (seeds 1000-1049 whose item shares its color with an item of the other kind on
the racking), ask `where` with the first six training phrasings about the named kind and about the other kind, on
the task's first frame with every token, and count answers that are right, that name the twin's slot, and that are
the same for both kinds (a model that ignores the kind word gives the same slot to both).

Run: PYTHONPATH=atp_ros MUJOCO_GL=egl python bench/results/cell_probe_kind_word.py --model out/warehouse-cell
"""

import argparse
import json

import numpy as np
from atp_ros.backends import AtpConfig, load_backend
from atp_ros.cell_loop.evaluate import choose_task
from atp_ros.cell_loop.sim import CellSim
from atp_ros.warehouse.cell.grammar import phrasings, render_template

OTHER = {"box": "tote", "tote": "box"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--seeds", type=int, nargs=2, default=(1000, 1050))
    ap.add_argument("--phrasings", type=int, default=6)
    args = ap.parse_args()
    backend, sim = load_backend(args.model), CellSim()
    templates = phrasings("where", "train")[: args.phrasings]
    counts = {"contrast_tasks": 0, "asked": 0, "right": 0, "twin_slot": 0, "same_for_both_kinds": 0}
    try:
        for seed in range(*args.seeds):
            sim.reset(seed)
            truth = sim.truth()
            chosen = choose_task(truth.to_json(), seed)
            if chosen is None or not chosen[1]["contrast"]:
                continue
            task, target = chosen
            item = next(o for o in truth.objects if o.id == target["id"])
            shelf = [o for o in truth.objects if o.place == "shelf"]
            twin = next(o for o in shelf if o.color == item.color and o.kind == OTHER[item.kind])
            questions = [
                render_template(t, {"color": item.color, "object_kind": kind}, np.random.default_rng(i))
                for kind in (item.kind, twin.kind)
                for i, t in enumerate(templates)
            ]
            full = AtpConfig(enabled=False)
            answers = [a.strip() for a in backend.answer([sim.rgb()] * len(questions), questions, atp=full).answers]
            named, other = answers[: len(templates)], answers[len(templates) :]
            counts["contrast_tasks"] += 1
            counts["asked"] += len(named)
            counts["right"] += sum(a == target["where"] for a in named)
            counts["twin_slot"] += sum(a == f"{twin.level}-{twin.slot}" for a in named)
            counts["same_for_both_kinds"] += sum(a == b for a, b in zip(named, other, strict=True))
    finally:
        sim.close()
    print(json.dumps({"model": args.model, **counts}))


if __name__ == "__main__":
    main()
