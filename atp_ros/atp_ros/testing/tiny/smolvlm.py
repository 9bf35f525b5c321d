"""Tiny random SmolVLM2 / Idefics3 checkpoints, built with the stock classes and processors.

:func:`save_tiny_smolvlm` writes, under one directory::

    <path>/                  SmolVLMForConditionalGeneration + SmolVLMProcessor (``kind="smolvlm"``) or
                             Idefics3ForConditionalGeneration + Idefics3Processor (``kind="idefics3"``)
    <path>/atp_text_tower/   SiglipModel + tokenizer whose vision side is a copy of the VLM's tower with a
                             pooling head: the SigLIP text tower SmolVLM's tower came from (here random)

Layout mirrors SmolVLM2 at toy widths: a SigLIP tower at 32 px / patch 4 = 8x8 patches per tile, pixel
shuffle with scale 2 -> 16 LLM tokens per tile (SmolVLM2-500M: 512 px / 16 = 32x32 -> 64 with scale 4),
image splitting into 32-px tiles of a frame resized to a 64-px longest edge (up to 2x2 tiles) plus one
global tile, ``<fake_token_around_image>``, ``<row_i_col_j>`` and ``<global-img>`` as text tokens.

Built under a forked, seeded RNG: the same arguments give the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from transformers import SiglipConfig, SiglipModel

from atp_ros.backends.loading import TEXT_TOWER_SUBDIR
from atp_ros.testing.tiny.common import (
    save_text_tower,
    seeded,
    set_special_ids,
    start_checkpoint,
    text_tower_text_config,
)
from atp_ros.testing.tiny.tokenizer import make_tiny_tokenizer

MAX_TILES_SIDE = 4  # <row_i_col_j> tokens for up to 4 x 4 tiles
SPECIAL_TOKENS = [
    "<image>",
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
    *[f"<row_{r}_col_{c}>" for r in range(1, MAX_TILES_SIDE + 1) for c in range(1, MAX_TILES_SIDE + 1)],
]

# SmolVLM's chat layout, reduced: "User:" + the image's tokens + the text, then "Assistant:".
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>' }}"
    "{% elif content['type'] == 'text' %}{{ ' ' + content['text'] }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def save_tiny_smolvlm(
    path: str | Path,
    kind: Literal["smolvlm", "idefics3"] = "smolvlm",
    tile_size: int = 32,
    patch_size: int = 4,
    scale_factor: int = 2,
    longest_edge: int = 64,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    text_hidden: int = 64,
    text_layers: int = 2,
    with_text_tower: bool = True,
    seed: int = 0,
) -> Path:
    """Build and save a tiny random SmolVLM2 (or Idefics3) + its SigLIP text tower; returns the directory."""
    import transformers

    out, tok = start_checkpoint(path, tile_size, patch_size, SPECIAL_TOKENS)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    vision = {
        "hidden_size": vision_hidden,
        "intermediate_size": 2 * vision_hidden,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": 4,
        "image_size": tile_size,
        "patch_size": patch_size,
        "initializer_range": 0.05,
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
        "initializer_range": 0.05,
    }
    prefix = "SmolVLM" if kind == "smolvlm" else "Idefics3"
    config_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix}ForConditionalGeneration")
    config = config_cls(
        vision_config=vision,
        text_config=text,
        scale_factor=scale_factor,
        image_token_id=image_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    seq_len = (tile_size // patch_size) ** 2 // scale_factor**2
    with seeded(seed):
        model = model_cls(config).eval()
        set_special_ids(model.generation_config, tok)
        model.save_pretrained(out, safe_serialization=True)
        if with_text_tower:
            _save_siglip_tower(out / TEXT_TOWER_SUBDIR, vision, model)
    images = {
        "do_image_splitting": True,
        "max_image_size": {"longest_edge": tile_size},
        "size": {"longest_edge": longest_edge},
    }
    image_processor = getattr(transformers, f"{prefix}ImageProcessor")(**images)
    processor_cls = getattr(transformers, f"{prefix}Processor")
    extra = {}
    if kind == "smolvlm":
        extra["video_processor"] = transformers.SmolVLMVideoProcessor(**images)
    processor = processor_cls(
        image_processor=image_processor, tokenizer=tok, image_seq_len=seq_len, chat_template=CHAT_TEMPLATE, **extra
    )
    processor.save_pretrained(out)
    return out


def _save_siglip_tower(path: Path, vision: dict, vlm) -> None:
    """A SiglipModel with a pooling head whose vision side is the VLM's tower, plus the tiny tokenizer."""
    tok = make_tiny_tokenizer(SPECIAL_TOKENS)
    text = text_tower_text_config(tok, layers=1, max_positions=32) | {"projection_size": vision["hidden_size"]}
    config = SiglipConfig(text_config=text, vision_config={**vision, "vision_use_head": True})
    model = SiglipModel(config).eval()
    # SmolVLM's tower is SigLIP's encoder without the head: the head stays the text tower's own.
    save_text_tower(path, model, vlm.model.vision_model.state_dict(), tok, allowed_missing=("head.",))


__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "TEXT_TOWER_SUBDIR", "save_tiny_smolvlm"]
