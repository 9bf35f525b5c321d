"""``make model-card``: measure a warehouse VLM on a split, choose ATP's defaults on validation, report on test.

    python -m atp_ros.warehouse.model_card --model warehouse-tiny --out out/model_card [--images 600] [--world cell]

``--world flat`` (the default) asks the 2D world's template questions of ``warehouse-tiny``'s square
stills; ``--world cell`` asks the cell's questions of rendered 640x480 cell stills (validation
frames: the trainer's validation seeds; test frames: test seeds its end-of-training report does not
use; test questions worded only with phrasings training never saw).

1. **validation**: ATP (alpha x S_inter read-out x position mode) at keep 0.4 / 0.25 / 0.11;
   the defaults are the setting with the best mean accuracy over those budgets (evidence
   recall breaks ties). The test split is never used for a choice.
2. **test**: full-model accuracy per question kind; accuracy and evidence recall of every
   selector (ATP at the chosen defaults, cls_only, text_only, random, uniform, divprune) at
   keep {1.0, 0.6, 0.4, 0.25, 0.11}; ATP across alpha; position modes x read-outs x selectors.

Every setting is answered and scored by the ``evaluate`` sweep (``evaluation.sweep.answer_samples``):
an answer is right when ``evaluation.metrics.correct`` says so (VQA normalization, exact match
against any accepted answer), as in ``evaluate``, so the two accuracies are comparable.
Evidence recall = share of a question's evidence patches (``scenes.evidence_mask``) that
the selection kept (questions without evidence, e.g. a count of zero, are left out).
Writes ``model_card.json``, ``model_card.md`` (tables) and PNG plots to ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from atp_ros.backends import AtpConfig, load_backend
from atp_ros.evaluation.sources import Sample
from atp_ros.evaluation.sweep import answer_samples
from atp_ros.method import NORMALIZATIONS, PRUNING_SELECTORS
from atp_ros.warehouse.scenes import distinct_questions, render_scene, split_seed

KEEPS = (1.0, 0.6, 0.4, 0.25, 0.11)
VAL_KEEPS = (0.4, 0.25, 0.11)
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
READOUTS = ("naive", "maskclip", "clearclip")
POSITIONS = ("original", "compact")


CELL_TEST_OFFSET = 1_000  # test frames after the ones the trainer's own report used


def make_samples(split: str, images: int, per_image: int, size: tuple[int, int], world: str = "flat") -> list[Sample]:
    """``per_image`` distinct questions on each of ``images`` rendered scenes of ``split`` (validation or test)."""
    if world == "cell":
        return cell_samples(split, images, per_image, size)
    out = []
    for i in tqdm(range(images), desc=f"render {split}", unit="img", leave=False):
        scene = render_scene(split_seed(split, i), height=size[0], width=size[1])
        for j, q in enumerate(distinct_questions(scene, per_image)):
            boxes = tuple(tuple(float(v) for v in box) for box in q.evidence)
            answers = tuple(q.answers or (q.answer,))
            out.append(Sample(f"{split}:{i}:{j}", scene.rgb, q.question, answers, boxes, kind=q.kind))
    return out


def cell_samples(split: str, images: int, per_image: int, size: tuple[int, int]) -> list[Sample]:
    """The cell's questions on rendered stills; test questions use held-out phrasings only."""
    from atp_ros.warehouse.cell.episodes import random_still
    from atp_ros.warehouse.cell.model.data import frame_seed
    from atp_ros.warehouse.cell.questions import questions_for

    cell_split, offset = ("val", 0) if split == "validation" else ("test", CELL_TEST_OFFSET)
    out = []
    for i in tqdm(range(images), desc=f"render cell {split}", unit="img", leave=False):
        seed = frame_seed(cell_split, 0, offset + i)
        frame = random_still(seed, width=size[1], height=size[0])
        rng = np.random.default_rng([seed, 11])
        held = cell_split == "test"
        for j, q in enumerate(questions_for(frame.truth, rng, per_image, cell_split, held_out_only=held)):
            boxes = tuple(tuple(float(v) for v in box) for box in q.evidence)
            out.append(Sample(f"{split}:{i}:{j}", frame.rgb, q.question, tuple(q.answers), boxes, kind=q.kind))
    return out


