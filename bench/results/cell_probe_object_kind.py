"""Probe (outside the package): does a cell model's image side tell a box from a tote? A logistic read-out of the
object kind from the mean feature over each shelf item's patches (at least 30% visible), on the tower's projector
input and on the projector's output (what the LLM gets), trained on 70% of the items and scored on the rest.
Frames are the training run's cached stills (``--work``'s ``frames/``), rendered by ``make train-cell``: the
training split's first chunks by default, or ``--split val`` (the 300 validation stills no phase trains on; use
them for a model whose tower was trained with a kind read-out, ``dialog_tower_steps``).

Run: PYTHONPATH=atp_ros python bench/results/cell_probe_object_kind.py --model out/warehouse-cell \\
    --frames out/train-cell-2/frames [--chunks 4] [--split val]
"""

import argparse
import glob
import json

import numpy as np
import torch
from atp_ros.warehouse.cell.model.recipe import GRID, normalize
from atp_ros.warehouse.cell.truth import CellTruth
from atp_ros.warehouse.scenes import evidence_mask
from transformers import LlavaForConditionalGeneration


def frame_features(model_dir: str, frames: str, split: str, chunks: int):
    """Each cached still of ``split`` (the first ``chunks`` files) with its truth and, per patch, the projector's input
    (the tower's ``vision_feature_layer`` hidden states) and output: ``(CellTruth, (N, D_in), (N, D_out))``."""
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    layers = model.config.vision_feature_layer
    layers = layers if isinstance(layers, list) else [layers]
    for path in sorted(glob.glob(f"{frames}/{split}-*.npz"))[:chunks]:
        z = np.load(path)
        truths = [CellTruth.from_json(d) for d in json.loads(str(z["truth"]))]
        for s in range(0, len(truths), 25):
            with torch.no_grad():
                hidden = model.model.vision_tower(normalize(z["rgb"][s : s + 25]), output_hidden_states=True)
                tower = torch.cat([hidden.hidden_states[i][:, 1:] for i in layers], -1)
                projected = model.model.multi_modal_projector(tower)
            for b, truth in enumerate(truths[s : s + 25]):
                yield truth, tower[b], projected[b]


def probe_args(doc: str) -> argparse.Namespace:
    """The probes' shared command line: --model, --frames, --chunks, --split."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--frames", required=True)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--split", choices=("train", "val"), default="train")
    return ap.parse_args()


def main() -> None:
    args = probe_args(__doc__)
    torch.manual_seed(0)
    feats: dict[str, list] = {"tower": [], "projector": []}
    labels = []
    for truth, tower, projected in frame_features(args.model, args.frames, args.split, args.chunks):
        for o in truth.objects:
            if o.place != "shelf" or o.kind not in ("box", "tote") or o.box is None or o.visible_fraction < 0.3:
                continue
            mask = evidence_mask([o.box], (truth.height, truth.width), (GRID, GRID)).reshape(-1)
            if mask.any():
                m = torch.from_numpy(mask)
                feats["tower"].append(tower[m].mean(0))
                feats["projector"].append(projected[m].mean(0))
                labels.append(o.kind == "tote")
    y = torch.tensor(labels).float()
    order = torch.randperm(len(y))
    y, n = y[order], int(0.7 * len(y))
    print(f"{len(y)} shelf items, tote share {y.mean():.3f} (majority {max(y.mean(), 1 - y.mean()):.3f})")
    for name, rows in feats.items():
        x = torch.stack(rows)[order]
        x = (x - x[:n].mean(0)) / (x[:n].std(0) + 1e-6)
        w = torch.zeros(x.shape[1], requires_grad=True)
        bias = torch.zeros(1, requires_grad=True)
        opt = torch.optim.Adam([w, bias], lr=1e-2)
        for _ in range(500):
            loss = (
                torch.nn.functional.binary_cross_entropy_with_logits(x[:n] @ w + bias, y[:n]) + 1e-3 * w.square().sum()
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            held = (((x[n:] @ w + bias) > 0).float() == y[n:]).float().mean()
        print(f"{name} ({x.shape[1]} features): held-out accuracy {held:.3f}")


if __name__ == "__main__":
    main()
