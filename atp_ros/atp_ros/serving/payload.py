"""Split deployments: the bytes a robot sends per frame when ViT + ATP run on board and an LLM
engine elsewhere takes the kept embeddings (:func:`embedding_payload`); no Ray here."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Payload:
    """Bytes per frame a robot sends when the LLM runs elsewhere (embeddings after the projector)."""

    tokens: int  # visual tokens sent
    embedding_bytes: int  # tokens x width x bytes per value
    position_bytes: int  # the kept tokens' original position ids (int16): ATP's "original" positions

    @property
    def total(self) -> int:
        """All bytes of the frame: embeddings and positions."""
        return self.embedding_bytes + self.position_bytes


def embedding_payload(num_tokens: int, width: int, keep_ratio: float = 1.0, bytes_per_value: int = 2) -> Payload:
    """Bytes of one frame's visual embeddings (``num_tokens`` x ``width``, fp16 by default) at a keep ratio.

    K = ceil(keep_ratio x N), the node's budget rule. Below 1 the receiver also needs each kept
    token's position among all N (2 bytes each) to keep the original position ids.
    """
    if num_tokens < 1 or width < 1 or not 0 < keep_ratio <= 1:
        raise ValueError(
            f"need num_tokens, width >= 1 and keep_ratio in (0, 1], got {num_tokens}, {width}, {keep_ratio}"
        )
    kept = num_tokens if keep_ratio >= 1 else math.ceil(keep_ratio * num_tokens)
    return Payload(kept, kept * width * bytes_per_value, 0 if kept == num_tokens else 2 * kept)
