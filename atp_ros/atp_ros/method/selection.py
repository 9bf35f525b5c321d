"""Token budgets (count, ratio, adaptive mass) and the top-K selection they produce."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from atp_ros.method.scores import _EPS, _check_scores

# --------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class Budget:
    """How many tokens to keep: exactly one of ``keep_tokens``, ``keep_ratio``, ``mass``.

    ``mass`` (tau in (0, 1]) is the adaptive budget: per image, the fewest tokens whose
    share of the (non-negative shifted) fused score mass reaches tau, clamped to
    ``[k_min, k_max]`` (``k_max`` 0 = N).
    """

    keep_tokens: int | None = None
    keep_ratio: float | None = None
    mass: float | None = None
    k_min: int = 1
    k_max: int = 0

    def __post_init__(self) -> None:
        given = [v is not None for v in (self.keep_tokens, self.keep_ratio, self.mass)]
        if sum(given) != 1:
            raise ValueError("give exactly one of keep_tokens, keep_ratio, mass")
        if self.keep_tokens is not None and self.keep_tokens < 1:
            raise ValueError(f"keep_tokens must be >= 1, got {self.keep_tokens}")
        if self.keep_ratio is not None and not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.mass is not None and not 0.0 < self.mass <= 1.0:
            raise ValueError(f"mass (tau) must be in (0, 1], got {self.mass}")
        if self.k_min < 1 or (self.k_max and self.k_max < self.k_min):
            raise ValueError(f"need 1 <= k_min <= k_max (k_max 0 = N), got {self.k_min}, {self.k_max}")

    @classmethod
    def all(cls) -> Budget:
        """Keep every token."""
        return cls(keep_ratio=1.0)

    def resolve(self, scores: Tensor) -> Tensor:
        """Tokens to keep per row of ``(B, N)`` fused scores: LongTensor ``(B,)``."""
        b, n = scores.shape
        if self.keep_tokens is not None:
            if self.keep_tokens > n:
                raise ValueError(f"keep_tokens K={self.keep_tokens} exceeds the N={n} tokens")
            return torch.full((b,), self.keep_tokens, dtype=torch.long, device=scores.device)
        if self.keep_ratio is not None:
            k = min(n, max(1, math.ceil(self.keep_ratio * n - 1e-9)))
            return torch.full((b,), k, dtype=torch.long, device=scores.device)
        w = scores.float() - scores.float().amin(dim=1, keepdim=True)  # non-negative mass
        w = torch.sort(w, dim=1, descending=True).values
        cum = w.cumsum(dim=1)
        # The total is the last cumsum entry (not w.sum()): the two round differently in
        # float32, and then tau=1 would never be reached and all N tokens kept.
        total = cum[:, -1:]
        share = cum / total.clamp_min(_EPS)
        # Constant rows have no mass to share: keep everything, clamped below.
        share = torch.where(total > _EPS, share, torch.zeros_like(share))
        k = (share < self.mass - 1e-7).sum(dim=1) + 1
        k_max = self.k_max or n
        return k.clamp(min=min(self.k_min, n), max=min(k_max, n))


# --------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Selection:
    """Which patch tokens survive, per image of a batch. Frozen: built once by a selector.

    ``indices`` is ``(B, K_max)`` ascending; rows with fewer than ``K_max`` tokens
    (per-sample budgets) are padded with ``-1`` after ``lengths[b]`` entries.
    ``mask`` is the keep mask on the patch grid ``(B, h, w)``.

    Images whose grids differ (a family with a per-image token grid, e.g. Qwen2.5-VL on frames
    of different sizes) carry ``grids``: image ``b`` has ``grids[b] = (h_b, w_b)`` and
    ``N_b = h_b * w_b`` tokens; ``mask`` is ``(B, max h, max w)`` with image ``b``'s grid in its
    top-left corner and ``scores`` / ``s_intra`` / ``s_inter`` are ``(B, max N)`` zero padded
    after ``N_b``. Read them per image with :meth:`grid_of`, :meth:`mask_of` and :meth:`tokens_of`.
    """

    indices: Tensor  # (B, K_max) long, ascending, -1 padded
    lengths: Tensor  # (B,) long
    mask: Tensor  # (B, h, w) bool
    scores: Tensor  # (B, N) float32 fused score the selection was made on
    s_intra: Tensor | None = None  # (B, N) raw CLS attention (or received attention)
    s_inter: Tensor | None = None  # (B, N) raw patch/text cosine
    method: str = "atp"
    grids: tuple[tuple[int, int], ...] | None = None  # per image (h_b, w_b) when they differ; None: mask's grid

    @property
    def num_tokens(self) -> int:
        """N: patch tokens before pruning (the largest N_b when the grids differ)."""
        return int(self.scores.shape[1])

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the patch grid every image shares; ValueError when they differ (use :meth:`grid_of`)."""
        if self.grids is not None:
            if len(set(self.grids)) > 1:
                raise ValueError(f"the images' grids differ ({list(self.grids)}): use grid_of(b)")
            return self.grids[0]
        return int(self.mask.shape[1]), int(self.mask.shape[2])

    def grid_of(self, b: int) -> tuple[int, int]:
        """(h, w) of image ``b``'s grid."""
        return self.grids[b] if self.grids is not None else (int(self.mask.shape[1]), int(self.mask.shape[2]))

    def tokens_of(self, b: int) -> int:
        """N_b: image ``b``'s tokens before pruning."""
        h, w = self.grid_of(b)
        return h * w

    def mask_of(self, b: int) -> Tensor:
        """``(h_b, w_b)`` bool keep mask of image ``b``."""
        h, w = self.grid_of(b)
        return self.mask[b, :h, :w]

    @property
    def uniform(self) -> bool:
        """True when every image keeps the same number of tokens (no padding)."""
        return bool((self.lengths == self.lengths[0]).all())

    def kept(self, b: int) -> Tensor:
        """Ascending kept indices of image ``b``."""
        return self.indices[b, : int(self.lengths[b])]

    def gather(self, tokens: Tensor) -> Tensor:
        """Kept rows of ``tokens`` ``(B, N, D)`` -> ``(B, K_max, D)`` (padded rows are zeros)."""
        idx = self.indices.clamp_min(0).to(tokens.device)
        out = torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        valid = (self.indices >= 0).to(tokens.device).unsqueeze(-1)
        return out.masked_fill(~valid, 0)  # not a multiply: inf * 0 would be NaN


