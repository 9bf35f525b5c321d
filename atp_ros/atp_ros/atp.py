"""Adaptive Token Pruning (ATP): score ViT patch tokens and keep the top-K.

The whole method lives in this file. It imports neither ROS nor model code: a
backend hands in per-patch signals, this module returns which patches to keep.

    S = alpha * N(S_inter) + (1 - alpha) * N(S_intra)

* ``S_intra`` -- intra-modal saliency: the ViT's CLS attention to each patch in one
  layer, averaged over heads (:func:`cls_attention`). The paper writes it as
  ``(1/Z) sum_j Attention_ij``; for a softmax row that sum is constant, so we do what
  its text describes (attention *from CLS*). For towers without a CLS token
  :func:`received_attention` (mean attention a patch receives from every query)
  is the alternative.
* ``S_inter`` -- inter-modal relevance: cosine between each patch mapped into the
  joint image-text space and the text embedding of the question
  (:func:`patch_text_cosine`).
* ``N`` -- per-image normalization: ``minmax`` (default), ``zscore`` or ``rank``.
* Selection -- the K highest fused scores, K from a token count, a keep ratio
  (``K = ceil(r N)``) or adaptively (the fewest tokens whose share of the score mass
  reaches ``tau``, clamped to ``[k_min, k_max]``). Kept indices are returned in
  ascending (spatial) order; ties go to the lower index.

Scores are computed in float32 whatever the input dtype (fp16/bf16 towers): the
cost is a few hundred floats per image and it keeps rankings stable.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from typing import Literal, Protocol

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
    """

    indices: Tensor  # (B, K_max) long, ascending, -1 padded
    lengths: Tensor  # (B,) long
    mask: Tensor  # (B, h, w) bool
    scores: Tensor  # (B, N) float32 fused score the selection was made on
    s_intra: Tensor | None = None  # (B, N) raw CLS attention (or received attention)
    s_inter: Tensor | None = None  # (B, N) raw patch/text cosine
    method: str = "atp"

    @property
    def num_tokens(self) -> int:
        """N: patch tokens before pruning."""
        return int(self.scores.shape[1])

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the patch grid."""
        return int(self.mask.shape[1]), int(self.mask.shape[2])

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


# --------------------------------------------------------------------------- selectors


@dataclass
class ScoreInputs:
    """Per-patch signals a backend hands to a selector; each ``(B, N, ...)``.

    ``tokens`` are the visual tokens themselves (for diversity selectors);
    ``grid`` the patch grid ``(h, w)``.
    """

    s_intra: Tensor | None = None  # (B, N)
    s_inter: Tensor | None = None  # (B, N)
    tokens: Tensor | None = None  # (B, N, D)
    grid: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(B, N)`` shared by every signal given; ValueError if they disagree."""
        given = [t for t in (self.s_intra, self.s_inter, self.tokens) if t is not None]
        shapes = {(int(t.shape[0]), int(t.shape[1])) for t in given}
        if not shapes:
            raise ValueError("ScoreInputs holds no signal")
        if len(shapes) > 1:
            raise ValueError(f"ScoreInputs signals disagree on (B, N): {sorted(shapes)}")
        return shapes.pop()


class TokenSelector(Protocol):
    """Anything that picks tokens: ATP and the baselines share this interface."""

    name: str
    needs_text: bool

    def select(self, inputs: ScoreInputs, budget: Budget) -> Selection: ...


@dataclass
class ATPSelector:
    """The paper's hybrid selector. ``alpha=0``: CLS only; ``alpha=1``: text only."""

    alpha: float = 0.5
    normalization: str = "minmax"
    name: str = "atp"

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")

    @property
    def needs_text(self) -> bool:
        return self.alpha > 0

    def select(self, inputs: ScoreInputs, budget: Budget) -> Selection:
        fused = fuse_scores(inputs.s_inter, inputs.s_intra, self.alpha, self.normalization)
        sel = select_top_k(fused, budget.resolve(fused), inputs.grid, method=self.name)
        return replace(sel, s_intra=inputs.s_intra, s_inter=inputs.s_inter)