def run(backend, samples: list[Sample], atp: AtpConfig, batch: int = 32) -> dict:
    """Accuracy (overall and per kind), evidence recall, tokens kept and ms per frame for one setting,
    answered and scored by the evaluation sweep (``evaluation.sweep.answer_samples``)."""
    start = time.perf_counter()
    records = answer_samples(backend, samples, atp, max_new_tokens=3, batch=batch, reseed_random=True)
    elapsed = (time.perf_counter() - start) * 1e3 / max(len(samples), 1)
    by_kind: dict[str, list[float]] = {}
    for r, s in zip(records, samples, strict=True):
        by_kind.setdefault(s.kind, []).append(r["accuracy"])
    recall = [r["evidence_recall"] for r in records if r["evidence_recall"] is not None]
    return {
        "accuracy": float(np.mean([r["accuracy"] for r in records])),
        "per_kind": {k: float(np.mean(v)) for k, v in by_kind.items() if v},
        "evidence_recall": float(np.mean(recall)) if recall else float("nan"),
        "tokens_kept": float(np.mean([r["kept"] for r in records])),
        "ms_per_sample": elapsed,
        "n": len(samples),
    }


def _mean_over_budgets(backend, samples: list[Sample], cfg: AtpConfig, rows: list[dict], stage: str, **info) -> tuple:
    accs, recs = [], []
    for keep in VAL_KEEPS:
        r = run(backend, samples, replace(cfg, keep_ratio=keep))
        accs.append(r["accuracy"])
        recs.append(r["evidence_recall"])
        rows.append({"stage": stage, **info, "keep": keep, **r})
    rows.append(
        {
            "stage": stage,
            **info,
            "keep": "mean",
            "accuracy": float(np.mean(accs)),
            "evidence_recall": float(np.mean(recs)),
        }
    )
    return round(float(np.mean(accs)), 4), float(np.mean(recs))


def choose_defaults(model_id: str, device: str, samples: list[Sample]) -> tuple[dict, list[dict]]:
    """Coordinate search on validation, each step scored by mean accuracy over keep 0.4 / 0.25 / 0.11
    (mean evidence recall breaks ties): the S_intra layer (by CLS-only selection, where it alone
    decides), then alpha x read-out, then normalization, then the position mode. Returns
    (chosen setting, every row)."""
    rows: list[dict] = []
    backend = load_backend(model_id, device=device)
    best = {"alpha": 0.5, "inter_readout": "naive", "normalization": "minmax", "positions": "original"}

    def cfg(**kw) -> AtpConfig:
        fields = ("alpha", "inter_readout", "normalization", "positions", "selector")
        return AtpConfig(**{k: v for k, v in {**best, **kw}.items() if k in fields})

    scored = {}
    layers = range(backend.num_layers) if hasattr(backend, "num_layers") else [backend.score_layer]
    default_layer = backend.score_layer
    by_layer = {default_layer: backend}
    for layer in tqdm(list(layers), desc="validation: S_intra layer (cls_only)"):
        if layer not in by_layer:
            by_layer[layer] = load_backend_with_layer(model_id, device, layer)
        acc, recall = _mean_over_budgets(
            by_layer[layer], samples, cfg(selector="cls_only"), rows, "S_intra layer (cls_only)", score_layer=layer
        )
        scored[layer] = (acc, recall, layer == default_layer)  # a tie keeps the backend's default layer
    best["score_layer"] = max(scored, key=scored.get)
    best["default_score_layer"] = default_layer
    backend = by_layer[best["score_layer"]]
    scored = {}
    for alpha, readout in tqdm(list(itertools.product(ALPHAS, READOUTS)), desc="validation: alpha x read-out"):
        if alpha == 0.0 and readout != "naive":
            continue  # no S_inter at alpha 0: the read-out cannot matter
        scored[(alpha, readout)] = _mean_over_budgets(
            backend,
            samples,
            cfg(alpha=alpha, inter_readout=readout),
            rows,
            "alpha x read-out",
            alpha=alpha,
            inter_readout=readout,
        )
    best["alpha"], best["inter_readout"] = max(scored, key=scored.get)
    scored = {}
    for norm in tqdm(NORMALIZATIONS, desc="validation: normalization"):
        acc, recall = _mean_over_budgets(
            backend, samples, cfg(normalization=norm), rows, "normalization", normalization=norm
        )
        scored[norm] = (acc, recall, norm == "minmax")
    best["normalization"] = max(scored, key=scored.get)
    scored = {}
    for positions in POSITIONS:
        scored[positions] = _mean_over_budgets(
            backend, samples, cfg(positions=positions), rows, "positions", positions=positions
        )
    best["positions"] = max(scored, key=scored.get)
    return best, rows


