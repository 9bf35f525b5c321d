"""Probe (outside the package): does a cell model's image side name a box's letter? A linear read-out of the letter
(six classes) from each readable box's patches (``letter_labels``: a shelf box with a letter, at least 60% visible),
per patch and from the mean over the box's patches, on the tower's projector input and on the projector's output
(what the LLM gets), trained on the first 75% of the frames and scored on the rest.
Frames are the training run's cached stills (``--work``'s ``frames/``), rendered by ``make train-cell``.

Run: PYTHONPATH=atp_ros python bench/results/cell_probe_letters.py --model out/warehouse-cell \\
    --frames out/train-cell-9/frames [--chunks 4] [--split train]
"""

import torch
from atp_ros.warehouse.cell.model.ground_phase import LABEL_MIN_VISIBLE, letter_labels
from atp_ros.warehouse.cell.model.recipe import GRID
from atp_ros.warehouse.cell.truth import LABELS
from atp_ros.warehouse.scenes import evidence_mask
from cell_probe_object_kind import frame_features, probe_args  # the sibling probe, on sys.path when run as a script


def probe(x: torch.Tensor, y: torch.Tensor, n: int) -> float:
    """Held-out accuracy of a softmax read-out trained on the first ``n`` rows (standardized, L2 1e-4)."""
    x = (x - x[:n].mean(0)) / (x[:n].std(0) + 1e-6)
    lin = torch.nn.Linear(x.shape[1], len(LABELS))
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(400):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(x[:n]), y[:n]).backward()
        opt.step()
    with torch.no_grad():
        return float((lin(x[n:]).argmax(-1) == y[n:]).float().mean())


def main() -> None:
    args = probe_args(__doc__)
    torch.manual_seed(0)
    rows: dict[str, dict[str, list]] = {
        what: {"tower": [], "projector": [], "y": [], "frame": []} for what in ("patch", "box")
    }
    frame = 0
    for truth, tower, projected in frame_features(args.model, args.frames, args.split, args.chunks):
        labels = torch.from_numpy(letter_labels(truth))
        m = labels >= 0
        rows["patch"]["tower"].append(tower[m])
        rows["patch"]["projector"].append(projected[m])
        rows["patch"]["y"].append(labels[m])
        rows["patch"]["frame"].append(torch.full((int(m.sum()),), frame))
        for o in truth.objects:
            if o.place != "shelf" or not o.label or not o.box or o.visible_fraction < LABEL_MIN_VISIBLE:
                continue
            box = torch.from_numpy(evidence_mask([o.box], (truth.height, truth.width), (GRID, GRID)).reshape(-1))
            if box.any():
                rows["box"]["tower"].append(tower[box].mean(0, keepdim=True))
                rows["box"]["projector"].append(projected[box].mean(0, keepdim=True))
                rows["box"]["y"].append(torch.tensor([LABELS.index(o.label)]))
                rows["box"]["frame"].append(torch.tensor([frame]))
        frame += 1
    cut = int(0.75 * frame)  # the first 75% of the frames train the read-out, the rest score it
    for what, r in rows.items():
        y, frames = torch.cat(r["y"]), torch.cat(r["frame"])
        n = int((frames < cut).sum())
        share = torch.bincount(y, minlength=len(LABELS)).max() / len(y)
        print(f"{what}: {len(y)} rows ({len(y) - n} scored), majority {share:.3f}")
        for side in ("tower", "projector"):
            print(f"  {side}: held-out accuracy {probe(torch.cat(r[side]), y, n):.3f}")


if __name__ == "__main__":
    main()
