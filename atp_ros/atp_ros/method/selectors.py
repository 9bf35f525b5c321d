"""Token selectors: ATP (the paper) and the baselines it is compared with, by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor

from atp_ros.method.scores import NORMALIZATIONS, check_alpha, fuse_scores
from atp_ros.method.selection import Budget, Selection, select_indices, select_top_k

# --------------------------------------------------------------------------- selectors

# "No pruning" has this one name: the selector that keeps every token. ``AtpConfig(enabled=False)``
# (the node's ``atp.enabled: false``) means the same (``AtpConfig.keeps_all``), and the evaluation
# sweep's unpruned reference is this selector.
KEEP_ALL = "keep_all"


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

    name: str = KEEP_ALL
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
    KEEP_ALL: KeepAllSelector,
    "random": RandomSelector,
    "uniform": UniformSelector,
    "divprune": DivPruneSelector,
}

# The selectors that prune (everything but KEEP_ALL): what a sweep compares with the unpruned reference.
PRUNING_SELECTORS: tuple[str, ...] = tuple(name for name in SELECTORS if name != KEEP_ALL)


def make_selector(name: str, **kwargs) -> TokenSelector:
    """Selector by name (``atp``, ``cls_only``, ``text_only``, ``keep_all``, ``random``,
    ``uniform``, ``divprune``)."""
    if name not in SELECTORS:
        raise ValueError(f"unknown selector {name!r}; choose from {sorted(SELECTORS)}")
    return SELECTORS[name](**kwargs)
