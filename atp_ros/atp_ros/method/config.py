"""``AtpConfig``: the pruning settings of one backend call, and the choices they allow."""

from __future__ import annotations

from dataclasses import dataclass, replace

from atp_ros.method.scores import NORMALIZATIONS
from atp_ros.method.selection import Budget
from atp_ros.method.selectors import KEEP_ALL, SELECTORS, TokenSelector, make_selector

# --------------------------------------------------------------------------- settings

INTRA_SIGNALS: tuple[str, ...] = ("cls", "received")  # S_intra: attention from CLS, or received attention
POSITION_MODES: tuple[str, ...] = ("original", "compact")  # LLaVA position ids of the kept tokens
INTER_READOUTS: tuple[str, ...] = ("naive", "maskclip", "clearclip")  # how patches reach the joint space


@dataclass(frozen=True)
class AtpConfig:
    """Pruning settings of one backend call. ``keep_tokens`` > 0 wins over ``keep_ratio``;
    ``mass`` > 0 (tau) selects the adaptive budget and wins over both. ``enabled=False`` is the
    ``keep_all`` selector whatever ``selector`` says (:attr:`keeps_all`)."""

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
    def keeps_all(self) -> bool:
        """True when these settings prune nothing: disabled, or the ``keep_all`` selector."""
        return not self.enabled or self.selector == KEEP_ALL

    def keep_all(self) -> AtpConfig:
        """These settings with pruning off (every token kept)."""
        return replace(self, enabled=False)

    @property
    def requested_alpha(self) -> float:
        """The text weight the chosen selector asks for (0 for selectors that ignore the question)."""
        if self.keeps_all:
            return 0.0
        return {"atp": self.alpha, "text_only": 1.0}.get(self.selector, 0.0)

    def budget(self, num_tokens: int) -> Budget:
        """The token budget for ``num_tokens`` patches (all of them when nothing is pruned)."""
        if self.keeps_all:
            return Budget.all()
        if self.mass > 0:
            return Budget(mass=self.mass, k_min=self.k_min, k_max=self.k_max)
        if self.keep_tokens > 0:
            return Budget(keep_tokens=min(self.keep_tokens, num_tokens))
        return Budget(keep_ratio=self.keep_ratio)

    def make_selector(self) -> TokenSelector:
        """The selector these settings name (``keep_all`` when disabled)."""
        if self.keeps_all:
            return make_selector(KEEP_ALL)
        if self.selector == "atp":
            return make_selector("atp", alpha=self.alpha, normalization=self.normalization)
        if self.selector in ("cls_only", "text_only"):
            return make_selector(self.selector, normalization=self.normalization)
        if self.selector == "random":
            return make_selector("random", seed=self.seed)
        return make_selector(self.selector)
