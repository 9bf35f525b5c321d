"""Token reuse in a ViT: re-run the encoder on the tokens whose patch changed, keep cached states for the rest.

A camera stream sends mostly the same pixels frame after frame. Given the hidden states of an earlier
frame (every layer, as ``output_hidden_states`` returns them) and the rows to recompute (the CLS
token and the patches that changed), :func:`encode_rows` runs each encoder layer on those rows only
and writes them into a copy of the cached states. Two ways to treat the rows that are not recomputed:

* ``"eventful"`` (Eventful Transformers): the recomputed rows attend to *every* token, the kept rows
  through their cached states. Keys and values of the kept rows come from a per-layer cache (built
  on the first partial frame after a whole-tower run), so every projection, the attention queries
  and the MLP run for the recomputed rows only. With every row recomputed it is the stock forward
  (the test checks it).
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
# Above this share of changed patches the stock forward is cheaper than re-running rows (eventful costs
# about the keys/values of every token plus the rows' share; bench/results/token_reuse.json).
WHOLE_TOWER_ABOVE = 0.85
KV = list[tuple[Tensor, Tensor]]  # per encoder layer: keys and values of every token, (B, heads, T, head_dim)


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
    kv: KV | None = None  # eventful: every layer's keys and values of ``states`` (None after a whole-tower run)


def embed(tower: nn.Module, pixel_values: Tensor) -> Tensor:
    """``hidden_states[0]`` of the tower: patch (+ CLS) embeddings with positions, pre-layernormed when the
    tower has one. ``(B, L, D)``; the patch convolution is a small share of the tower's work."""
    x = tower.embeddings(pixel_values)
    pre = getattr(tower, "pre_layrnorm", None)
    return pre(x) if pre is not None else x


def _heads(attn: nn.Module, x: Tensor) -> Tensor:
    """``(B, T, D)`` -> ``(B, heads, T, head_dim)``."""
    return x.view(x.shape[0], x.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)


def encode_rows(
    tower: nn.Module,
    pixel_values: Tensor,
    cached: tuple[Tensor, ...],
    rows: Tensor,
    variant: str = "eventful",
    kv: KV | None = None,
) -> tuple[tuple[Tensor, ...], KV | None]:
    """The tower's hidden states for ``pixel_values`` with only ``rows`` (token indices, CLS included when the
    tower has one) recomputed; every other row is taken from ``cached`` (the ``hidden_states`` of an earlier
    frame, ``L + 1`` tensors of ``(B, T, D)``). Returns ``L + 1`` new tensors (``cached`` is not modified)
    and, for ``eventful``, every layer's keys and values: passed back as ``kv`` with the states they belong
    to, the next call projects keys and values for its recomputed rows only (else for every token)."""
    if variant not in VARIANTS:
        raise ValueError(f"token reuse variant {variant!r} is not one of {', '.join(VARIANTS)}")
    layers = tower.encoder.layers
    if len(cached) != len(layers) + 1:
        raise ValueError(f"expected {len(layers) + 1} cached hidden states, got {len(cached)}")
    rows = rows.to(cached[0].device)
    if rows.numel() == 0:  # nothing changed (a tower without CLS): the cached states stand
        return tuple(cached), kv
    x = embed(tower, pixel_values)  # (B, T, D)
    if x.shape != cached[0].shape:
        raise ValueError(f"cached states are {tuple(cached[0].shape)}, this frame's are {tuple(x.shape)}")
    out = [cached[0].clone()]
    out[0][:, rows] = x[:, rows]
    current = x[:, rows]  # (B, R, D): the recomputed rows entering the next layer
    new_kv: KV = []
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        h_rows = layer.layer_norm1(current)
        q = _heads(attn, attn.q_proj(h_rows))
        if variant == "drop":  # the recomputed rows attend to each other only
            k, v = _heads(attn, attn.k_proj(h_rows)), _heads(attn, attn.v_proj(h_rows))
        elif kv is None:  # every token's keys and values from the cached states with this frame's rows in
            h_all = layer.layer_norm1(out[i])
            k, v = _heads(attn, attn.k_proj(h_all)), _heads(attn, attn.v_proj(h_all))
        else:
            k, v = kv[i][0].clone(), kv[i][1].clone()
            k[:, :, rows] = _heads(attn, attn.k_proj(h_rows))
            v[:, :, rows] = _heads(attn, attn.v_proj(h_rows))
        if variant == "eventful":
            new_kv.append((k, v))
        o = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # (B, heads, R, head_dim)
        current = current + attn.out_proj(o.transpose(1, 2).reshape(current.shape))
        current = current + layer.mlp(layer.layer_norm2(current))
        nxt = cached[i + 1].clone()
        nxt[:, rows] = current
        out.append(nxt)
    return tuple(out), (new_kv if variant == "eventful" else None)


def rows_to_recompute(changed: Tensor, has_cls: bool) -> Tensor:
    """Token indices for :func:`encode_rows` from a flat ``(N,)`` bool mask of changed patches (CLS first)."""
    patches = torch.nonzero(changed.flatten(), as_tuple=False).flatten() + int(has_cls)
    if not has_cls:
        return patches
    return torch.cat([torch.zeros(1, dtype=patches.dtype, device=patches.device), patches])


__all__ = ["KV", "VARIANTS", "WHOLE_TOWER_ABOVE", "TowerReuse", "embed", "encode_rows", "rows_to_recompute"]
