"""Tiny random LLaVA-NeXT (1.6) checkpoints, built with the stock classes and processors.

:func:`save_tiny_llava_next` writes, under one directory::

    <path>/                  LlavaNextForConditionalGeneration + LlavaNextProcessor (save_pretrained, safetensors)
    <path>/atp_text_tower/   CLIPModel + tokenizer whose vision side is a copy of the VLM's tower: the CLIP the
                             tower came from (as llava-v1.6 pairs with openai/clip-vit-large-patch14-336)

Layout mirrors llava-v1.6 at toy widths: a CLIP tower (CLS first) at 32 px / patch 4 = 8x8 patches per crop,
feature layer -2 with the ``default`` strategy (CLS dropped), a base crop plus the best grid of
``image_grid_pinpoints`` (up to 2x2 crops), unpadded to the frame's aspect, one newline per grid row.

Built under a forked, seeded RNG: the same arguments give the same bytes.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    CLIPConfig,
    CLIPModel,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
)

from atp_ros.backends.loading import TEXT_TOWER_SUBDIR
from atp_ros.testing.tiny.common import (
    save_text_tower,
    seeded,
    set_special_ids,
    start_checkpoint,
    text_tower_text_config,
)
from atp_ros.testing.tiny.llava import CHAT_TEMPLATE
from atp_ros.testing.tiny.tokenizer import make_tiny_tokenizer

PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def save_tiny_llava_next(
    path: str | Path,
    image_size: int = 32,
    patch_size: int = 4,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    text_hidden: int = 64,
    text_layers: int = 2,
    with_text_tower: bool = True,
    seed: int = 0,
) -> Path:
    """Build and save a tiny random LLaVA-NeXT (+ its CLIP text tower); returns the directory."""
    out, tok = start_checkpoint(path, image_size, patch_size, ["<image>"])
    vision = {
        "hidden_size": vision_hidden,
        "intermediate_size": 2 * vision_hidden,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": patch_size,
        "projection_dim": vision_hidden,
    }
    text = {
        "model_type": "llama",
        "vocab_size": len(tok),
        "hidden_size": text_hidden,
        "intermediate_size": 2 * text_hidden,
        "num_hidden_layers": text_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "tie_word_embeddings": False,
    }
    config = LlavaNextConfig(
        vision_config={"model_type": "clip_vision_model", **vision},
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=PINPOINTS,
        tie_word_embeddings=False,
    )
    config.pad_token_id = tok.pad_token_id
    with seeded(seed):
        model = LlavaNextForConditionalGeneration(config).eval()
        set_special_ids(model.generation_config, tok)
        model.save_pretrained(out, safe_serialization=True)
        if with_text_tower:
            clip_tok = make_tiny_tokenizer(["<image>"])
            text_cfg = text_tower_text_config(clip_tok, layers=1, max_positions=32)
            clip = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision, projection_dim=vision_hidden))
            save_text_tower(out / TEXT_TOWER_SUBDIR, clip.eval(), model.model.vision_tower.state_dict(), clip_tok)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=PINPOINTS,
    )
    LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(out)
    return out


__all__ = ["PINPOINTS", "TEXT_TOWER_SUBDIR", "save_tiny_llava_next"]
