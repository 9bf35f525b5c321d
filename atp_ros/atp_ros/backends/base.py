"""What every ATP-gated VLM backend shares: config, result, timing, device choice.

Backends import no ROS. A backend takes RGB frames (``HxWx3`` uint8 numpy arrays)
and questions, runs the frozen vision tower once, lets an ATP selector pick the
patch tokens, feeds only those to the rest of the VLM and returns a
:class:`VlmResult`.
"""

from __future__ import annotations

import abc
import functools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from atp_ros.atp import Budget, Selection, TextEmbeddingCache, TokenSelector, make_selector, patch_text_cosine

if TYPE_CHECKING:
    from atp_ros.backends.text_towers import JointSpace

INTRA_SIGNALS = ("cls", "received")
POSITION_MODES = ("original", "compact")
INTER_READOUTS = ("naive", "maskclip", "clearclip")
STAGES = ("preprocess", "vision", "scoring", "projector", "prefill", "decode")


@dataclass(frozen=True)
class AtpConfig:
    """Pruning settings of one call. ``keep_tokens`` > 0 wins over ``keep_ratio``;
    ``mass`` > 0 (tau) selects the adaptive budget and wins over both."""

    enabled: bool = True
    alpha: float = 0.5
    keep_ratio: float = 0.25
    keep_tokens: int = 0
    mass: float = 0.0
    k_min: int = 1
    k_max: int = 0
    normalization: str = "minmax"
    intra_signal: str = "cls"  # "cls" | "received"
    selector: str = "atp"  # any name of atp.make_selector
    seed: int = 0  # for the random baseline
    # Position ids of the kept visual tokens in the LLM (LLaVA): "original" keeps the id each had
    # among all N (text after the image keeps its unpruned ids); "compact" renumbers them 0..K.
    positions: str = "original"
    # How last-layer patches reach the joint space for S_inter (text_towers.INTER_READOUTS).
    inter_readout: str = "naive"

    def check(self) -> None:
        """ValueError naming the first invalid choice (string options only; numbers are checked by Budget)."""
        for name, value, allowed in (
            ("intra_signal", self.intra_signal, INTRA_SIGNALS),
            ("positions", self.positions, POSITION_MODES),
            ("inter_readout", self.inter_readout, INTER_READOUTS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

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


@dataclass
class StageTimings:
    """Wall time per stage in milliseconds (CUDA-synchronized on GPU)."""

    preprocess: float = 0.0
    vision: float = 0.0
    scoring: float = 0.0
    projector: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0

    @property
    def total(self) -> float:
        return sum(getattr(self, s) for s in STAGES)

    def as_dict(self) -> dict[str, float]:
        return {s: getattr(self, s) for s in STAGES} | {"total": self.total}


@dataclass
class VlmResult:
    """Everything one batched call produced.

    ``selection`` covers the batch; for keep-all it keeps every token. Token counts are
    per image. ``flops`` holds ``llm_prefill`` and ``pipeline`` (vision + scoring +
    projector/resampler + LLM prefill) per image, in FLOPs (multiply-add = 2).
    """

    answers: list[str]
    selection: Selection
    visual_tokens_total: int
    visual_tokens_kept: list[int]
    text_tokens: list[int]
    timings: StageTimings
    flops: dict[str, float] = field(default_factory=dict)
    generated_ids: list[list[int]] = field(default_factory=list)
    alpha_used: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def grid(self) -> tuple[int, int]:
        return self.selection.grid

    def keep_mask(self, b: int = 0) -> np.ndarray:
        """``(h, w)`` uint8 keep mask of image ``b`` (1 kept, 0 pruned)."""
        return self.selection.mask[b].to(torch.uint8).cpu().numpy()


class Stopwatch:
    """Accumulates stage times; synchronizes CUDA so GPU time is real, not launch time."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.timings = StageTimings()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}")
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            setattr(self.timings, name, getattr(self.timings, name) + (time.perf_counter() - start) * 1e3)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; anything else is passed to torch."""
    if device in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA with bf16 support, float16 on other CUDA, float32 on CPU."""
    if dtype in ("", "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype not in table:
        raise ValueError(f"dtype must be one of auto, {', '.join(table)}; got {dtype!r}")
    return table[dtype]


def patch_grid(vision_config) -> tuple[tuple[int, int], int]:
    """``((h, w), N)``: the patch grid of a square ViT config and its number of patches."""
    side = int(vision_config.image_size) // int(vision_config.patch_size)
    return (side, side), side * side


def decoder_prefill_flops(
    seq_len: int,
    num_layers: int,
    hidden: int,
    intermediate: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    gated_mlp: bool = True,
) -> float:
    """Forward FLOPs of a decoder-only transformer over ``seq_len`` tokens (no LM head).

    Per layer: Q,O projections ``2*2*L*d^2``, K,V ``2*2*L*d*d_kv``, attention scores and
    weighted sum ``2*2*L^2*d``, MLP ``2*(3 if gated else 2)*L*d*d_ff``.
    """
    kv = num_kv_heads or num_heads
    d_kv = hidden * kv // num_heads
    attn_proj = 4 * seq_len * hidden * hidden + 4 * seq_len * hidden * d_kv
    attn_mix = 4 * seq_len * seq_len * hidden
    mlp = 2 * (3 if gated_mlp else 2) * seq_len * hidden * intermediate
    return float(num_layers * (attn_proj + attn_mix + mlp))


class VlmBackend(abc.ABC):
    """One VLM family behind ATP. Subclasses implement loading and :meth:`answer`."""

    family: str = ""

    model_id: str
    device: torch.device
    dtype: torch.dtype
    num_visual_tokens: int  # N patch tokens per image seen by the selector
    grid: tuple[int, int]  # (h, w) patch grid
    score_layer: int  # ViT layer whose attention gives S_intra
    has_text_tower: bool
    joint: JointSpace | None  # the joint space of S_inter; None: CLS-only
    no_text_reason: str = ""  # why there is no text tower
    text_cache: TextEmbeddingCache | None  # the text tower's question embeddings

    @abc.abstractmethod
    def answer(
        self,
        images: Sequence[np.ndarray],
        questions: Sequence[str] | str,
        atp: AtpConfig = AtpConfig(),
        max_new_tokens: int = 32,
    ) -> VlmResult:
        """Answer one question per image (a single string is asked of every image)."""

    @abc.abstractmethod
    def reference_generate(
        self, images: Sequence[np.ndarray], questions: Sequence[str] | str, max_new_tokens: int = 32
    ) -> list[list[int]]:
        """Stock ``model.generate`` (greedy, no ATP) on the same inputs: new token ids per image.

        The exactness tests compare :meth:`answer` with ATP disabled against this.
        """

    def _set_text_tower(self, joint: JointSpace | None, no_text_reason: str = "", cache_size: int = 64) -> None:
        """Keep ``joint`` for S_inter (None: CLS-only, ``no_text_reason`` says why) and a text embedding cache."""
        self.joint = joint
        self.has_text_tower = joint is not None
        self.no_text_reason = no_text_reason
        self.text_cache = TextEmbeddingCache(joint.encode_text, maxsize=cache_size) if joint is not None else None

    def describe(self) -> str:
        """One line for logs: model, grid, scored layer, text tower."""
        if self.joint is not None:
            tower = self.joint.model_id
        else:
            tower = f"none ({self.no_text_reason})" if self.no_text_reason else "none"
        return json.dumps(
            {"model": self.model_id, "grid": self.grid, "score_layer": self.score_layer, "text_tower": tower}
        )


def serialized(method: Callable) -> Callable:
    """Run a backend method under ``self._lock`` (a ``threading.Lock`` the backend creates).

    The capture hooks of :func:`record_outputs` sit on modules shared by every call; two
    calls at once would each read the other's tensors, so a backend runs one call at a time.
    """

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


# --------------------------------------------------------------------------- shared helpers
# Used by the backends (loading lives in :mod:`atp_ros.backends.loading`): reading one ViT
# layer's q/k without touching its fused attention, S_inter from a joint space, running the
# selector with honest fallbacks, greedy generation split into prefill and decode time.


@contextmanager
def record_outputs(modules: dict[str, torch.nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks keeping the output of each named module during the ``with`` block.

    The hooked modules run unchanged (fused SDPA stays on); the hooks only keep references.
    """
    store: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_module, _args, output):
            store[name] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in modules.items()]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def intra_scores(
    queries: torch.Tensor, keys: torch.Tensor, num_heads: int, signal: str = "cls", scale: float | None = None
) -> torch.Tensor:
    """S_intra over all L tokens of one ViT layer from its own projections.

    ``queries``/``keys``: ``(B, L, H*D)`` outputs of that layer's q/k projections on its
    layer-normed input. ``signal="cls"``: attention of token 0 (CLS) to every token, one
    query row per head (:func:`atp.cls_attention`); ``"received"``: mean attention each
    token receives (:func:`atp.received_attention`, one ``L x L`` map). Returns ``(B, L)``.
    """
    from atp_ros.atp import cls_attention, received_attention

    b, length, _ = keys.shape
    k = keys.reshape(b, length, num_heads, -1).transpose(1, 2)  # (B, H, L, D)
    if signal == "cls":
        return cls_attention(queries[:, 0].reshape(b, num_heads, -1), k, scale)  # (B, L)
    if signal == "received":
        q = queries.reshape(b, length, num_heads, -1).transpose(1, 2)  # (B, H, L, D)
        return received_attention(q, k, scale)
    raise ValueError(f"intra_signal must be one of {INTRA_SIGNALS}, got {signal!r}")