def load_backend_with_layer(model_id: str, device: str, layer: int):
    from atp_ros.backends import resolve_model_id
    from atp_ros.backends.llava import LlavaBackend

    return LlavaBackend.from_pretrained(resolve_model_id(model_id), device=device, score_layer=layer)


def test_report(backend, samples: list[Sample], chosen: dict) -> dict:
    base = AtpConfig(
        alpha=chosen["alpha"],
        inter_readout=chosen["inter_readout"],
        positions=chosen["positions"],
        normalization=chosen["normalization"],
    )
    report: dict = {"chosen": chosen}
    report["full"] = run(backend, samples, base.keep_all())
    sel = {}
    for name, keep in tqdm(list(itertools.product(PRUNING_SELECTORS, KEEPS)), desc="test: selectors"):
        sel[f"{name}@{keep}"] = run(backend, samples, replace(base, selector=name, keep_ratio=keep))
    report["selectors"] = sel
    alphas = {}
    for alpha, keep in tqdm(list(itertools.product(ALPHAS, KEEPS[1:])), desc="test: alpha"):
        alphas[f"{alpha}@{keep}"] = run(backend, samples, replace(base, alpha=alpha, keep_ratio=keep))
    report["alphas"] = alphas
    variants = {}
    combos = list(itertools.product(POSITIONS, READOUTS, ("atp", "cls_only", "text_only", "random"), KEEPS[2:]))
    for positions, readout, name, keep in tqdm(combos, desc="test: positions x read-outs"):
        if name in ("cls_only", "random") and readout != "naive":
            continue  # no S_inter: the read-out does not change them
        cfg = replace(base, positions=positions, inter_readout=readout, selector=name, keep_ratio=keep)
        variants[f"{positions}/{readout}/{name}@{keep}"] = run(backend, samples, cfg)
    report["variants"] = variants
    return report


