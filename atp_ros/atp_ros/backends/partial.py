"""Token reuse in a ViT: re-run the encoder on the tokens whose patch changed, keep cached states for the rest.

A camera stream sends mostly the same pixels frame after frame. Given the hidden states of an earlier
frame (every layer, as ``output_hidden_states`` returns them) and the rows to recompute (the CLS
token and the patches that changed), :func:`encode_rows` runs each encoder layer on those rows only
and writes them into a copy of the cached states. Two ways to treat the rows that are not recomputed:

* ``"eventful"`` (Eventful Transformers): the recomputed rows attend to *every* token, the kept rows
  through their cached states. Each layer computes keys and values for all tokens (a quarter of its
  attention projections), queries, attention output and MLP for the recomputed rows only. With every
  row recomputed it is the stock forward (the test checks it).
* ``"drop"`` (RLT-style input dropping): the recomputed rows attend only to each other, as if the
  unchanged patches were not in the image; cheaper, further from the full forward.

Both are approximate for the rows that are *not* recomputed: their states are the earlier frame's,
although the changed patches would have changed them a little through attention. Works on the
CLIP and SigLIP vision towers of transformers (``embeddings``, optional ``pre_layrnorm``,
``encoder.layers`` with ``layer_norm1``/``self_attn``/``layer_norm2``/``mlp``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

VARIANTS = ("eventful", "drop")


@dataclass
class TowerReuse:
    """One stream's token reuse, handed to ``VlmBackend.answer(..., tower=...)`` for a one-image call.

    ``states`` are the tower's hidden states of the stream's earlier frames (``None`` before the first
    run) and ``changed`` the ``(h, w)`` patches to recompute (``None``: run the whole tower). After a
    successful call ``answer`` has put this frame's states into ``states`` and the number of patches it
    recomputed into ``recomputed`` (``None`` when the whole tower ran).
    """

    variant: str = "eventful"
    states: tuple[Tensor, ...] | None = None
    changed: np.ndarray | None = None
    recomputed: int | None = None


def embed(tower: nn.Module, pixel_values: Tensor) -> Tensor:
    """``hidden_states[0]`` of the tower: patch (+ CLS) embeddings with positions, pre-layernormed when the
    tower has one. ``(B, L, D)``; the patch convolution is a small share of the tower's work."""
    x = tower.embeddings(pixel_values)
    pre = getattr(tower, "pre_layrnorm", None)
    return pre(x) if pre is not None else x


def _attend(layer: nn.Module, x_rows: Tensor, x_context: Tensor) -> Tensor:
    """Self-attention output for ``x_rows`` ``(B, R, D)`` over ``x_context`` ``(B, C, D)`` (both pre-norm)."""
    attn = layer.self_attn
    b, r, d = x_rows.shape
    heads, dim = attn.num_heads, attn.head_dim
    q = attn.q_proj(x_rows).view(b, r, heads, dim).transpose(1, 2)
    k = attn.k_proj(x_context).view(b, x_context.shape[1], heads, dim).transpose(1, 2)
    v = attn.v_proj(x_context).view(b, x_context.shape[1], heads, dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # (B, h, R, Dh)
    return attn.out_proj(out.transpose(1, 2).reshape(b, r, d))


def encode_rows(
    tower: nn.Module, pixel_values: Tensor, cached: tuple[Tensor, ...], rows: Tensor, variant: str = "eventful"
) -> tuple[Tensor, ...]:
    """The tower's hidden states for ``pixel_values`` with only ``rows`` (token indices, CLS included when the
    tower has one) recomputed; every other row is taken from ``cached`` (the ``hidden_states`` of an earlier
    frame, ``L + 1`` tensors of ``(B, T, D)``). Returns ``L + 1`` new tensors; ``cached`` is not modified."""
    if variant not in VARIANTS:
        raise ValueError(f"token reuse variant {variant!r} is not one of {', '.join(VARIANTS)}")
    layers = tower.encoder.layers
    if len(cached) != len(layers) + 1:
        raise ValueError(f"expected {len(layers) + 1} cached hidden states, got {len(cached)}")
    rows = rows.to(cached[0].device)
    if rows.numel() == 0:  # nothing changed (a tower without CLS): the cached states stand
        return tuple(cached)
    x = embed(tower, pixel_values)  # (B, T, D)
    if x.shape != cached[0].shape:
        raise ValueError(f"cached states are {tuple(cached[0].shape)}, this frame's are {tuple(x.shape)}")
    out = [cached[0].clone()]
    out[0][:, rows] = x[:, rows]
    current = x[:, rows]  # (B, R, D): the recomputed rows entering the next layer
    for i, layer in enumerate(layers):
        if variant == "eventful":
            context = out[i]  # cached rows + this frame's recomputed ones
            h_all = layer.layer_norm1(context)
            h_rows = h_all[:, rows]
        else:
            h_rows = h_all = layer.layer_norm1(current)
        current = current + _attend(layer, h_rows, h_all)
        current = current + layer.mlp(layer.layer_norm2(current))
        nxt = cached[i + 1].clone()
        nxt[:, rows] = current
        out.append(nxt)
    return tuple(out)


def rows_to_recompute(changed: Tensor, has_cls: bool) -> Tensor:
    """Token indices for :func:`encode_rows` from a flat ``(N,)`` bool mask of changed patches (CLS first)."""
    patches = torch.nonzero(changed.flatten(), as_tuple=False).flatten() + int(has_cls)
    if not has_cls:
        return patches
    return torch.cat([torch.zeros(1, dtype=patches.dtype, device=patches.device), patches])


__all__ = ["VARIANTS", "TowerReuse", "embed", "encode_rows", "rows_to_recompute"]
