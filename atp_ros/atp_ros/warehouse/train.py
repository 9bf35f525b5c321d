"""``make train-tiny``: train ``warehouse-tiny`` from nothing on the synthetic warehouse (CPU, seeded, resumable).

Three phases, each checkpointed every few minutes under ``--work`` so a stopped run
resumes where it was (``--fresh`` starts over):

1. **clip** -- a small CLIP (ViT 4 layers x 128, patch 16 at 192 px: 12 x 12 = 144 patches;
   text 2 layers x 128) trained on rendered training scenes with two losses:

   * global: symmetric InfoNCE between the image embedding and a caption of 2-3 facts
     about parts of the scene, written in the questions' words;
   * region: for a question (or a single fact) about the image, a softmax over the image's
     144 patch embeddings -- the same read-out ATP's ``S_inter`` uses (``post_layernorm`` +
     ``visual_projection`` of each last-layer patch) -- against the text embedding must put
     its mass on the question's evidence patches. A global objective alone does not align
     patches with text (``shared/notes/embedded-model-probe.md``); this is the dense,
     region-caption training that makes ``S_inter`` a relevance signal.
2. **features** -- the frozen tower's LLaVA feature layer (the last layer, CLS dropped: the
   states the region loss aligned with the questions' words) for every training image,
   cached once (float16).
3. **llava** -- projector + Llama decoder (4 layers x 256) trained from scratch on the
   cached features, several question/answer turns per image in one sequence, loss on the
   answer token and its end token only, plus attention supervision: two heads of one LM layer
   are taught to look, from the answer-predicting position, at the question's evidence patches
   (a first run without it stalled at chance on every slot-bound question). Slot-bound question
   kinds are drawn twice as often. A share of the sequences drops a random subset of
   image tokens (keep 10-100%), keeping each kept token's original position id: the
   model learns to answer from a subset, as ``atp.positions: original`` feeds it.

The result is saved as a standard ``LlavaForConditionalGeneration`` directory (float16
safetensors, processor, chat template) with the CLIP as ``atp_text_tower/``; it loads
through ``load_backend`` like any LLaVA. Progress shows with ETA; ``learning_curve.png``
and ``train_log.jsonl`` go next to the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from atp_ros.testing.tiny.llava import CHAT_TEMPLATE, IMAGE_TOKEN  # llava-1.5's prompt, reduced
from atp_ros.warehouse.train_clip import features, train_clip
from atp_ros.warehouse.train_data import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_SIZE,
    PATCH,
    Recipe,
    clip_part,
    make_tokenizer,
    render_pool,
)
from atp_ros.warehouse.train_llava import train_llava

__all__ = ["Recipe", "Trainer", "main", "plot_learning_curve", "save_checkpoint"]


class Trainer:
    """The resumable training run: state (``--work``/state.pt), log, and the phases in order."""

    def __init__(self, work: Path, recipe: Recipe, fresh: bool, console_print=print) -> None:
        self.work = work
        self.r = recipe
        self.print = console_print
        self.state_path = work / "state.pt"
        self.log_path = work / "train_log.jsonl"
        work.mkdir(parents=True, exist_ok=True)
        if fresh:
            for p in (self.state_path, self.log_path, work / "features.pt"):
                p.unlink(missing_ok=True)
        torch.manual_seed(recipe.seed)
        self.tok = make_tokenizer()
        self.state = torch.load(self.state_path, weights_only=False) if self.state_path.exists() else {}
        saved = self.state.get("recipe", {})
        if self.state and clip_part(saved) != clip_part(recipe.__dict__):
            raise SystemExit(f"{self.state_path} was trained with another recipe; rerun with --fresh")
        if self.state and saved != recipe.__dict__ and "llava" in self.state:
            # Only the LLaVA phase's settings changed: keep the finished CLIP, retrain the rest.
            print("recipe changed after the CLIP phase: keeping CLIP, restarting the LLaVA phase")
            for key in ("llava", "llava_opt", "llava_step"):
                self.state.pop(key, None)

    def save_state(self, **kw) -> None:
        """Merge ``kw`` into the saved state and write it atomically."""
        self.state.update(kw, recipe=self.r.__dict__)
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(self.state, tmp)
        tmp.replace(self.state_path)

    def log(self, **kw) -> None:
        """One line of ``train_log.jsonl``."""
        with self.log_path.open("a") as f:
            f.write(json.dumps(kw) + "\n")

    def run(self, out: Path, checkpoint_every_s: float = 180.0) -> None:
        """Render the frames, run the three phases (each resumes from the saved state), then write the
        checkpoint to ``out`` with its learning curve."""
        r = self.r
        cols = (
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*cols, refresh_per_second=1) as progress:
            scenes, px = render_pool("train", r.train_images, r.wide_share, r.seed, "render train", progress)
            val_scenes, val_px = render_pool("validation", 300, r.wide_share, r.seed + 1, "render val", progress)
            clip = train_clip(self, scenes, px, progress, checkpoint_every_s)
            feats = features(clip, px, r, progress, "features train")
            val_feats = features(clip, val_px, r, progress, "features val")
            del px
            model = train_llava(self, clip, (scenes, feats), (val_scenes, val_feats), progress, checkpoint_every_s)
        model.eval()
        save_checkpoint(out, model, clip, self.tok, r)
        plot_learning_curve(self.log_path, out / "learning_curve.png")
        self.print(f"saved {out}")

    def truncate_log(self, phase: str, step: int) -> None:
        """Drop the log lines of ``phase`` after ``step`` (a restarted or resumed phase rewrites them)."""
        if not self.log_path.exists():
            return
        keep = [
            line
            for line in self.log_path.read_text().splitlines()
            if line.strip() and not (json.loads(line)["phase"] == phase and json.loads(line)["step"] > step)
        ]
        self.log_path.write_text("".join(line + "\n" for line in keep))


def save_checkpoint(out: Path, model, clip, tok, r: Recipe, chat_template: str = CHAT_TEMPLATE) -> None:
    """A standard LLaVA directory (float16 safetensors) + processor (with ``chat_template``) + ``atp_text_tower/``
    (the CLIP)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from atp_ros.backends.loading import TEXT_TOWER_SUBDIR
    from atp_ros.testing.tiny.common import set_special_ids

    out.mkdir(parents=True, exist_ok=True)
    image_processor = CLIPImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    set_special_ids(model.generation_config, tok)
    model.generation_config.max_new_tokens = 4
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
        image_token=IMAGE_TOKEN,
    )
    processor.save_pretrained(out)
    tower = out / TEXT_TOWER_SUBDIR
    clip.to(torch.float16).save_pretrained(tower, safe_serialization=True)
    clip.to(torch.float32)
    tok.save_pretrained(tower)
    (out / "recipe.json").write_text(json.dumps(r.__dict__, indent=1) + "\n")


