"""Tiny random LLaVA checkpoints (CLIP or SigLIP tower) with a matching joint-space text tower.

:func:`save_tiny_llava` writes, under one directory::

    <path>/                  LlavaForConditionalGeneration + LlavaProcessor (save_pretrained, safetensors)
    <path>/atp_text_tower/   CLIPModel or SiglipModel + tokenizer: the "matching text tower" ATP uses for S_inter

The text tower's vision side is a copy of the VLM's vision tower (same weights), so
patch states of the VLM's tower really live in the text tower's joint space -- just as
``llava-hf/llava-1.5-7b-hf`` pairs with ``openai/clip-vit-large-patch14-336``.

Layouts mirror the real models the backend targets:

* ``tower="clip"``: llava-1.5 style -- CLIP ViT with a CLS token, ``vision_feature_layer=-2``,
  ``vision_feature_select_strategy="default"`` (CLS dropped), LLaMA text model.
* ``tower="siglip"``: llava-interleave-qwen style -- SigLIP ViT without CLS and saved
  without its pooling head (``vision_use_head=False``), ``vision_feature_layer=-1``,
  ``"full"`` strategy, Qwen2 text model. The pooling head lives only in the text tower.

Everything is built under a forked, seeded RNG: the same arguments give the same bytes
and the caller's RNG state is untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipConfig,
    SiglipImageProcessor,
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

IMAGE_TOKEN = "<image>"

# llava-1.5-hf's template, reduced to what the tiny models need: images first, then text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _vision_kwargs(image_size: int, patch_size: int, hidden: int, layers: int, heads: int) -> dict:
    return {
        "image_size": image_size,
        "patch_size": patch_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_channels": 3,
    }


def _text_llm_config(kind: str, vocab_size: int, hidden: int, layers: int, tok) -> dict:
    return {
        "model_type": kind,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "tie_word_embeddings": False,
    }


def save_tiny_llava(
    path: str | Path,
    tower: Literal["clip", "siglip"] = "clip",
    text_model: Literal["llama", "qwen2", ""] = "",
    image_size: int = 64,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    text_hidden: int = 64,
    text_layers: int = 2,
    with_text_tower: bool = True,
    seed: int = 0,
    vision_feature_layer: int | None = None,
    vision_feature_select_strategy: Literal["default", "full", ""] = "",
    vision_overrides: dict | None = None,
    text_overrides: dict | None = None,
) -> Path:
    """Build and save a tiny random LLaVA (+ its matching text tower); returns the directory.

    ``text_model`` defaults to ``llama`` for the CLIP tower and ``qwen2`` for SigLIP.
    With the defaults the tower sees ``(64 / 8) ** 2 = 64`` patches.
    ``with_text_tower=False`` leaves out ``atp_text_tower/`` (the CLS-only fallback path).
    ``vision_feature_layer`` / ``vision_feature_select_strategy`` override the tower's llava
    defaults (CLIP: -2, ``default``; SigLIP: -1, ``full``), e.g. a CLIP tower that feeds its CLS too.
    ``vision_overrides`` / ``text_overrides`` replace entries of the tower / LLM configs (heads,
    FFN width, KV heads, vocabulary...): the benchmarks build realistic-width random checkpoints so.
    """
    if tower not in ("clip", "siglip"):
        raise ValueError(f"tower must be 'clip' or 'siglip', got {tower!r}")
    text_model = text_model or ("llama" if tower == "clip" else "qwen2")
    out, tok = start_checkpoint(path, image_size, patch_size, [IMAGE_TOKEN])
    vocab_size = len(tok)
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vis = _vision_kwargs(image_size, patch_size, vision_hidden, vision_layers, heads=4) | (vision_overrides or {})
    num_patches = (image_size // patch_size) ** 2

    if tower == "clip":
        vision_config = {"model_type": "clip_vision_model", **vis, "projection_dim": vision_hidden}
        feature_layer, strategy, extra_tokens = -2, "default", 1  # CLS is an extra token, dropped by "default"
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
    else:
        vision_config = {"model_type": "siglip_vision_model", **vis, "vision_use_head": False}
        feature_layer, strategy, extra_tokens = -1, "full", 0
        image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    feature_layer = feature_layer if vision_feature_layer is None else vision_feature_layer
    strategy = vision_feature_select_strategy or strategy

    config = LlavaConfig(
        vision_config=vision_config,
        text_config=_text_llm_config(text_model, vocab_size, text_hidden, text_layers, tok) | (text_overrides or {}),
        image_token_index=image_token_id,
        image_seq_length=num_patches + extra_tokens - (1 if strategy == "default" else 0),
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
    )
    config.pad_token_id = tok.pad_token_id

    with seeded(seed):
        model = LlavaForConditionalGeneration(config).eval()
        set_special_ids(model.generation_config, tok)
        model.save_pretrained(out, safe_serialization=True)
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            patch_size=patch_size,
            vision_feature_select_strategy=strategy,
            num_additional_image_tokens=extra_tokens,
            chat_template=CHAT_TEMPLATE,
            image_token=IMAGE_TOKEN,
        )
        processor.save_pretrained(out)
        if with_text_tower:
            _save_text_tower(out / TEXT_TOWER_SUBDIR, tower, vis, model)
    return out


def _save_text_tower(path: Path, tower: str, vis: dict, vlm: LlavaForConditionalGeneration) -> None:
    """A CLIPModel/SiglipModel whose vision side is the VLM's tower, plus the tiny tokenizer."""
    tok = make_tiny_tokenizer([IMAGE_TOKEN])  # the VLM's vocabulary
    text = text_tower_text_config(tok, layers=2, max_positions=64)
    if tower == "clip":
        config = CLIPConfig(text_config=text, vision_config=dict(vis), projection_dim=vis["hidden_size"])
        model = CLIPModel(config).eval()
    else:
        text["projection_size"] = vis["hidden_size"]  # SigLIP's joint space is the vision width
        config = SiglipConfig(text_config=text, vision_config={**vis, "vision_use_head": True})
        model = SiglipModel(config).eval()
    allowed = ("head.",) if tower == "siglip" else ()  # the VLM tower was saved without the head
    save_text_tower(path, model, vlm.model.vision_tower.state_dict(), tok, allowed_missing=allowed)


__all__ = ["CHAT_TEMPLATE", "IMAGE_TOKEN", "TEXT_TOWER_SUBDIR", "save_tiny_llava"]
