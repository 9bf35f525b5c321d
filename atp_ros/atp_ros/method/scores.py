"""Per-patch signals and their fusion: S = alpha * N(S_inter) + (1 - alpha) * N(S_intra).

Pure functions on tensors; scores are float32 whatever the input dtype."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Normalization = Literal["minmax", "zscore", "rank"]
NORMALIZATIONS: tuple[str, ...] = ("minmax", "zscore", "rank")
_EPS = 1e-12

# --------------------------------------------------------------------------- signals


def cls_attention(cls_query: Tensor, keys: Tensor, scale: float | None = None) -> Tensor:
    """Head-averaged softmax attention from the CLS query to every key.

    Args:
        cls_query: ``(B, H, D)`` the CLS token's query of one layer, per head.
        keys: ``(B, H, L, D)`` that layer's keys for all L tokens (CLS included).
        scale: softmax temperature; ``D ** -0.5`` when None.

    Returns:
        ``(B, L)`` float32 attention of CLS to each token (rows sum to 1).

    Cost is one query row per head (``O(H L D)``), so the ViT itself keeps its fused
    SDPA/Flash attention; nothing materializes an ``L x L`` map.
    """
    if (
        cls_query.dim() != 3
        or keys.dim() != 4
        or cls_query.shape[:2] != keys.shape[:2]
        or cls_query.shape[-1] != keys.shape[-1]
    ):
        raise ValueError(
            f"cls_query (B,H,D) and keys (B,H,L,D) mismatch: {tuple(cls_query.shape)} vs {tuple(keys.shape)}"
        )
    q = cls_query.float()
    k = keys.float()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bhd,bhld->bhl", q, k) * scale  # (B, H, L)
    return logits.softmax(dim=-1).mean(dim=1)  # (B, L)


def received_attention(queries: Tensor, keys: Tensor, scale: float | None = None) -> Tensor:
    """Mean attention each token receives from all queries, averaged over heads.

    For towers without a CLS token (SigLIP). ``queries``/``keys``: ``(B, H, L, D)``.
    Returns ``(B, L)`` float32. Costs one ``L x L`` map of one layer.
    """
    if queries.dim() != 4 or queries.shape != keys.shape:
        raise ValueError(f"queries and keys must both be (B,H,L,D): {tuple(queries.shape)} vs {tuple(keys.shape)}")
    scale = queries.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bhqd,bhkd->bhqk", queries.float(), keys.float()) * scale
    return logits.softmax(dim=-1).mean(dim=(1, 2))  # (B, L)


def patch_text_cosine(patch_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """Cosine between each patch and the question, both in the joint space.

    ``patch_embeds``: ``(B, N, E)``; ``text_embeds``: ``(E,)`` (one question for the
    batch) or ``(B, E)``. Returns ``(B, N)`` float32.
    """
    if patch_embeds.dim() != 3:
        raise ValueError(f"patch_embeds must be (B,N,E), got {tuple(patch_embeds.shape)}")
    if text_embeds.dim() == 1:
        text_embeds = text_embeds.unsqueeze(0).expand(patch_embeds.shape[0], -1)
    if text_embeds.shape != (patch_embeds.shape[0], patch_embeds.shape[2]):
        raise ValueError(f"text_embeds {tuple(text_embeds.shape)} does not match patches {tuple(patch_embeds.shape)}")
    p = torch.nn.functional.normalize(patch_embeds.float(), dim=-1)
    t = torch.nn.functional.normalize(text_embeds.float(), dim=-1)
    return torch.einsum("bne,be->bn", p, t)


# --------------------------------------------------------------------------- scoring


def _check_scores(name: str, scores: Tensor) -> Tensor:
    if scores.dim() != 2:
        raise ValueError(f"{name} must be (B, N), got shape {tuple(scores.shape)}")
    if scores.shape[1] == 0:
        raise ValueError(f"{name} has no tokens")
    if torch.isnan(scores).any():
        raise ValueError(f"{name} contains NaN")
    return scores.float()


def normalize(scores: Tensor, method: str = "minmax") -> Tensor:
    """Per-row normalization of ``(B, N)`` scores; returns float32.

    ``minmax`` maps each row to [0, 1]; ``zscore`` to zero mean, unit std (a constant
    row maps to 0 under both); ``rank`` to ``rank / (N - 1)`` in [0, 1] with ties
    broken by index (the lower index ranks higher).
    """
    s = _check_scores("scores", scores)
    if method == "minmax":
        lo = s.amin(dim=1, keepdim=True)
        hi = s.amax(dim=1, keepdim=True)
        return (s - lo) / (hi - lo).clamp_min(_EPS)
    if method == "zscore":
        mean = s.mean(dim=1, keepdim=True)
        std = s.std(dim=1, keepdim=True, unbiased=False)
        # A constant row has std 0 but a float32 mean a few ulps off its value; that residue
        # over the clamped std is up to ~1e7 and would swamp the other component when fused.
        constant = s.amax(dim=1, keepdim=True) == s.amin(dim=1, keepdim=True)
        return ((s - mean) / std.clamp_min(_EPS)).masked_fill(constant, 0.0)
    if method == "rank":
        return _ranks(s).float() / max(s.shape[1] - 1, 1)
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {method!r}")


def _ranks(scores: Tensor) -> Tensor:
    """Integer ranks ``0..N-1`` per row (N-1 = highest score), ties broken by index (the lower index ranks higher)."""
    # Stable descending sort: among equal scores the lower index comes first and gets the higher rank,
    # the same tie-break as select_top_k.
    n = scores.shape[1]
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n - 1, -1, -1, device=scores.device).expand_as(order))
    return ranks


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as float or raise ValueError if it is outside [0, 1]."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0 or math.isnan(alpha):
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha


def fuse_scores(s_inter: Tensor | None, s_intra: Tensor | None, alpha: float, normalization: str = "minmax") -> Tensor:
    """``S = alpha * N(S_inter) + (1 - alpha) * N(S_intra)``, ``(B, N)`` float32.

    A component whose weight is zero may be None (CLS-only or text-only scoring).
    """
    alpha = check_alpha(alpha)
    if s_inter is None and alpha > 0:
        raise ValueError("alpha > 0 needs S_inter (a text embedding); pass alpha=0 for CLS-only")
    if s_intra is None and alpha < 1:
        raise ValueError("alpha < 1 needs S_intra (CLS attention); pass alpha=1 for text-only")
    if s_inter is not None and s_intra is not None and s_inter.shape != s_intra.shape:
        raise ValueError(f"S_inter {tuple(s_inter.shape)} and S_intra {tuple(s_intra.shape)} differ in shape")
    if s_intra is None or alpha == 1.0:
        return normalize(s_inter, normalization)
    if s_inter is None or alpha == 0.0:
        return normalize(s_intra, normalization)
    if normalization == "rank":
        # Fuse the integer ranks in float64 and divide once: two patches whose weighted rank sums are
        # equal get bit-equal scores, so select_top_k gives the tie to the lower index. (Fusing the
        # float32 rank/(N-1) values rounds equal sums one ulp apart in ~3% of rows.) The snap to a
        # 2^-20 grid absorbs float64 rounding of alpha * r for alphas like 0.3. Equal float64 values
        # stay equal in float32, and distinct ones (at least ~1e-3 / (N-1) apart) stay distinct.
        r_inter = _ranks(_check_scores("s_inter", s_inter)).double()
        r_intra = _ranks(_check_scores("s_intra", s_intra)).double()
        fused = torch.round((alpha * r_inter + (1.0 - alpha) * r_intra) * 2**20) / 2**20
        return (fused / max(r_inter.shape[1] - 1, 1)).float()
    return alpha * normalize(s_inter, normalization) + (1.0 - alpha) * normalize(s_intra, normalization)