@dataclass
class KeepAllSelector:
    """Baseline: no pruning."""

    name: str = "keep_all"
    needs_text: bool = False

    def select(self, inputs: ScoreInputs, budget: Budget) -> Selection:
        b, n = inputs.shape
        return select_top_k(torch.zeros(b, n), n, inputs.grid, method=self.name)


@dataclass
class RandomSelector:
    """Baseline: uniformly random tokens, seeded (the same seed gives the same picks)."""

    seed: int = 0
    name: str = "random"
    needs_text: bool = False

    def select(self, inputs: ScoreInputs, budget: Budget) -> Selection:
        b, n = inputs.shape
        gen = torch.Generator().manual_seed(self.seed)
        scores = torch.rand(b, n, generator=gen)
        return select_top_k(scores, budget.resolve(scores), inputs.grid, method=self.name)


@dataclass
class UniformSelector:
    """Baseline: spatially uniform, every (N/K)-th patch in raster order."""

    name: str = "uniform"
    needs_text: bool = False

    def select(self, inputs: ScoreInputs, budget: Budget) -> Selection:
        b, n = inputs.shape
        ks = budget.resolve(torch.zeros(b, n)).tolist()
        # Integer floor(i * N / K): float32 i * (N / K) rounds below integers (N=26, K=22).
        picks = [torch.arange(k) * n // k for k in ks]
        return select_indices(picks, torch.zeros(b, n), inputs.grid, method=self.name)


@dataclass
class DivPruneSelector:
    """Baseline: DivPrune (Alvar et al., CVPR 2025), greedy max-min cosine diversity.

    Starts from the token farthest (max of min cosine distance) from all others, then
    repeatedly adds the token whose nearest kept token is farthest. Needs ``tokens``.
    """

    name: str = "divprune"
    needs_text: bool = False

    def select(self, inputs: ScoreInputs, budget: Budget) -> Selection:
        if inputs.tokens is None:
            raise ValueError("DivPrune needs the visual tokens (ScoreInputs.tokens)")
        b, n = inputs.shape
        ks = budget.resolve(torch.zeros(b, n)).tolist()
        picks = []
        for row, k in enumerate(ks):
            x = torch.nn.functional.normalize(inputs.tokens[row].float(), dim=-1)
            dist = 1.0 - x @ x.T  # (N, N) cosine distance
            off_diag = dist + torch.eye(n, device=dist.device) * 4.0  # ignore self-distance (max distance is 2)
            first = int(off_diag.min(dim=1).values.argmax())
            chosen = [first]
            nearest = dist[first].clone()  # distance of every token to the kept set
            nearest[first] = -1.0
            for _ in range(k - 1):
                nxt = int(nearest.argmax())
                chosen.append(nxt)
                nearest = torch.minimum(nearest, dist[nxt])
                nearest[chosen] = -1.0
            picks.append(torch.tensor(chosen))
        return select_indices(picks, torch.zeros(b, n), inputs.grid, method=self.name)


SELECTORS: dict[str, Callable[..., TokenSelector]] = {
    "atp": ATPSelector,
    "cls_only": lambda **kw: ATPSelector(alpha=0.0, name="cls_only", **kw),
    "text_only": lambda **kw: ATPSelector(alpha=1.0, name="text_only", **kw),
    "keep_all": KeepAllSelector,
    "random": RandomSelector,
    "uniform": UniformSelector,
    "divprune": DivPruneSelector,
}


def make_selector(name: str, **kwargs) -> TokenSelector:
    """Selector by name (``atp``, ``cls_only``, ``text_only``, ``keep_all``, ``random``,
    ``uniform``, ``divprune``)."""
    if name not in SELECTORS:
        raise ValueError(f"unknown selector {name!r}; choose from {sorted(SELECTORS)}")
    return SELECTORS[name](**kwargs)


# --------------------------------------------------------------------------- settings

INTRA_SIGNALS: tuple[str, ...] = ("cls", "received")  # S_intra: attention from CLS, or received attention
POSITION_MODES: tuple[str, ...] = ("original", "compact")  # LLaVA position ids of the kept tokens
INTER_READOUTS: tuple[str, ...] = ("naive", "maskclip", "clearclip")  # how patches reach the joint space


@dataclass(frozen=True)
class AtpConfig:
    """Pruning settings of one backend call. ``keep_tokens`` > 0 wins over ``keep_ratio``;
    ``mass`` > 0 (tau) selects the adaptive budget and wins over both."""

    enabled: bool = True
    alpha: float = 0.5
    keep_ratio: float = 0.25
    keep_tokens: int = 0
    mass: float = 0.0
    k_min: int = 1
    k_max: int = 0
    normalization: str = "minmax"
    intra_signal: str = "cls"  # one of INTRA_SIGNALS
    selector: str = "atp"  # any name of make_selector
    seed: int = 0  # for the random baseline
    # Position ids of the kept visual tokens in the LLM (LLaVA): "original" keeps the id each had
    # among all N (text after the image keeps its unpruned ids); "compact" renumbers them 0..K.
    positions: str = "original"
    # How last-layer patches reach the joint space for S_inter (one of INTER_READOUTS).
    inter_readout: str = "naive"

    def check(self) -> None:
        """ValueError naming the first invalid choice (string options only; numbers are checked by Budget)."""
        for name, value, allowed in (
            ("intra_signal", self.intra_signal, INTRA_SIGNALS),
            ("positions", self.positions, POSITION_MODES),
            ("inter_readout", self.inter_readout, INTER_READOUTS),
            ("normalization", self.normalization, NORMALIZATIONS),
            ("selector", self.selector, tuple(sorted(SELECTORS))),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    @property
    def requested_alpha(self) -> float:
        """The text weight the chosen selector asks for (0 for selectors that ignore the question)."""
        if not self.enabled:
            return 0.0
        return {"atp": self.alpha, "text_only": 1.0}.get(self.selector, 0.0)

    def budget(self, num_tokens: int) -> Budget:
        """The token budget for ``num_tokens`` patches (all of them when disabled)."""
        if not self.enabled:
            return Budget.all()
        if self.mass > 0:
            return Budget(mass=self.mass, k_min=self.k_min, k_max=self.k_max)
        if self.keep_tokens > 0:
            return Budget(keep_tokens=min(self.keep_tokens, num_tokens))
        return Budget(keep_ratio=self.keep_ratio)

    def make_selector(self) -> TokenSelector:
        """The selector these settings name (``keep_all`` when disabled)."""
        if not self.enabled:
            return make_selector("keep_all")
        if self.selector == "atp":
            return make_selector("atp", alpha=self.alpha, normalization=self.normalization)
        if self.selector in ("cls_only", "text_only"):
            return make_selector(self.selector, normalization=self.normalization)
        if self.selector == "random":
            return make_selector("random", seed=self.seed)
        return make_selector(self.selector)


# --------------------------------------------------------------------------- text cache


class TextEmbeddingCache:
    """Bounded LRU of text embeddings keyed by query string (thread-safe).

    Queries change far less often than frames, so the text tower runs once per
    distinct question instead of once per frame.
    """

    def __init__(self, encode: Callable[[str], Tensor], maxsize: int = 64) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self._encode = encode
        self._maxsize = maxsize
        self._items: OrderedDict[Hashable, Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, text: str) -> Tensor:
        """Embedding of ``text``, computed on first use."""
        with self._lock:
            if text in self._items:
                self._items.move_to_end(text)
                self.hits += 1
                return self._items[text]
        value = self._encode(text)  # outside the lock: the text tower can be slow
        with self._lock:
            self.misses += 1
            self._items[text] = value
            self._items.move_to_end(text)
            while len(self._items) > self._maxsize:
                self._items.popitem(last=False)
        return value
