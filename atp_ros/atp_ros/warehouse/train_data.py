"""Training data of ``warehouse-tiny``: the recipe, the tokenizer, rendered frames as CLIP pixels.

What both training phases (``train_clip``, ``train_llava``) share; ``train`` drives them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from rich.progress import Progress
from torch import Tensor

from atp_ros.testing.tiny.llava import IMAGE_TOKEN
from atp_ros.warehouse.scenes import Scene, question_words, render_scene, split_seed

IMAGE_SIZE = 192
PATCH = 16
GRID = IMAGE_SIZE // PATCH  # 12
NUM_PATCHES = GRID * GRID  # 144
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CHAT_WORDS = ["user", "assistant"]


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights (seeded: the same recipe gives the same model)."""

    seed: int = 0
    train_images: int = 24_000
    wide_share: float = 0.2  # share of training frames rendered 4:3 and squeezed (camera frames are 4:3)
    clip_steps: int = 700
    clip_batch: int = 64
    clip_lr: float = 1e-3
    llava_steps: int = 1800
    llava_batch: int = 32
    llava_turns: int = 6
    llava_lr: float = 1e-3
    drop_share: float = 0.3  # sequences trained on a random subset of image tokens
    # Attention supervision: in this LM layer, these heads of the answer-predicting position are
    # taught to look at the question's evidence patches (the generator knows where they are).
    sup_layer: int = 2
    sup_heads: int = 2
    sup_weight: float = 1.0
    # The LLM reads the tower's last layer: the one the region loss aligned with the questions' words,
    # so "top shelf, slot two" is a direction in the patch states, not only a position.
    feature_layer: int = -1
    # Question kinds drawn for the LLM (repeats weigh a kind up: slot-bound lookups are the hard part).
    llava_kinds: tuple[str, ...] = (
        "color_at",
        "color_at",
        "label_at",
        "label_at",
        "which_level",
        "left_right",
        "count",
        "exists",
        "gripper",
        "aisle",
    )
    vision_hidden: int = 128
    vision_layers: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    lm_hidden: int = 256
    lm_layers: int = 4
    lm_intermediate: int = 640


CLIP_FIELDS = (
    "seed",
    "train_images",
    "wide_share",
    "clip_steps",
    "clip_batch",
    "clip_lr",
    "vision_hidden",
    "vision_layers",
    "text_hidden",
    "text_layers",
)


def clip_part(recipe: dict) -> dict:
    """The recipe fields that decide the CLIP phase (a saved CLIP is reused while they are unchanged)."""
    return {k: recipe.get(k) for k in CLIP_FIELDS}


def make_tokenizer():
    from atp_ros.testing.tiny.tokenizer import make_tiny_tokenizer

    tok = make_tiny_tokenizer([IMAGE_TOKEN], vocab_size=0, words=CHAT_WORDS + question_words())
    tok.padding_side = "left"
    return tok


def pixels(rgb: np.ndarray) -> np.ndarray:
    """What the shipped CLIPImageProcessor does: bicubic resize to 192 x 192 (no crop), rescale, normalize."""
    img = Image.fromarray(rgb)
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return x.transpose(2, 0, 1)


def render_pool(split: str, count: int, wide_share: float, seed: int, desc: str, progress: Progress):
    """Scenes of ``split`` (offsets ``0..count-1``), their normalized pixels (float16) and per-scene RNG seeds."""
    rng = np.random.default_rng(seed)
    scenes: list[Scene] = []
    px = np.empty((count, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float16)
    task = progress.add_task(desc, total=count, info="")
    for i in range(count):
        wide = rng.random() < wide_share
        h, w = (IMAGE_SIZE, IMAGE_SIZE * 4 // 3) if wide else (IMAGE_SIZE, IMAGE_SIZE)
        sc = render_scene(split_seed(split, i), height=h, width=w)
        px[i] = pixels(sc.rgb)
        scenes.append(sc)
        progress.advance(task)
    return scenes, px


def encode_texts(tok, texts: list[str], max_len: int = 40) -> tuple[Tensor, Tensor]:
    """Right-padded ids with EOS appended (CLIP pools there) and the attention mask."""
    rows = [[*tok(t, add_special_tokens=False)["input_ids"][: max_len - 1], tok.eos_token_id] for t in texts]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def lr_at(step: int, total: int, peak: float, warmup: int = 150) -> float:
    """Linear warmup to ``peak``, then a cosine decay to 5% of it at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))
