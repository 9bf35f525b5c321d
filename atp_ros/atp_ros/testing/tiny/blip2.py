"""Tiny random BLIP-2 checkpoints (OPT language model) with an open_clip joint-space text tower.

:func:`save_tiny_blip2` writes, under one directory::

    <path>/                  Blip2ForConditionalGeneration + Blip2Processor (save_pretrained, safetensors)
    <path>/atp_text_tower/   open_clip CLIP in open_clip's hub layout (open_clip_config.json +
                             open_clip_model.safetensors): the "matching text tower" for S_inter

The real pairing is Salesforce/blip2-* (ViT-g = EVA01-CLIP-g/14 minus its last block) with
open_clip ``EVA01-g-14``. Here the open_clip model is a small native CLIP whose visual width
equals the tiny BLIP-2 vision width, so its ``ln_post`` + ``proj`` apply to BLIP-2 patch
states. Its weights are random and unrelated to the BLIP-2 tower: the checkpoint proves the
code path, not the quality of the joint space.

Built under a forked, seeded RNG: the same arguments give the same weights and the caller's
RNG state is untouched.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

from atp_ros.backends.loading import TEXT_TOWER_SUBDIR
from atp_ros.testing.tiny.common import seeded, set_special_ids, start_checkpoint

IMAGE_TOKEN = "<image>"


def tiny_openclip_config(vision_width: int, embed_dim: int = 16, image_size: int = 32, patch_size: int = 8) -> dict:
    """``model_cfg`` of a tiny native open_clip CLIP whose visual width is ``vision_width``."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "layers": 1,
            "width": vision_width,
            "head_width": vision_width // 2,
            "patch_size": patch_size,
        },
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def save_tiny_openclip_tower(path: str | Path, vision_width: int, seed: int = 0) -> Path:
    """Build a tiny open_clip CLIP (see :func:`tiny_openclip_config`) and save it under ``path``."""
    import open_clip

    from atp_ros.backends.openclip_tower import save_openclip_tower

    cfg = tiny_openclip_config(vision_width)
    with seeded(seed):
        model = open_clip.model.CLIP(**cfg).eval()
    return save_openclip_tower(model, cfg, path)


def save_tiny_blip2(
    path: str | Path,
    image_size: int = 32,
    patch_size: int = 4,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    qformer_hidden: int = 32,
    qformer_layers: int = 2,
    num_query_tokens: int = 4,
    text_hidden: int = 32,
    text_layers: int = 2,
    with_text_tower: bool = True,
    seed: int = 0,
) -> Path:
    """Build and save a tiny random BLIP-2 (+ its open_clip text tower); returns the directory.

    With the defaults the ViT sees ``(32 / 4) ** 2 = 64`` patches plus CLS, the Q-Former
    cross-attends in every layer and hands ``num_query_tokens`` tokens to a 2-layer OPT.
    ``with_text_tower=False`` leaves out ``atp_text_tower/`` (the CLS-only fallback path).
    """
    out, tok = start_checkpoint(path, image_size, patch_size, [IMAGE_TOKEN])
    tok.image_token = IMAGE_TOKEN  # Blip2Processor reads it instead of adding a new token
    config = Blip2Config(
        vision_config={
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": patch_size,
            "initializer_range": 0.02,  # the BLIP-2 default (1e-10) makes every attention map uniform
        },
        qformer_config={
            "hidden_size": qformer_hidden,
            "intermediate_size": 2 * qformer_hidden,
            "num_hidden_layers": qformer_layers,
            "num_attention_heads": 4,
            "cross_attention_frequency": 1,
            "vocab_size": 64,
            "max_position_embeddings": 64,
            "initializer_range": 0.2,  # larger than BLIP-2's 0.02 so the queries really depend on the image
        },
        text_config={
            "model_type": "opt",
            "vocab_size": len(tok),
            "hidden_size": text_hidden,
            "word_embed_proj_dim": text_hidden,
            "ffn_dim": 2 * text_hidden,
            "num_hidden_layers": text_layers,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "init_std": 0.2,  # OPT's 0.02 gives near-flat logits; larger weights make answers depend on the image
        },
        num_query_tokens=num_query_tokens,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        initializer_range=0.2,  # language projection: query embeddings on the scale of OPT's token embeddings
    )
    with seeded(seed):
        model = Blip2ForConditionalGeneration(config).eval()
        with torch.no_grad():
            # BLIP-2 initializes the learned queries to zeros; distinct queries make the test meaningful.
            model.query_tokens.normal_(std=1.0)
        for gen in (model.generation_config, model.language_model.generation_config):
            set_special_ids(gen, tok)
        model.save_pretrained(out, safe_serialization=True)
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    Blip2Processor(image_processor=image_processor, tokenizer=tok, num_query_tokens=num_query_tokens).save_pretrained(
        out
    )
    if with_text_tower:
        save_tiny_openclip_tower(out / TEXT_TOWER_SUBDIR, vision_hidden, seed=seed + 1)
    return out


__all__ = ["IMAGE_TOKEN", "TEXT_TOWER_SUBDIR", "save_tiny_blip2", "save_tiny_openclip_tower", "tiny_openclip_config"]