def select_patches(
    atp: AtpConfig,
    s_intra: torch.Tensor,
    s_inter: Callable[[], torch.Tensor] | None,
    grid: tuple[int, int],
    tokens: torch.Tensor | None = None,
    no_text_reason: str = "",
) -> tuple[Selection, float, list[str]]:
    """Run the selector ``atp`` names on ``(B, N)`` patch signals: ``(selection, alpha_used, notes)``.

    ``s_inter`` is called only when the selector needs text; ``None`` means the backend has
    no text tower, and then a text-needing selector falls back to CLS-only scoring
    (alpha 0) with one note saying so (``no_text_reason`` is appended to it).
    """
    from atp_ros.atp import ScoreInputs, make_selector

    atp.check()
    notes: list[str] = []
    selector = atp.make_selector()
    if atp.inter_readout != "naive" and getattr(selector, "needs_text", False) and s_inter is not None:
        # The dense read-outs edit a CLIP/SigLIP tower's last layer (LLaVA); these families read out naively.
        notes.append(f"inter_readout {atp.inter_readout!r} is implemented for LLaVA towers only: naive used")
    if getattr(selector, "needs_text", False) and s_inter is None:
        notes.append(
            f"no joint-space text tower: selector {atp.selector!r} (alpha={atp.alpha}) fell back to CLS-only "
            "scoring (alpha_used=0)" + (f": {no_text_reason}" if no_text_reason else "")
        )
        selector = make_selector("cls_only", normalization=atp.normalization)
    inter = s_inter() if getattr(selector, "needs_text", False) and s_inter is not None else None
    inputs = ScoreInputs(s_intra=s_intra, s_inter=inter, tokens=tokens, grid=grid)
    selection = selector.select(inputs, atp.budget(s_intra.shape[1]))
    alpha_used = float(getattr(selector, "alpha", 0.0)) if atp.enabled else 0.0
    return selection, alpha_used, notes


