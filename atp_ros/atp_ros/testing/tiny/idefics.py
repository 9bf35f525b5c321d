"""Tiny random IDEFICS (open Flamingo) checkpoints with a matching HF CLIP text tower.

:func:`save_tiny_idefics` writes, under one directory::

    <path>/                  IdeficsForVisionText2Text + IdeficsProcessor (save_pretrained, safetensors)
    <path>/atp_text_tower/   CLIPModel + tokenizer: the "matching text tower" ATP uses for S_inter

IDEFICS' vision tower is a CLIP ViT (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` for
idefics-9b/80b). The text tower's vision side here is a copy of the tiny IDEFICS tower (same
weights, so its ``post_layernorm`` + ``visual_projection`` apply to IDEFICS patch states);
its text side is random. The checkpoint proves the code path, not answer quality.

Layout mirrors idefics-9b: perceiver resampler on (``use_resampler=True``), a gated
cross-attention block before every decoder layer, one ``<image>`` token per image in the
text. The gates start at ``tanh(1)`` (``alpha_initializer="ones"``) instead of the
untrained ``zeros`` so the image actually reaches the language model.

Built under a forked, seeded RNG: the same arguments give the same weights.
"""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPConfig, CLIPModel, IdeficsConfig, IdeficsForVisionText2Text, IdeficsProcessor
from transformers.models.idefics.image_processing_idefics import IdeficsImageProcessor

from atp_ros.backends.loading import TEXT_TOWER_SUBDIR
from atp_ros.testing.tiny.common import (
    save_text_tower,
    seeded,
    set_special_ids,
    start_checkpoint,
    text_tower_text_config,
)
from atp_ros.testing.tiny.tokenizer import make_tiny_tokenizer

SPECIAL_TOKENS = ["<image>", "<fake_token_around_image>", "<end_of_utterance>"]


def save_tiny_idefics(
    path: str | Path,
    image_size: int = 32,
    patch_size: int = 4,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    text_hidden: int = 32,
    text_layers: int = 2,
    n_latents: int = 4,
    resampler_depth: int = 2,
    use_resampler: bool = True,
    with_text_tower: bool = True,
    seed: int = 0,
) -> Path:
    """Build and save a tiny random IDEFICS (+ its CLIP text tower); returns the directory.

    With the defaults the ViT sees ``(32 / 4) ** 2 = 64`` patches plus CLS and the resampler
    compresses them to ``n_latents`` latents. ``with_text_tower=False`` leaves out
    ``atp_text_tower/`` (the CLS-only fallback path).
    """
    out, tok = start_checkpoint(path, image_size, patch_size, SPECIAL_TOKENS)
    vision = {
        "embed_dim": vision_hidden,
        "image_size": image_size,
        "patch_size": patch_size,
        "intermediate_size": 2 * vision_hidden,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": 4,
    }
    config = IdeficsConfig(
        vocab_size=len(tok),
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        cross_layer_interval=1,
        alpha_initializer="ones",
        use_resampler=use_resampler,
        vision_config=vision,
        perceiver_config={
            "use_resampler": use_resampler,
            "resampler_n_latents": n_latents,
            "resampler_depth": resampler_depth,
            "resampler_n_heads": 2,
            "resampler_head_dim": 8,
        },
        initializer_range=0.05,  # 0.02 drowns the image signal in this tiny model, 0.2 saturates it
    )
    with seeded(seed):
        model = IdeficsForVisionText2Text(config).eval()
        set_special_ids(model.generation_config, tok)
        model.save_pretrained(out, safe_serialization=True)
        if with_text_tower:
            _save_clip_tower(out / TEXT_TOWER_SUBDIR, vision, model)
    image_processor = IdeficsImageProcessor(image_size=image_size)
    IdeficsProcessor(image_processor=image_processor, tokenizer=tok, image_size=image_size).save_pretrained(out)
    return out


def _save_clip_tower(path: Path, vision: dict, vlm: IdeficsForVisionText2Text) -> None:
    """A CLIPModel whose vision side is the IDEFICS tower, plus a tiny tokenizer."""
    tok = make_tiny_tokenizer()
    text = text_tower_text_config(tok, layers=1, max_positions=32)
    vis = {
        "hidden_size": vision["embed_dim"],
        "image_size": vision["image_size"],
        "patch_size": vision["patch_size"],
        "intermediate_size": vision["intermediate_size"],
        "num_hidden_layers": vision["num_hidden_layers"],
        "num_attention_heads": vision["num_attention_heads"],
    }
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vis, projection_dim=16)).eval()
    # IdeficsVisionTransformer uses CLIP's parameter names, so its weights load as they are.
    save_text_tower(path, model, vlm.model.vision_model.state_dict(), tok)


__all__ = ["SPECIAL_TOKENS", "TEXT_TOWER_SUBDIR", "save_tiny_idefics"]
