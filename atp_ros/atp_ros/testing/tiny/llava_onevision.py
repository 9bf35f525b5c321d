"""Tiny random LLaVA-OneVision checkpoints, built with the stock classes and processors.

:func:`save_tiny_llava_onevision` writes, under one directory::

    <path>/                  LlavaOnevisionForConditionalGeneration + LlavaOnevisionProcessor (image and video
                             processors, tokenizer, chat template; save_pretrained, safetensors)
    <path>/atp_text_tower/   SiglipModel + tokenizer whose vision side is a copy of the VLM's tower with a
                             pooling head: the SigLIP text tower the tower came from (here random)

Layout mirrors llava-onevision-qwen2-7b at toy widths: a SigLIP tower (no CLS) at 32 px / patch 4 = 8x8
patches per crop, the ``full`` feature strategy, a base crop plus an anyres grid chosen from
``image_grid_pinpoints`` (up to 3x3 crops of 32 px), unpadded to the frame's aspect, bilinearly pooled
beyond ``anyres_max_9``, one newline embedding at the end of every grid row (none for the base crop).

Built under a forked, seeded RNG: the same arguments give the same bytes.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    SiglipConfig,
    SiglipModel,
)

from atp_ros.backends.loading import TEXT_TOWER_SUBDIR
from atp_ros.testing.tiny.common import (
    save_text_tower,
    seeded,
    set_special_ids,
    start_checkpoint,
    text_tower_text_config,
)
from atp_ros.testing.tiny.tokenizer import make_tiny_tokenizer

SPECIAL_TOKENS = ["<image>", "<video>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32], [64, 96], [96, 64], [96, 96]]


def save_tiny_llava_onevision(
    path: str | Path,
    image_size: int = 32,
    patch_size: int = 4,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    text_hidden: int = 64,
    text_layers: int = 2,
    with_text_tower: bool = True,
    seed: int = 0,
) -> Path:
    """Build and save a tiny random LLaVA-OneVision (+ its SigLIP text tower); returns the directory."""
    out, tok = start_checkpoint(path, image_size, patch_size, SPECIAL_TOKENS)
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": vision_hidden,
        "intermediate_size": 2 * vision_hidden,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": patch_size,
        "vision_use_head": False,
    }
    text = {
        "model_type": "qwen2",
        "vocab_size": len(tok),
        "hidden_size": text_hidden,
        "intermediate_size": 2 * text_hidden,
        "num_hidden_layers": text_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "tie_word_embeddings": False,
    }
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=PINPOINTS,
        tie_word_embeddings=False,
    )
    config.pad_token_id = tok.pad_token_id
    with seeded(seed):
        model = LlavaOnevisionForConditionalGeneration(config).eval()
        set_special_ids(model.generation_config, tok)
        model.save_pretrained(out, safe_serialization=True)
        if with_text_tower:
            _save_siglip_tower(out / TEXT_TOWER_SUBDIR, vision, model)
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": image_size, "width": image_size}, image_grid_pinpoints=PINPOINTS
    )
    video_processor = LlavaOnevisionVideoProcessor(size={"height": image_size, "width": image_size})
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )
    processor.save_pretrained(out)
    return out


def _save_siglip_tower(path: Path, vision: dict, vlm) -> None:
    tok = make_tiny_tokenizer(SPECIAL_TOKENS)
    text = text_tower_text_config(tok, layers=1, max_positions=32) | {"projection_size": vision["hidden_size"]}
    vis = {k: v for k, v in vision.items() if k != "model_type"} | {"vision_use_head": True}
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vis)).eval()
    save_text_tower(path, model, vlm.model.vision_tower.state_dict(), tok, allowed_missing=("head.",))


__all__ = ["CHAT_TEMPLATE", "PINPOINTS", "SPECIAL_TOKENS", "TEXT_TOWER_SUBDIR", "save_tiny_llava_onevision"]
