"""Tiny random Qwen2.5-VL checkpoints, built with the stock classes and processors.

:func:`save_tiny_qwen2_5_vl` writes, under one directory::

    <path>/                  Qwen2_5_VLForConditionalGeneration + Qwen2_5_VLProcessor (image processor,
                             video processor, tokenizer, chat template; save_pretrained, safetensors)
    <path>/atp_text_tower/   (``with_text_tower=True``) a SiglipModel whose vision width is the ViT's:
                             a text tower *given* to a family that has none of its own

Layout mirrors Qwen2.5-VL-3B/7B at toy widths: patch 4 (14 in the real models), 2x2 merger, temporal
patch 2, window attention with full-attention blocks 1 and 3 of 4, a window of 16 px = 2x2 merged
tokens (112 px = 4x4 in the real models) so the window order differs from raster order, M-RoPE
sections for a 16-wide head. The image processor keeps frames between 16x16 and 64x64 px: a
64x48 frame gives a 16x12 patch grid = 8x6 = 48 LLM tokens, 40x50 -> 10x12 patches -> 30 tokens.

The SigLIP text tower's weights are random and unrelated to the ViT: it proves the code path of a
given tower (the approximation the backend's load notes name), not a joint space.

Built under a forked, seeded RNG: the same arguments give the same bytes.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    SiglipConfig,
    SiglipModel,
)

from atp_ros.backends.loading import TEXT_TOWER_SUBDIR
from atp_ros.testing.tiny.common import seeded, set_special_ids, start_checkpoint, text_tower_text_config
from atp_ros.testing.tiny.tokenizer import make_tiny_tokenizer

SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen2.5-VL's chat layout, reduced to a user turn with images then text, and the generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_qwen2_5_vl(
    path: str | Path,
    patch_size: int = 4,
    vision_hidden: int = 32,
    vision_layers: int = 4,
    fullatt_blocks: tuple[int, ...] = (1, 3),
    window_size: int = 16,
    text_hidden: int = 64,
    text_layers: int = 2,
    min_pixels: int = 16 * 16,
    max_pixels: int = 64 * 64,
    with_text_tower: bool = True,
    seed: int = 0,
    vision_overrides: dict | None = None,
    text_overrides: dict | None = None,
) -> Path:
    """Build and save a tiny random Qwen2.5-VL (+ optionally a given SigLIP text tower); returns the directory.

    ``vision_overrides`` / ``text_overrides`` replace entries of the tower / LLM configs (the benchmarks
    build realistic-width random checkpoints so).
    """
    merge, temporal = 2, 2
    out, tok = start_checkpoint(path, patch_size * merge, patch_size, SPECIAL_TOKENS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    heads = int((text_overrides or {}).get("num_attention_heads", 4))
    head_dim = text_hidden // heads
    vision = {
        "depth": vision_layers,
        "hidden_size": vision_hidden,
        "intermediate_size": 2 * vision_hidden,
        "num_heads": 4,
        "patch_size": patch_size,
        "spatial_merge_size": merge,
        "temporal_patch_size": temporal,
        "window_size": window_size,
        "out_hidden_size": text_hidden,
        "fullatt_block_indexes": list(fullatt_blocks),
        "initializer_range": 0.05,
    } | (vision_overrides or {})
    half = head_dim // 2  # M-RoPE: temporal, height and width sections of the head's rotary pairs
    text = {
        "vocab_size": len(tok),
        "hidden_size": text_hidden,
        "intermediate_size": 2 * text_hidden,
        "num_hidden_layers": text_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [half // 4, 3 * half // 8, 3 * half // 8],  # as Qwen2.5-VL's [16, 24, 24] of 64
        },
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "initializer_range": 0.05,
    } | (text_overrides or {})
    config = Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with seeded(seed):
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
        set_special_ids(model.generation_config, tok)
        model.save_pretrained(out, safe_serialization=True)
        if with_text_tower:
            _save_siglip_tower(out / TEXT_TOWER_SUBDIR, int(vision["hidden_size"]))
    sizes = {"patch_size": patch_size, "merge_size": merge, "temporal_patch_size": temporal}
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, **sizes)
    video_processor = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels, **sizes)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tok, video_processor=video_processor, chat_template=CHAT_TEMPLATE
    )
    processor.save_pretrained(out)
    return out


def _save_siglip_tower(path: Path, vision_hidden: int) -> None:
    """A random SiglipModel (with its pooling head) whose vision width is ``vision_hidden``, plus a tokenizer."""
    tok = make_tiny_tokenizer()
    text = text_tower_text_config(tok, layers=1, max_positions=32) | {"projection_size": vision_hidden}
    vis = {
        "hidden_size": vision_hidden,
        "intermediate_size": 2 * vision_hidden,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "image_size": 16,
        "patch_size": 8,
        "vision_use_head": True,
    }
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vis)).eval()
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "TEXT_TOWER_SUBDIR", "save_tiny_qwen2_5_vl"]
