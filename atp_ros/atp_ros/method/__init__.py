"""Adaptive Token Pruning (ATP): score ViT patch tokens and keep the top-K.

The method lives in this package (``scores``: signals, normalization, fusion; ``selection``:
budgets and top-K; ``selectors``: ATP and the baselines; ``config``: ``AtpConfig``). It imports
neither ROS nor model code: a backend hands in per-patch signals, the method returns which
patches to keep.

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

from atp_ros.method.config import INTER_READOUTS, INTRA_SIGNALS, POSITION_MODES, AtpConfig
from atp_ros.method.scores import (
    NORMALIZATIONS,
    Normalization,
    check_alpha,
    cls_attention,
    fuse_scores,
    normalize,
    patch_text_cosine,
    received_attention,
)
from atp_ros.method.selection import (
    Budget,
    Selection,
    grid_shape,
    select_indices,
    select_top_k,
    stack_selections,
)
from atp_ros.method.selectors import (
    KEEP_ALL,
    PRUNING_SELECTORS,
    SELECTORS,
    ATPSelector,
    DivPruneSelector,
    KeepAllSelector,
    RandomSelector,
    ScoreInputs,
    TokenSelector,
    UniformSelector,
    make_selector,
)

__all__ = [
    "INTER_READOUTS", "INTRA_SIGNALS", "KEEP_ALL", "NORMALIZATIONS", "POSITION_MODES", "PRUNING_SELECTORS",
    "SELECTORS",
    "ATPSelector", "AtpConfig", "Budget", "DivPruneSelector", "KeepAllSelector", "Normalization",
    "RandomSelector", "ScoreInputs", "Selection", "TokenSelector", "UniformSelector", "check_alpha",
    "cls_attention", "fuse_scores", "grid_shape", "make_selector", "normalize", "patch_text_cosine",
    "received_attention", "select_indices", "select_top_k", "stack_selections",
]  # fmt: skip
