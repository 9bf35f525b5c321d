"""What the tiny checkpoint builders share: output folder and tokenizer, seeded RNG, text towers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from atp_ros.testing.tiny.tokenizer import make_tiny_tokenizer


def start_checkpoint(
    path: str | Path, image_size: int, patch_size: int, special_tokens: list[str]
) -> tuple[Path, PreTrainedTokenizerFast]:
    """Check the patch grid, create ``path`` and build the VLM's tokenizer: ``(folder, tokenizer)``."""
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tiny_tokenizer(special_tokens)
    tok.padding_side = "left"  # batched generation pads on the left
    return out, tok


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block under a forked torch RNG seeded with ``seed``.

    The same seed gives the same weights, and the caller's RNG state is untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def set_special_ids(generation_config, tok: PreTrainedTokenizerFast) -> None:
    """Point a generation config's pad/eos/bos ids at the tiny tokenizer's."""
    generation_config.pad_token_id = tok.pad_token_id
    generation_config.eos_token_id = tok.eos_token_id
    generation_config.bos_token_id = tok.bos_token_id


def text_tower_text_config(tok: PreTrainedTokenizerFast, layers: int, max_positions: int) -> dict:
    """``text_config`` of a tiny CLIP/SigLIP text tower for ``tok``."""
    return {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "max_position_embeddings": max_positions,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,  # CLIP pools at the first EOS (not the legacy argmax when eos=2)
    }


def save_text_tower(
    path: Path,
    model: torch.nn.Module,
    vision_state: dict[str, torch.Tensor],
    tok: PreTrainedTokenizerFast,
    allowed_missing: tuple[str, ...] = (),
) -> None:
    """Give a CLIP/SigLIP ``model`` the VLM's vision weights, then save it and ``tok`` under ``path``.

    Same vision weights as the VLM, so the VLM's patch states live in this joint space.
    Keys starting with one of ``allowed_missing`` may stay unset (the VLM lacks them).
    """
    missing, unexpected = model.vision_model.load_state_dict(vision_state, strict=False)
    if unexpected or any(not k.startswith(allowed_missing) for k in missing):
        raise RuntimeError(f"vision tower copy mismatch: missing={missing} unexpected={unexpected}")
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
