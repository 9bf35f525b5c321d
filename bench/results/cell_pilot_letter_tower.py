"""Pilot (outside the package): can the cell's CLIP tower learn to read the box letters at 256 px? Phase 5's tower
touch-up (phase 1b's losses plus the object-kind read-out, ``touch_up_tower``) with the letter loss weighted
``--letter-weight`` times, its progress the read-out's ``letter_acc`` (letter-carrying patches only: ``label_acc``
also counts the "no letter" class every tote patch shows), for ``--steps`` steps on the run's cached training
stills; then the touched tower is written into a copy of the checkpoint (``--out``) for ``cell_probe_letters.py``.

Run: PYTHONPATH=atp_ros python bench/results/cell_pilot_letter_tower.py --model out/warehouse-cell \\
    --work out/train-cell-9 --out out/letter-tower [--steps 300] [--letter-weight 5]
"""

import argparse
import json
import math
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from atp_ros.warehouse.cell.model.clip_phase import clip_step
from atp_ros.warehouse.cell.model.data import render_frames
from atp_ros.warehouse.cell.model.ground_phase import GroundHeads, ground_losses
from atp_ros.warehouse.cell.model.recipe import Recipe, bf16_forward, make_tokenizer, normalize, plain_forward
from rich.progress import Progress
from transformers import CLIPModel, LlavaForConditionalGeneration


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="a training run's --work (its frames/ are reused)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--letter-weight", type=float, default=5.0)
    ap.add_argument("--lr", type=float, default=3e-4)
    args = ap.parse_args()
    saved = json.loads((args.model / "recipe.json").read_text())
    known = {f.name for f in fields(Recipe)}
    r = Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in known})
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    with Progress() as progress:
        frames = render_frames(args.work, "train", r.train_images, r, progress)
        tok = make_tokenizer(args.work)
        clip = CLIPModel.from_pretrained(args.model / "atp_text_tower", dtype=torch.float32)
        heads = GroundHeads(clip.config.vision_config.hidden_size, kind=True)
        dense_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        params = [*clip.parameters(), *heads.parameters(), dense_scale]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
        bf16_forward(clip.vision_model, r)
        bf16_forward(clip.text_model, r)
        task = progress.add_task("touch-up", total=args.steps)
        log = []
        for step in range(args.steps):
            for g in opt.param_groups:  # warm up over 10% of the steps, then cosine
                g["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.steps // 10))
                g["lr"] *= 0.5 * (1 + math.cos(math.pi * step / args.steps))
            g_loss, r_loss = clip_step(clip, tok, frames, rng, r, dense_scale)
            idx = np.sort(rng.choice(len(frames), size=max(r.clip_batch // 2, 1), replace=False))
            truths = [frames.truths[int(i)] for i in idx]
            parts, accs = ground_losses(clip, heads, normalize(frames.rgb[idx]), truths, r)
            letter_acc = accs.get("letter_acc", 0.0)
            aux = sum(parts.values()) + (args.letter_weight - 1.0) * parts.get("label", torch.zeros(()))
            loss = g_loss + r_loss + r.ground_weight * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            log.append({"step": step + 1, "letter_acc": letter_acc, "region_loss": r_loss.item()})
            progress.update(task, advance=1, description=f"touch-up letters {letter_acc:.2f}")
            if (step + 1) % 25 == 0 and not progress.console.is_terminal:  # rich draws no bar into a log file
                print(f"step {step + 1}/{args.steps}: letters on the batch {letter_acc:.3f}", flush=True)
        plain_forward(clip.vision_model)
        plain_forward(clip.text_model)
    for s in range(0, args.steps, max(1, args.steps // 4)):
        part = log[s : s + max(1, args.steps // 4)]
        acc, region = np.mean([x["letter_acc"] for x in part]), np.mean([x["region_loss"] for x in part])
        print(f"steps {part[0]['step']}-{part[-1]['step']}: letters on the batch {acc:.3f}, region loss {region:.3f}")
    shutil.copytree(args.model, args.out, dirs_exist_ok=True)
    llava = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float16)
    llava.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    llava.save_pretrained(args.out)
    clip.half().save_pretrained(args.out / "atp_text_tower")
    print(f"wrote {args.out} (its tower touched up; its LLM not retrained for it)")


if __name__ == "__main__":
    main()
