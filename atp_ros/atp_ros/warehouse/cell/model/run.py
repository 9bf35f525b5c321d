"""The resumable training run of the cell model: frames, CLIP, features, LLaVA, checkpoint, report."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.progress import Progress, TextColumn, TimeElapsedColumn

from atp_ros.warehouse.cell.model.clip_phase import features, train_clip
from atp_ros.warehouse.cell.model.data import render_frames
from atp_ros.warehouse.cell.model.evaluate import evaluate
from atp_ros.warehouse.cell.model.ground_phase import ground_clip, touch_up_tower
from atp_ros.warehouse.cell.model.llava_phase import chat_template, train_llava
from atp_ros.warehouse.cell.model.recipe import (
    IMAGE_SIZE,
    Recipe,
    clip_part,
    ground_part,
    llava_part,
    make_tokenizer,
    tower_precision,
    tune_part,
)
from atp_ros.warehouse.train import Trainer, plot_learning_curve, save_checkpoint

DIALOG_KEYS = ("retower", "retower_opt", "retower_step", "dialog", "dialog_opt", "dialog_step", "done")
TUNE_KEYS = ("tune", "tune_opt", "tune_step", *DIALOG_KEYS)
LLAVA_KEYS = ("llava", "llava_opt", "llava_step", *TUNE_KEYS)
GROUND_KEYS = ("ground", "ground_opt", "ground_step")


class CellTrainer(Trainer):
    """warehouse-tiny's resumable run (state, log) for the cell: ``--work``/state.pt every few minutes."""

    def __init__(
        self, work: Path, recipe: Recipe, fresh: bool, console_print=print, init_from: Path | None = None
    ) -> None:
        self.work, self.r, self.print = work, recipe, console_print
        self.state_path = work / "state.pt"
        self.log_path = work / "train_log.jsonl"
        work.mkdir(parents=True, exist_ok=True)
        if fresh:
            for p in (self.state_path, self.log_path):
                p.unlink(missing_ok=True)
        torch.manual_seed(recipe.seed)
        self.tok = make_tokenizer(work)
        self.state = torch.load(self.state_path, weights_only=False) if self.state_path.exists() else {}
        if init_from is not None and not self.state:
            self.start_from(Path(init_from))
        saved = self.state.get("recipe", {})
        if self.state and clip_part(saved) != clip_part(asdict(recipe)):
            raise SystemExit(f"{self.state_path} was trained with another recipe; rerun with --fresh")
        if self.state and ground_part(saved) != ground_part(asdict(recipe)) and "ground" in self.state:
            console_print("grounding recipe changed: keeping CLIP, restarting the grounding and LLaVA phases")
            for key in (*GROUND_KEYS, *LLAVA_KEYS):
                self.state.pop(key, None)
        if self.state and llava_part(saved) != llava_part(recipe.__dict__) and "llava" in self.state:
            console_print("recipe changed after the CLIP phase: keeping CLIP, restarting the LLaVA phase")
            for key in LLAVA_KEYS:
                self.state.pop(key, None)
        elif self.state and tune_part(saved) != tune_part(recipe.__dict__) and "tune" in self.state:
            console_print("phase 4's recipe changed: keeping the LLaVA phase, restarting phase 4")
            for key in TUNE_KEYS:
                self.state.pop(key, None)
        elif self.state and saved != recipe.__dict__ and "dialog" in self.state:
            console_print("phase 5's recipe changed: keeping phase 4, restarting phase 5")
            for key in DIALOG_KEYS:
                self.state.pop(key, None)
        elif self.state and saved != recipe.__dict__ and self.state.get("done"):
            # A finished run whose recipe gained a phase (dialog_steps from 0): go on from where it ended.
            self.state.pop("done", None)

    def start_from(self, ckpt: Path) -> None:
        """Take phases 1-4 from a trained cell checkpoint (``warehouse-cell``, or a ``--out`` of this trainer)
        whose recipe matches this one through phase 4, so the run goes on with phase 5; SystemExit with one line when
        the checkpoint is not one, or was trained with another recipe or tokenizer."""
        from transformers import AutoTokenizer, CLIPModel, LlavaForConditionalGeneration

        from atp_ros.warehouse.cell.model.ground_phase import GroundHeads, Grounding

        try:
            saved = json.loads((ckpt / "recipe.json").read_text())
        except (OSError, ValueError) as err:
            raise SystemExit(f"--init-from {ckpt}: not a cell checkpoint ({err})") from None
        mine = json.loads(json.dumps(tune_part(asdict(self.r))))
        differ = sorted(k for k in mine if saved.get(k) != mine[k])
        if differ:
            raise SystemExit(f"--init-from {ckpt}: trained with another recipe up to phase 4 ({', '.join(differ)})")
        if AutoTokenizer.from_pretrained(ckpt).get_vocab() != self.tok.get_vocab():
            raise SystemExit(f"--init-from {ckpt}: its tokenizer is not the one this code builds")
        clip = CLIPModel.from_pretrained(ckpt / "atp_text_tower", dtype=torch.float32)
        llava = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
        heads = GroundHeads(clip.config.vision_config.hidden_size)
        ground = Grounding(clip, heads, torch.nn.Parameter(torch.tensor(math.log(10.0))))
        r = self.r
        self.print(f"phases 1-4 from {ckpt} (float16 weights, read as float32)")
        self.save_state(
            init_from=str(ckpt),
            clip=clip.state_dict(),
            clip_step=r.clip_steps,
            ground=ground.state_dict(),
            ground_step=r.ground_steps,
            llava=llava.state_dict(),
            llava_step=r.llava_steps,
            tune=llava.state_dict(),
            tune_step=r.tune_steps,
        )

    def finished(self, out: Path) -> bool:
        """True when this recipe's run is done and its checkpoint and report are in ``out``."""
        return bool(self.state.get("done")) and (out / "config.json").is_file() and (out / "metrics.json").is_file()

    def run(self, out: Path, checkpoint_every_s: float = 180.0) -> dict:
        """Every phase in order (each resumes from the saved state); returns the report (``metrics.json``)."""
        if self.finished(out):
            self.print(f"{out} is already trained (state in {self.work}); --fresh retrains")
            return json.loads((out / "metrics.json").read_text())
        r = self.r
        # rich's bar, percentage and ETA, plus each phase's running losses and the time spent.
        cols = (*Progress.get_default_columns(), TextColumn("{task.fields[info]}"), TimeElapsedColumn())
        times: dict[str, float] = dict(self.state.get("times", {}))

        def timed(name: str, fn, *args):
            t = time.monotonic()
            value = fn(*args)
            times[name] = times.get(name, 0.0) + time.monotonic() - t
            return value

        self.print(f"the towers train in {tower_precision(r)} on this CPU (bfloat16 only where it is native)")
        with Progress(*cols, refresh_per_second=1) as progress:
            frames = timed("render", render_frames, self.work, "train", r.train_images, r, progress)
            val = timed("render", render_frames, self.work, "val", r.val_images, r, progress)
            clip = timed("clip", train_clip, self, frames, progress, checkpoint_every_s)
            clip = timed("ground", ground_clip, self, clip, frames, progress, checkpoint_every_s)
            feats = timed("features", features, clip, frames, r, progress, "features train")
            val_feats = timed("features", features, clip, val, r, progress, "features val")
            inner = 0.0

            def dialog_tower():
                # Phase 5's tower: ``clip`` touched up in place (``dialog_tower_steps``), its features computed again.
                nonlocal inner
                t = time.monotonic()
                timed("tower", touch_up_tower, self, clip, frames, progress, checkpoint_every_s)
                out = (
                    clip,
                    timed("features", features, clip, frames, r, progress, "features train (phase 5)"),
                    timed("features", features, clip, val, r, progress, "features val (phase 5)"),
                )
                inner = time.monotonic() - t
                return out

            model = timed(
                "llava",
                train_llava,
                self,
                clip,
                (frames, feats),
                (val, val_feats),
                progress,
                checkpoint_every_s,
                dialog_tower if r.dialog_tower_steps else None,
            )
            times["llava"] -= inner  # the touch-up and its features are counted as "tower" and "features"
            save_cell_checkpoint(out, model, clip, self.tok, r)
            plot_learning_curve(self.log_path, out / "learning_curve.png")
            report = timed("test", evaluate, out, r, progress)
        report |= {"recipe": asdict(r), "sizes": sizes(out), "seconds": {k: round(v, 1) for k, v in times.items()}}
        report["tower_precision"] = tower_precision(r)
        (out / "metrics.json").write_text(json.dumps(report, indent=1) + "\n")
        self.save_state(done=True, times=times)
        self.print(f"saved {out}")
        return report


def save_cell_checkpoint(out: Path, model, clip, tok, r: Recipe) -> None:
    """warehouse-tiny's checkpoint layout (float16 LLaVA + processor + ``atp_text_tower/``) at 256 px."""
    from transformers import LlavaProcessor

    save_checkpoint(out, model, clip, tok, r, chat_template(r))
    processor = LlavaProcessor.from_pretrained(out)
    square = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    processor.image_processor.size = dict(square)
    processor.image_processor.crop_size = dict(square)
    processor.save_pretrained(out)


def sizes(out: Path) -> dict:
    """Parameter counts and safetensors megabytes of the checkpoint and its text tower."""
    files = sorted(out.rglob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    return {
        "safetensors_mb": round(total / 1e6, 2),
        "files": {str(f.relative_to(out)): f.stat().st_size for f in files},
    }