def plot_learning_curve(log_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    clip = [x for x in rows if x["phase"] == "clip"]
    # The cell model's phases 4 and 5 go on from the LLaVA phase's weights: drawn after it on the same axis
    # (a run started from a checkpoint, --init-from, logs phase 5 alone).
    names = {"llava": "LLaVA (projector + LM)", "tune": "phase 4 (reworded)", "dialog": "phase 5 (dialog)"}
    lm, starts, shown = [], [], []
    for name in names:
        part = [x for x in rows if x["phase"] == name]
        if part:
            starts.append(len(lm))
            shown.append(names[name])
            lm += [{**x, "step": len(lm) + x["step"]} for x in part]
    # A run resumed from another run's CLIP logs no CLIP steps: then only the LLaVA panel.
    fig, ax = plt.subplots(1, 2, figsize=(11, 4)) if clip else plt.subplots(1, 1, figsize=(7, 4))
    ax = ax if clip else [None, ax]

    def smooth(v, k=25):
        v = np.asarray(v, dtype=float)
        return np.convolve(v, np.ones(k) / k, mode="valid") if len(v) > k else v

    if clip:
        ax[0].plot(smooth([x["global_loss"] for x in clip]), label="global (image-caption)")
        ax[0].plot(smooth([x["region_loss"] for x in clip]), label="region (question-evidence patches)")
        ax[0].set(title="CLIP", xlabel="step", ylabel="loss")
        ax[0].legend()
    if lm:
        ax[1].plot(smooth([x["loss"] for x in lm]), label="train loss")
        ax2 = ax[1].twinx()
        vs = [(x["step"], x["val_acc"]) for x in lm if "val_acc" in x]
        if vs:
            ax2.plot(*zip(*vs, strict=True), "o-", color="C2", label="validation answer accuracy")
        held = [(x["step"], x["val_held_out_acc"]) for x in lm if "val_held_out_acc" in x]
        if held:
            ax2.plot(*zip(*held, strict=True), "s--", color="C3", label="validation, held-out phrasings")
        if vs or held:
            ax2.set_ylim(0, 1)
        ax2.plot(smooth([x["acc"] for x in lm]), color="C1", alpha=0.6, label="train answer accuracy")
        for start in starts[1:]:
            ax[1].axvline(start, color="gray", ls=":")
        ax[1].set(title=", then ".join(shown), xlabel="step", ylabel="loss")
        ax2.legend(loc="lower right")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="train-tiny", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/warehouse-tiny", help="where the checkpoint directory goes")
    ap.add_argument("--work", default="out/train-tiny", help="resumable state (checkpoints every few minutes)")
    ap.add_argument("--fresh", action="store_true", help="ignore saved state and start over")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a minutes-long smoke run (tiny counts), not the model")
    args = ap.parse_args(argv)
    recipe = Recipe(seed=args.seed)
    if args.quick:
        recipe = Recipe(seed=args.seed, train_images=400, clip_steps=20, clip_batch=16, llava_steps=20, llava_batch=8)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    Trainer(Path(args.work), recipe, args.fresh).run(Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
