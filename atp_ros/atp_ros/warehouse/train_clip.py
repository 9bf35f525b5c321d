"""Phase 1 of ``make train-tiny``: the small CLIP, trained with a global and a region loss (see ``train``)."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import Tensor

from atp_ros.warehouse.scenes import Scene, captions_for_scene, evidence_mask, questions_for_scene
from atp_ros.warehouse.train_data import GRID, IMAGE_SIZE, NUM_PATCHES, PATCH, Recipe, encode_texts, lr_at

if TYPE_CHECKING:
    from atp_ros.warehouse.train import Trainer


def clip_config(r: Recipe, tok):
    from transformers import CLIPConfig

    text = {
        "vocab_size": len(tok),
        "hidden_size": r.text_hidden,
        "intermediate_size": 4 * r.text_hidden,
        "num_hidden_layers": r.text_layers,
        "num_attention_heads": 4,
        "max_position_embeddings": 40,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,  # id 3: CLIP pools at the first EOS (not the legacy argmax rule of id 2)
    }
    vision = {
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH,
        "hidden_size": r.vision_hidden,
        "intermediate_size": 4 * r.vision_hidden,
        "num_hidden_layers": r.vision_layers,
        "num_attention_heads": 4,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=r.vision_hidden)


def clip_batch(scenes: list[Scene], idx: np.ndarray, rng: np.random.Generator):
    """Captions (one per image) and region texts with their evidence patch masks."""
    captions, region_texts, region_img, region_masks = [], [], [], []
    for b, i in enumerate(idx):
        sc = scenes[int(i)]
        facts = captions_for_scene(sc, rng, facts=int(rng.integers(2, 4)))
        captions.append(" and ".join(f for f, _ in facts))
        regions = [(q.question, q.evidence) for q in questions_for_scene(sc, rng, 3) if q.evidence]
        regions += [(f, ev) for f, ev in captions_for_scene(sc, rng, facts=1)]
        for text, ev in regions:
            region_texts.append(text)
            region_img.append(b)
            region_masks.append(evidence_mask(ev, sc.rgb.shape[:2], (GRID, GRID)).reshape(-1))
    return captions, region_texts, np.array(region_img), np.stack(region_masks)


def clip_losses(model, tok, px: Tensor, captions, region_texts, region_img, region_masks, dense_scale):
    vis = model.vision_model(pixel_values=px)
    img = F.normalize(model.visual_projection(vis.pooler_output), dim=-1)  # (B, E)
    patches = F.normalize(
        model.visual_projection(model.vision_model.post_layernorm(vis.last_hidden_state[:, 1:])), dim=-1
    )
    ids, mask = encode_texts(tok, captions + region_texts)
    txt = model.text_model(input_ids=ids, attention_mask=mask).pooler_output
    txt = F.normalize(model.text_projection(txt), dim=-1)  # (B + R, E)
    cap, reg = txt[: len(captions)], txt[len(captions) :]
    logits = model.logit_scale.exp() * img @ cap.T
    target = torch.arange(len(captions))
    global_loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    # Region loss: each text's softmax over its own image's patches, mass on the evidence patches.
    sims = dense_scale.exp() * torch.einsum("rne,re->rn", patches[torch.as_tensor(region_img)], reg)  # (R, N)
    ev = torch.as_tensor(region_masks)
    region_loss = (torch.logsumexp(sims, -1) - torch.logsumexp(sims.masked_fill(~ev, -1e4), -1)).mean()
    return global_loss, region_loss


def train_clip(trainer: Trainer, scenes: list[Scene], px: np.ndarray, progress: Progress, checkpoint_every_s: float):
    """Phase 1, resumed from ``trainer.state`` and checkpointed into it; returns the frozen CLIP."""
    from transformers import CLIPModel

    r = trainer.r
    clip = CLIPModel(clip_config(r, trainer.tok))
    dense_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    opt = torch.optim.AdamW([*clip.parameters(), dense_scale], lr=r.clip_lr, weight_decay=0.05)
    step = 0
    if "clip" in trainer.state:
        clip.load_state_dict(trainer.state["clip"])
        dense_scale.data.fill_(trainer.state["dense_scale"])
        if "clip_opt" in trainer.state:
            opt.load_state_dict(trainer.state["clip_opt"])
        step = trainer.state.get("clip_step", r.clip_steps)
    task = progress.add_task("clip", total=r.clip_steps, completed=step, info="")
    rng = np.random.default_rng([r.seed, 1, step])
    last = time.monotonic()
    clip.train()
    while step < r.clip_steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, r.clip_steps, r.clip_lr)
        idx = rng.choice(len(scenes), size=r.clip_batch, replace=False)
        caps, texts, rimg, rmask = clip_batch(scenes, idx, rng)
        g_loss, r_loss = clip_losses(
            clip, trainer.tok, torch.from_numpy(px[idx]).float(), caps, texts, rimg, rmask, dense_scale
        )
        opt.zero_grad(set_to_none=True)
        (g_loss + r_loss).backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        step += 1
        progress.update(task, completed=step, info=f"global {g_loss.item():.3f} region {r_loss.item():.3f}")
        trainer.log(phase="clip", step=step, global_loss=g_loss.item(), region_loss=r_loss.item())
        if time.monotonic() - last > checkpoint_every_s or step == r.clip_steps:
            last = time.monotonic()
            done = {"clip_opt": opt.state_dict()} if step < r.clip_steps else {}
            trainer.save_state(clip=clip.state_dict(), dense_scale=dense_scale.item(), clip_step=step, **done)
    clip.eval().requires_grad_(False)
    trainer.state.pop("clip_opt", None)
    return clip


def features(clip, px: np.ndarray, r: Recipe, progress: Progress, desc: str) -> Tensor:
    """Phase 2: the LLaVA feature layer (``hidden_states[feature_layer]``, CLS dropped) of every image,
    float16 ``(N, 144, D)``."""
    out = torch.empty((len(px), NUM_PATCHES, r.vision_hidden), dtype=torch.float16)
    task = progress.add_task(desc, total=len(px), info="")
    with torch.inference_mode():
        for s in range(0, len(px), 128):
            x = torch.from_numpy(px[s : s + 128]).float()
            hs = clip.vision_model(pixel_values=x, output_hidden_states=True).hidden_states
            out[s : s + 128] = hs[r.feature_layer][:, 1:].half()
            progress.advance(task, len(x))
    return out
