"""Phase 1 and 2 of the cell model: the CLIP (global + region loss) and the cached frozen-tower features."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from rich.progress import Progress
from torch import Tensor

from atp_ros.warehouse.cell.model.data import Frames, clip_texts
from atp_ros.warehouse.cell.model.loop import Phase, run_phase
from atp_ros.warehouse.cell.model.recipe import (
    IMAGE_SIZE,
    NUM_PATCHES,
    PATCH,
    TEXT_POSITIONS,
    Recipe,
    bf16_forward,
    llava_feature_layers,
    normalize,
    plain_forward,
)
from atp_ros.warehouse.train_clip import clip_config, clip_losses

if TYPE_CHECKING:
    from atp_ros.warehouse.cell.model.run import CellTrainer


def cell_clip_config(r: Recipe, tok):
    """warehouse-tiny's CLIP config at the cell's geometry (256 px, patch 16) and widths."""
    config = clip_config(r, tok)
    config.vision_config.image_size = IMAGE_SIZE
    config.vision_config.patch_size = PATCH
    config.vision_config.num_attention_heads = r.vision_heads
    config.text_config.max_position_embeddings = TEXT_POSITIONS
    return config


def clip_step(clip, tok, frames: Frames, rng: np.random.Generator, r: Recipe, dense_scale) -> tuple[Tensor, Tensor]:
    """The global and region losses of one random batch."""
    idx = np.sort(rng.choice(len(frames), size=min(r.clip_batch, len(frames)), replace=False))
    caps, texts, rimg, rmask = clip_texts(frames, idx, rng, r)
    return clip_losses(clip, tok, normalize(frames.rgb[idx]), caps, texts, rimg, rmask, dense_scale)


def train_clip(trainer: CellTrainer, frames: Frames, progress: Progress, checkpoint_every_s: float):
    """Phase 1, resumed from ``trainer.state`` and checkpointed into it; returns the frozen CLIP."""
    from transformers import CLIPModel

    r = trainer.r
    torch.manual_seed(r.seed)
    clip = CLIPModel(cell_clip_config(r, trainer.tok))
    dense_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    opt = torch.optim.AdamW([*clip.parameters(), dense_scale], lr=r.clip_lr, weight_decay=0.05)
    bf16_forward(clip.vision_model, r)
    bf16_forward(clip.text_model, r)
    if "dense_scale" in trainer.state:
        dense_scale.data.fill_(trainer.state["dense_scale"])

    def one_step(rng: np.random.Generator, step: int):
        g_loss, r_loss = clip_step(clip, trainer.tok, frames, rng, r, dense_scale)
        logged = {"global_loss": g_loss.item(), "region_loss": r_loss.item()}
        return g_loss + r_loss, logged, f"global {g_loss.item():.3f} region {r_loss.item():.3f}"

    phase = Phase("clip", r.clip_steps, r.clip_lr, stream=1)
    run_phase(
        trainer,
        phase,
        clip,
        opt,
        one_step,
        progress,
        checkpoint_every_s,
        extra_state=lambda: {"dense_scale": dense_scale.item()},
    )
    plain_forward(clip.vision_model)  # the cached features are the float32 ones inference computes
    plain_forward(clip.text_model)
    return clip.requires_grad_(False)


def features(clip, frames: Frames, r: Recipe, progress: Progress, desc: str) -> Tensor:
    """Phase 2: what the LLaVA projector reads of every frame (``hidden_states`` of the recipe's feature
    layers, CLS dropped, concatenated as llava does), float16 ``(N, NUM_PATCHES, D * layers)``."""
    layers = llava_feature_layers(r)
    layers = layers if isinstance(layers, list) else [layers]
    out = torch.empty((len(frames), NUM_PATCHES, r.vision_hidden * len(layers)), dtype=torch.float16)
    task = progress.add_task(desc, total=len(frames), info="")
    with torch.inference_mode():
        for s in range(0, len(frames), 64):
            x = normalize(frames.rgb[s : s + 64])
            hs = clip.vision_model(pixel_values=x, output_hidden_states=True).hidden_states
            out[s : s + 64] = torch.cat([hs[k][:, 1:] for k in layers], dim=-1).half()
            progress.advance(task, len(x))
    return out
