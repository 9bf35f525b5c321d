"""The data each stage of :class:`~atp_ros.backends.pipeline.VlmBackend.answer` hands on, and the small
helpers the pipeline and the family adapters share (prompts per image, greedy decoding, EOS trimming,
gathering kept tokens, the stop hook)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from atp_ros.backends.errors import GenerationStopped
from atp_ros.backends.results import PixelBox
from atp_ros.method import Selection


@dataclass(frozen=True)
class Batch:
    """The processor's output for one call."""

    pixel_values: Tensor  # what the vision tower takes, on the device
    inputs: dict[str, Tensor]  # everything the processor returned: stock ``generate(**inputs)`` is the reference
    views: list[PixelBox]  # per image: the frame region its patch grid covers


@dataclass(frozen=True)
class VisionStates:
    """What the one vision-tower forward leaves for scoring and for the consumer."""

    tokens: Tensor  # (B, P+N, D_c) every visual token the consumer would get; P = VlmBackend.prefix (CLS)
    score_input: Tensor  # (B, L, D_v) hidden states entering the score layer (CLS first when the tower has one)
    last: Tensor  # (B, L, D_v) raw last-layer states (before any post-layernorm): S_inter, SigLIP probe
    last_input: Tensor | None = None  # (B, L, D_v) input of the last layer, for the dense read-outs
    # Per image (h_b, w_b) token grid when it follows the frame (Qwen2.5-VL); None: the backend's fixed
    # grid for every image. With grids, ``tokens`` is (B, max N_b, D_c) zero padded after N_b and the
    # family says in its adapter how its tower states are laid out (Qwen2.5-VL: packed, (sum L_b, D_v)).
    grids: list[tuple[int, int]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # the family's own per-call data (SmolVLM: the tile layout)


@dataclass(frozen=True)
class LmPrompt:
    """What a family hands to ``generate`` once its consumer has the kept tokens."""

    generate_kwargs: dict[str, Any]
    input_len: int  # prompt length generate echoes before the new tokens (decoder-only LMs)
    text_tokens: list[int]  # per image: prompt tokens that are not visual
    consumer_tokens: list[int]  # per image: visual tokens the consumer received (CLS included)
    notes: list[str] = field(default_factory=list)  # what the caller should know about how it was fed


def greedy(max_new_tokens: int) -> dict:
    """``generate`` kwargs of greedy decoding, shared by ``answer`` and ``reference_generate``."""
    return {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1}


def questions_for(images: Sequence[np.ndarray], questions: Sequence[str] | str) -> list[str]:
    """One question per image (a single string is asked of every image)."""
    qs = [questions] * len(images) if isinstance(questions, str) else list(questions)
    if len(qs) != len(images) or not qs:
        raise ValueError(f"need one question per image: {len(images)} images, {len(qs)} questions")
    return qs


def trim_after_eos(new_tokens: Tensor, eos_token_id: int | list[int] | None) -> list[list[int]]:
    """Rows of ``(B, T)`` generated ids up to and including the first EOS (generate pads after it)."""
    eos = set(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id])
    rows = []
    for row in new_tokens.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def gather_with_prefix(tokens: Tensor, selection: Selection, prefix: int = 1) -> tuple[Tensor, Tensor]:
    """Keep the first ``prefix`` tokens (CLS) of ``(B, prefix+N, D)`` plus the selected patches.

    Returns ``(B, prefix+K_max, D)`` tokens and their ``(B, prefix+K_max)`` long key mask
    (0 on the padding of per-sample budgets). Kept patches stay in ascending order, so
    keeping every patch reproduces ``tokens`` exactly.
    """
    patches = selection.gather(tokens[:, prefix:])  # (B, K_max, D), padded rows zero
    valid = (selection.indices >= 0).to(device=tokens.device, dtype=torch.long)  # (B, K_max)
    head = torch.ones(tokens.shape[0], prefix, dtype=torch.long, device=tokens.device)
    return torch.cat([tokens[:, :prefix], patches], dim=1), torch.cat([head, valid], dim=1)


def rgb_arrays(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The frames as ``HxWx3`` uint8 arrays; ValueError naming the first one that is not."""
    out = []
    for i, img in enumerate(images):
        arr = np.asarray(img)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"image {i}: expected an HxWx3 RGB array, got shape {arr.shape}")
        out.append(arr.astype(np.uint8, copy=False))
    return out


class StopHook:
    """``answer``'s ``stop`` hook: a check between stages and a stopping criterion for ``generate``."""

    def __init__(self, stop: Callable[[], bool] | None) -> None:
        self.stop = stop
        self.fired = False
        self.tokens = 0  # generated when the criterion last ran

    def check(self) -> None:
        if self.fired:
            raise GenerationStopped(f"stopped mid-decode after {self.tokens} new tokens")
        if self.stop is not None and self.stop():
            raise GenerationStopped("stopped before the answer was complete")

    def criteria(self) -> Any:
        from transformers import StoppingCriteria, StoppingCriteriaList

        halt = self

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: Any) -> Tensor:
                halt.tokens += 1
                halt.fired = halt.fired or bool(halt.stop())
                return torch.full((input_ids.shape[0],), halt.fired, dtype=torch.bool, device=input_ids.device)

        return StoppingCriteriaList([_Stop()])