def stack_selections(parts: list[Selection]) -> Selection:
    """One selection of a batch from one single-image selection per image (grids may differ).

    Every part must come from the same selector. Equal grids give the layout a batched call
    builds (no ``grids``); differing grids the padded one the :class:`Selection` docstring describes.
    """
    if not parts or any(int(p.lengths.shape[0]) != 1 for p in parts):
        raise ValueError("stack_selections needs one single-image selection per image")
    grids = tuple(p.grid for p in parts)
    b = len(parts)
    n_max = max(h * w for h, w in grids)
    h_max, w_max = max(h for h, _ in grids), max(w for _, w in grids)
    k_max = max(int(p.lengths[0]) for p in parts)
    indices = torch.full((b, k_max), -1, dtype=torch.long)
    mask = torch.zeros(b, h_max, w_max, dtype=torch.bool)
    for row, p in enumerate(parts):
        k = int(p.lengths[0])
        indices[row, :k] = p.indices[0, :k].cpu()
        h, w = grids[row]
        mask[row, :h, :w] = p.mask[0].cpu()

    def padded(rows: list[Tensor | None]) -> Tensor | None:
        if any(r is None for r in rows):
            return None
        out = torch.zeros(b, n_max, dtype=rows[0].dtype, device=rows[0].device)
        for row, r in enumerate(rows):
            out[row, : r.shape[1]] = r[0]
        return out

    return Selection(
        indices=indices,
        lengths=torch.cat([p.lengths.cpu() for p in parts]),
        mask=mask,
        scores=padded([p.scores for p in parts]),
        s_intra=padded([p.s_intra for p in parts]),
        s_inter=padded([p.s_inter for p in parts]),
        method=parts[0].method,
        grids=grids if len(set(grids)) > 1 else None,
    )


def grid_shape(num_tokens: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """Patch grid ``(h, w)``; square by default."""
    if grid is None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"N={num_tokens} tokens is not a square grid; pass grid=(h, w)")
        return side, side
    if grid[0] * grid[1] != num_tokens:
        raise ValueError(f"grid {grid} does not hold N={num_tokens} tokens")
    return int(grid[0]), int(grid[1])


def select_top_k(
    scores: Tensor, k: Tensor | int, grid: tuple[int, int] | None = None, method: str = "atp"
) -> Selection:
    """Keep the ``k`` highest scores per row of ``(B, N)``; ties go to the lower index.

    ``k`` is an int or a ``(B,)`` LongTensor (per-sample budgets give a padded result).
    """
    s = _check_scores("scores", scores)
    b, n = s.shape
    h, w = grid_shape(n, grid)
    k = torch.as_tensor(k, dtype=torch.long, device=s.device)
    k = k.expand(b).clone() if k.dim() == 0 else k
    if k.shape != (b,):
        raise ValueError(f"k must be an int or a ({b},) tensor, got shape {tuple(k.shape)}")
    if (k < 1).any() or (k > n).any():
        raise ValueError(f"K must be in [1, N={n}], got {k.tolist()}")
    # Stable descending sort: equal scores keep index order, so the lower index wins.
    order = torch.sort(s, dim=1, descending=True, stable=True).indices  # (B, N)
    k_max = int(k.max())
    top = order[:, :k_max]
    valid = torch.arange(k_max, device=s.device).unsqueeze(0) < k.unsqueeze(1)  # (B, K_max)
    # Sort kept indices ascending; padded slots get N so they sort last, then -1.
    top = torch.where(valid, top, torch.full_like(top, n)).sort(dim=1).values
    # Column N of the mask is a sink for padded slots, dropped afterwards.
    mask = torch.zeros(b, n + 1, dtype=torch.bool, device=s.device)
    mask.scatter_(1, top, True)
    indices = torch.where(top == n, torch.full_like(top, -1), top)
    return Selection(indices=indices, lengths=k.clone(), mask=mask[:, :n].reshape(b, h, w), scores=s, method=method)


def select_indices(
    indices: list[Tensor], scores: Tensor, grid: tuple[int, int] | None = None, method: str = "custom"
) -> Selection:
    """Build a :class:`Selection` from per-image index lists (any order, unique)."""
    b, n = scores.shape
    h, w = grid_shape(n, grid)
    lengths = torch.tensor([len(i) for i in indices], dtype=torch.long)
    k_max = int(lengths.max())
    out = torch.full((b, k_max), -1, dtype=torch.long)
    mask = torch.zeros(b, n, dtype=torch.bool)
    for row, idx in enumerate(indices):
        idx = torch.as_tensor(idx, dtype=torch.long).sort().values
        out[row, : len(idx)] = idx
        mask[row, idx] = True
    return Selection(indices=out, lengths=lengths, mask=mask.view(b, h, w), scores=scores.float(), method=method)