def markdown(report: dict, val_rows: list[dict]) -> str:
    c = report["chosen"]
    full = report["full"]
    lines = [
        f"Defaults chosen on validation: alpha={c['alpha']}, inter_readout={c['inter_readout']}, "
        f"normalization={c['normalization']}, S_intra layer={c['score_layer']} (backend default "
        f"{c['default_score_layer']}), positions={c['positions']}.",
        "",
        f"**Full model (all {full['tokens_kept']:.0f} tokens), test: {full['accuracy']:.3f}** on {full['n']} questions",
        "",
        "| kind | " + " | ".join(full["per_kind"]) + " |",
        "|---|" + "---|" * len(full["per_kind"]),
        "| accuracy | " + " | ".join(f"{v:.3f}" for v in full["per_kind"].values()) + " |",
        "",
        "Accuracy / evidence recall per selector and keep ratio (test):",
        "",
        "| selector | " + " | ".join(f"keep {k}" for k in KEEPS) + " |",
        "|---|" + "---|" * len(KEEPS),
    ]
    for name in PRUNING_SELECTORS:
        cells = []
        for k in KEEPS:
            r = report["selectors"][f"{name}@{k}"]
            cells.append(f"{r['accuracy']:.3f} / {r['evidence_recall']:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "ATP across alpha (accuracy / evidence recall, test):", ""]
    lines += ["| alpha | " + " | ".join(f"keep {k}" for k in KEEPS[1:]) + " |", "|---|" + "---|" * len(KEEPS[1:])]
    for a in ALPHAS:
        cells = [
            f"{report['alphas'][f'{a}@{k}']['accuracy']:.3f} / {report['alphas'][f'{a}@{k}']['evidence_recall']:.2f}"
            for k in KEEPS[1:]
        ]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += ["", "Position ids x S_inter read-out x selector (accuracy / evidence recall, test):", ""]
    lines += ["| positions | read-out | selector | " + " | ".join(f"keep {k}" for k in KEEPS[2:]) + " |"]
    lines += ["|---|---|---|" + "---|" * len(KEEPS[2:])]
    seen = []
    for key in report["variants"]:
        head = key.split("@")[0]
        if head not in seen:
            seen.append(head)
    for head in seen:
        p, ro, name = head.split("/")
        cells = [
            f"{report['variants'][f'{head}@{k}']['accuracy']:.3f} / "
            f"{report['variants'][f'{head}@{k}']['evidence_recall']:.2f}"
            for k in KEEPS[2:]
        ]
        ro_cell = ro if name in ("atp", "text_only") else "-"
        lines.append(f"| {p} | {ro_cell} | {name} | " + " | ".join(cells) + " |")
    lines += ["", "Validation (mean over keep 0.4 / 0.25 / 0.11; each stage keeps the winners of the ones before):", ""]
    lines += ["| stage | setting | mean accuracy | mean evidence recall |", "|---|---|---|---|"]
    for r in val_rows:
        if r["keep"] == "mean":
            setting = ", ".join(
                f"{k}={r[k]}" for k in ("alpha", "inter_readout", "normalization", "score_layer", "positions") if k in r
            )
            lines.append(f"| {r['stage']} | {setting} | {r['accuracy']:.3f} | {r['evidence_recall']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path, model: str = "warehouse-tiny") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name in PRUNING_SELECTORS:
        acc = [report["selectors"][f"{name}@{k}"]["accuracy"] for k in KEEPS]
        rec = [report["selectors"][f"{name}@{k}"]["evidence_recall"] for k in KEEPS]
        ax[0].plot(KEEPS, acc, "o-", label=name)
        ax[1].plot(KEEPS, rec, "o-", label=name)
    ax[0].axhline(report["full"]["accuracy"], color="k", ls="--", lw=1, label="full")
    ax[0].set(xlabel="keep ratio", ylabel="answer accuracy (test)", title=f"{model}: accuracy", xscale="log")
    ax[1].set(xlabel="keep ratio", ylabel="evidence recall", title="evidence patches kept", xscale="log")
    for a in ax:
        a.set_xticks(KEEPS, [str(k) for k in KEEPS])
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "selectors.png", dpi=100)
    plt.close(fig)


def parse_size(text: str) -> tuple[int, int]:
    """``"480x640"`` -> ``(480, 640)`` (height, width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--size {text!r}: expected HxW, e.g. 480x640") from None
    return h, w


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="model_card", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="warehouse-tiny")
    ap.add_argument("--world", choices=("cell", "flat"), default="flat", help="which warehouse the questions are about")
    ap.add_argument("--out", type=Path, default=Path("out/model_card"))
    ap.add_argument("--images", type=int, default=600, help="images per split (2 questions each)")
    ap.add_argument("--size", default="", help="HxW of the rendered frames (default: 480x640 cell, 336x336 flat)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="a small smoke run (60 images)")
    args = ap.parse_args(argv)
    images = 60 if args.quick else args.images
    args.out.mkdir(parents=True, exist_ok=True)
    size = parse_size(args.size or ("480x640" if args.world == "cell" else "336x336"))
    val = make_samples("validation", max(images // 2, 1), 2, size, args.world)
    chosen, val_rows = choose_defaults(args.model, args.device, val)
    print(f"chosen on validation: {chosen}")
    (args.out / "chosen.json").write_text(json.dumps(chosen, indent=1) + "\n")
    backend = load_backend(args.model, device=args.device)
    if chosen["score_layer"] != chosen["default_score_layer"]:
        backend = load_backend_with_layer(args.model, args.device, chosen["score_layer"])
    test = make_samples("test", images, 2, size, args.world)
    report = test_report(backend, test, chosen)
    report["validation"] = val_rows
    report["model"], report["world"] = Path(args.model).name, args.world
    (args.out / "model_card.json").write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report, val_rows)
    (args.out / "model_card.md").write_text(md)
    plot(report, args.out, Path(args.model).name)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