def joint_text_cosine(
    joint: JointSpace, text_cache: TextEmbeddingCache, patch_states: torch.Tensor, questions: Sequence[str]
) -> torch.Tensor:
    """S_inter ``(B, N)``: patch states ``(B, N, D)`` mapped into ``joint``, cosine with each image's question.

    The question embeddings come from ``text_cache`` (the text tower runs once per distinct question).
    """
    patches = joint.patches_to_joint(patch_states)  # (B, N, E)
    text = torch.stack([text_cache.get(q) for q in questions]).to(patches.device)  # (B, E)
    return patch_text_cosine(patches, text)


def greedy(max_new_tokens: int) -> dict:
    """``generate`` kwargs of greedy decoding, shared by ``answer`` and ``reference_generate``."""
    return {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1}


def decode_answers(tokenizer, ids: list[list[int]]) -> list[str]:
    """Generated ids per image -> answer strings (special tokens dropped, whitespace stripped)."""
    return [s.strip() for s in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def generate_timed(generate: Callable[..., torch.Tensor], watch: Stopwatch, **kwargs) -> torch.Tensor:
    """Call an HF ``generate`` and book its time as ``prefill`` (up to the first logits) and ``decode``.

    A pass-through logits processor marks the first step, so the tokens are exactly those
    of the same ``generate`` call without it.
    """
    from transformers import LogitsProcessor, LogitsProcessorList

    first: list[float] = []

    class _FirstLogits(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if not first:
                watch._sync()
                first.append(time.perf_counter())
            return scores

    processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
    processors.append(_FirstLogits())
    watch._sync()
    start = time.perf_counter()
    out = generate(logits_processor=processors, **kwargs)
    watch._sync()
    end = time.perf_counter()
    split = first[0] if first else end
    watch.timings.prefill += (split - start) * 1e3
    watch.timings.decode += (end - split) * 1e3
    return out


def gather_with_prefix(
    tokens: torch.Tensor, selection: Selection, prefix: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the first ``prefix`` tokens (CLS) of ``(B, prefix+N, D)`` plus the selected patches.

    Returns ``(B, prefix+K_max, D)`` tokens and their ``(B, prefix+K_max)`` long key mask
    (0 on the padding of per-sample budgets). Kept patches stay in ascending order, so
    keeping every patch reproduces ``tokens`` exactly.
    """
    patches = selection.gather(tokens[:, prefix:])  # (B, K_max, D), padded rows zero
    valid = (selection.indices >= 0).to(device=tokens.device, dtype=torch.long)  # (B, K_max)
    head = torch.ones(tokens.shape[0], prefix, dtype=torch.long, device=tokens.device)
    return torch.cat([tokens[:, :prefix], patches], dim=1), torch.cat([head, valid], dim=1)


def attention_flops(num_queries: int, num_keys: int, q_in: int, kv_in: int, inner: int, out: int) -> float:
    """Forward FLOPs of one (cross-)attention block: q/k/v/o projections, scores and weighted sum.

    ``q_in``/``kv_in``: widths the queries/keys are projected from; ``inner``: heads x head dim;
    ``out``: output projection width.
    """
    proj = 2 * num_queries * q_in * inner + 2 * 2 * num_keys * kv_in * inner + 2 * num_queries * inner * out
    return float(proj + 4 * num_queries * num_keys * inner)


GATED_MLP_TYPES = ("llama", "mistral", "qwen2", "gemma", "t5")  # LMs whose FFN has a gate projection


def questions_for(images: Sequence[np.ndarray], questions: Sequence[str] | str) -> list[str]:
    """One question per image (a single string is asked of every image)."""
    qs = [questions] * len(images) if isinstance(questions, str) else list(questions)
    if len(qs) != len(images) or not qs:
        raise ValueError(f"need one question per image: {len(images)} images, {len(qs)} questions")
    return qs


def trim_after_eos(new_tokens: torch.Tensor, eos_token_id: int | list[int] | None) -> list[list[int]]:
    """Rows of ``(B, T)`` generated ids up to and including the first EOS (generate pads after it)."""
    eos = set(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id])
    rows = []
    for row in new_tokens.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def lm_dims(cfg) -> dict:
    """Layers/width/FFN/heads of an HF text config, for :func:`decoder_prefill_flops`."""

    def first(*names: str) -> int:
        for name in names:
            value = getattr(cfg, name, None)
            if value:
                return int(value)
        raise ValueError(f"{type(cfg).__name__} has none of {names}")

    gated = bool(getattr(cfg, "is_gated_act", cfg.model_type in GATED_MLP_TYPES))
    return {
        "num_layers": first("num_hidden_layers", "num_layers"),
        "hidden": first("hidden_size", "d_model"),
        "intermediate": first("intermediate_size", "ffn_dim", "d_ff"),
        "num_heads": first("num_attention_heads", "num_heads"),
        "num_kv_heads": getattr(cfg, "num_key_value_heads", None),
        "gated_mlp": gated,
    }


def vit_flops(num_tokens: int, hidden: int, intermediate: int, layers: int, heads: int, patch: int) -> float:
    """Forward FLOPs of a pre-LN ViT over ``num_tokens`` tokens, patch embedding included."""
    embed = 2 * (num_tokens - 1) * 3 * patch * patch * hidden
    return embed + decoder_prefill_flops(num_tokens, layers, hidden, intermediate, heads, gated_mlp=False)


def intra_flops(num_tokens: int, hidden: int, signal: str) -> float:
    """Extra FLOPs of S_intra from already-computed q/k: one CLS row, or the full map."""
    rows = 1 if signal == "cls" else num_tokens
    return float(4 * rows * num_tokens * hidden)


def scoring_flops(num_patches: int, hidden: int, atp: AtpConfig, joint: JointSpace | None) -> float:
    """ATP scoring FLOPs for one image of CLS + ``num_patches`` ViT tokens of width ``hidden``.

    S_intra from the captured q/k, plus, when ``joint`` is given (S_inter was used), the
    per-patch joint-space projection and cosine; the text tower is cached, so not counted.
    """
    scoring = intra_flops(num_patches + 1, hidden, atp.intra_signal) if atp.enabled else 0.0
    if joint is not None:
        scoring += joint.joint_flops(num_patches) + 2 * num_patches * joint.embed_dim
    return scoring
