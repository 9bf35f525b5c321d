"""The one answer pipeline of every VLM family: :class:`VlmBackend`.

:meth:`VlmBackend.answer` is written once. It reads top to bottom as the data moves::

    frames + questions
      -> preprocess   family: HF processor + the family's prompt        -> Batch (pixel values, text, views)
      -> vision       family: ONE forward of the frozen tower            -> VisionStates
      -> scoring      shared: S_intra from the score layer's own q/k,
                      S_inter in the joint space, the selector           -> Selection, ScoringInfo
      -> projector    family: kept tokens to its consumer                -> LmPrompt (generate kwargs)
                      (LLaVA: projector + shortened <image> run; BLIP-2: Q-Former keys;
                       IDEFICS: perceiver resampler)
      -> prefill, decode   shared: greedy ``generate``, timed            -> token ids
      -> VlmResult (frozen)

A family is an adapter: it implements :meth:`preprocess`, :meth:`encode`, :meth:`feed` and
:meth:`flops` (the points where families really differ, as transformers exposes
``get_image_features`` per model) and may override the few defaults below (how the score
layer projects q/k, S_intra for towers without CLS, dense read-outs, how new tokens are cut).

S_intra uses no hooks: the vision forward returns the hidden state *entering* the score
layer (``output_hidden_states``), and :meth:`VlmBackend.score_qk` recomputes that layer's
CLS query and keys with the layer's own ``layer_norm1`` and projections -- one query row per
head, so the tower keeps its fused SDPA attention and nothing sets module state.

Thread safety: one lock, :attr:`VlmBackend._lock`, held for a whole call (and for
:meth:`reference_generate`). Scoring needs none; it is there because a fast tokenizer is not
re-entrant (concurrent padding calls fail with "Already borrowed") and because calls on one
device run one after another anyway, so serializing them bounds peak memory at one batch.
"""

from __future__ import annotations

import abc
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from atp_ros.backends.errors import ModelLoadError
from atp_ros.backends.flops import scoring_flops, tower_flops
from atp_ros.backends.loading import TextTower, load_checkpoint, load_text_tower
from atp_ros.backends.partial import TowerReuse
from atp_ros.backends.results import ScoringInfo, VlmResult
from atp_ros.backends.stages import (
    Batch,
    LmPrompt,
    StopHook,
    VisionStates,
    greedy,
    questions_for,
    rgb_arrays,
    trim_after_eos,
)
from atp_ros.backends.text_cache import TextEmbeddingCache
from atp_ros.backends.timing import Stopwatch, generate_timed
from atp_ros.method import (
    AtpConfig,
    ATPSelector,
    ScoreInputs,
    Selection,
    cls_attention,
    make_selector,
    patch_text_cosine,
    received_attention,
    stack_selections,
)

if TYPE_CHECKING:
    from atp_ros.backends.text_towers import JointSpace


class VlmBackend(abc.ABC):
    """One VLM family behind ATP. Families subclass it and implement the adapter methods."""

    family: str = ""
    hf_class: str = ""  # the family's transformers model class, e.g. "LlavaForConditionalGeneration"
    intra_only: str = "CLS-only"  # what scoring without the question is called in notes (no CLS: "intra-only")

    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        text_encoder_id: str = "",
        device: str = "auto",
        dtype: str = "auto",
        score_layer: int | None = None,
    ) -> VlmBackend:
        """Load a checkpoint of this family (hub id or local dir) and its joint-space text tower.

        Safetensors only, ``trust_remote_code=False``, SDPA attention, offline from a local dir.
        The text tower is found by :func:`atp_ros.backends.loading.find_text_tower`. ``score_layer``
        None: the checkpoint's ``atp_score_layer`` (config.json) if it names one, else the family's
        default. Raises :class:`ModelLoadError` naming ``model_id`` (or the text tower) on failure.
        """
        import transformers

        model_id = str(model_id)
        model_cls = getattr(transformers, cls.hf_class)
        model, processor, dev, dt = load_checkpoint(model_cls, model_id, device, dtype)
        if score_layer is None:
            score_layer = getattr(model.config, "atp_score_layer", None)
        try:
            load, vision_hidden, kind = cls.joint_space_of(model)
            tower = load_text_tower(model_id, text_encoder_id, partial(load, device=dev, dtype=dt), vision_hidden, kind)
            return cls(model, processor, model_id, tower, score_layer=score_layer)
        except ValueError as err:
            raise ModelLoadError(f"{model_id}: {err}") from err

    def __init__(
        self,
        model: nn.Module,
        processor,
        model_id: str,
        device: torch.device,
        dtype: torch.dtype,
        vision_config,
        score_layer: nn.Module,
        score_layer_index: int,
        text_tower: TextTower,
        has_cls: bool,
        prefix: int,
        load_notes: Sequence[str] = (),
        text_cache_size: int = 64,
    ) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # batched generation: prompts end where generation starts
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        # A fixed-size tower (image_size in its config) has one grid; a family whose grid follows the
        # frame (Qwen2.5-VL) has none here: grid None, num_visual_tokens its per-image maximum (it sets it).
        fixed = getattr(vision_config, "image_size", None)
        side = int(fixed) // int(vision_config.patch_size) if fixed else 0
        self.grid: tuple[int, int] | None = (side, side) if fixed else None  # (h, w) patch grid
        self.num_visual_tokens = side * side  # N: patches the selector chooses from
        self.has_cls = has_cls  # the tower puts a CLS token first
        self.prefix = prefix  # CLS tokens the consumer always gets besides the kept patches (0 or 1)
        self.score_layer = score_layer_index  # ViT layer whose attention gives S_intra
        self._score = score_layer  # that encoder layer: layer_norm1 + self_attn
        self.joint: JointSpace | None = text_tower.joint  # the joint space of S_inter; None: CLS-only
        self.has_text_tower = text_tower.joint is not None
        self.text_tower_id = text_tower.source
        self.no_text_reason = text_tower.reason
        self.text_cache = TextEmbeddingCache(self.joint.encode_text, text_cache_size) if self.joint else None
        # All layers run on every frame whatever K is; a per-image grid's family counts per call (vision_cost).
        self.vision_flops = tower_flops(vision_config, has_cls) if fixed else 0.0
        self.load_notes = list(load_notes)  # said once at load: the node logs them and lists them in /diagnostics
        if self.joint is None:
            self.load_notes.insert(
                0, f"no text tower for {model_id}: running {self.intra_only}, alpha=0 ({text_tower.reason})"
            )
        self._lock = threading.Lock()

    # ================================================================== the pipeline

    def answer(
        self,
        images: Sequence[np.ndarray],
        questions: Sequence[str] | str,
        atp: AtpConfig = AtpConfig(),
        max_new_tokens: int = 32,
        stop: Callable[[], bool] | None = None,
        tower: TowerReuse | None = None,
    ) -> VlmResult:
        """Answer one question per image (a single string is asked of every image), ATP pruning the visual tokens.

        ``stop`` is polled before each stage and after every generated token; once it returns
        True the call raises :class:`GenerationStopped` (a shutdown or a cancelled request
        ends a long decode within one token instead of waiting for ``max_new_tokens``).
        ``tower`` (one image, a family with ``supports_token_reuse``): token reuse on a stream, the
        vision tower re-run only on ``tower.changed`` patches over ``tower.states`` (see ``backends.partial``).
        """
        qs = self.questions(images, questions)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        atp.check()
        if tower is not None and not self.supports_token_reuse:
            raise ValueError(f"token reuse is not implemented for the {self.family} family")
        if tower is not None and len(images) != 1:
            raise ValueError(f"token reuse answers one image per call, got {len(images)}")
        watch = Stopwatch(self.device)
        halt = StopHook(stop)
        with self._lock, torch.inference_mode():
            halt.check()
            with watch.stage("preprocess"):
                batch = self.preprocess(rgb_arrays(images), qs)
            halt.check()
            with watch.stage("vision"):
                vision = self.encode(batch) if tower is None else self.encode_reusing(batch, tower)
            with watch.stage("scoring"):
                selection, scoring, notes = self.score(vision, qs, atp)
            with watch.stage("projector"):
                prompt = self.feed(vision, selection, batch, atp)
            notes += prompt.notes
            halt.check()
            extra = {"stopping_criteria": halt.criteria()} if stop is not None else {}
            out = generate_timed(self.generator, watch, **prompt.generate_kwargs, **greedy(max_new_tokens), **extra)
            halt.check()  # generate returns normally when the criterion fired: what it has is not an answer
            ids = self.new_tokens(out, prompt.input_len)
            answers = [a.strip() for a in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        kept = [int(k) for k in selection.lengths.tolist()]
        totals = [h * w for h, w in self.grids_of(vision)]
        if tower is not None:  # the call succeeded: its states are the stream's cache now
            tower.states = vision.meta["hidden_states"]
            tower.recomputed = vision.meta.get("recomputed")
            tower.kv = vision.meta.get("kv")  # keys/values of those states (None: rebuilt when next needed)
        joint_used = selection.s_inter is not None and self.joint is not None
        cost = self.scoring_cost(vision, scoring.intra_signal, joint_used)
        return VlmResult(
            answers=answers,
            selection=selection,
            visual_tokens_total=totals,
            visual_tokens_kept=kept,
            consumer_tokens=prompt.consumer_tokens,
            text_tokens=prompt.text_tokens,
            timings=watch.timings(),
            scoring=scoring,
            views=batch.views,
            flops=self._flops(kept, prompt, cost, self.vision_cost(vision)),
            generated_ids=ids,
            notes=notes,
        )

    def reference_generate(
        self, images: Sequence[np.ndarray], questions: Sequence[str] | str, max_new_tokens: int = 32
    ) -> list[list[int]]:
        """Stock ``model.generate(**processor(...))`` (greedy, no ATP): new token ids per image.

        The exactness tests compare :meth:`answer` with ATP disabled (or K = N) against this.
        """
        qs = self.questions(images, questions)
        with self._lock, torch.inference_mode():
            batch = self.preprocess(rgb_arrays(images), qs)
            inputs = {k: v.to(self.device) for k, v in batch.inputs.items()}
            out = self.model.generate(**inputs, **greedy(max_new_tokens))
        return self.new_tokens(out, inputs["input_ids"].shape[1])

    def _flops(self, kept: list[int], prompt: LmPrompt, scoring: float, vision: float) -> dict[str, float]:
        """Per-image FLOPs: the tower, scoring, and the family's projector and LLM prefill; ``pipeline`` sums them."""
        family = self.flops(kept, prompt)
        parts = {"vision": vision, "scoring": scoring, "projector": family["projector"]}
        return parts | family | {"pipeline": sum(parts.values()) + family["llm_prefill"]}

    def grids_of(self, vision: VisionStates) -> list[tuple[int, int]]:
        """Each image's token grid: the family's per-image grids, else the fixed one for every image."""
        if vision.grids is not None:
            return list(vision.grids)
        return [self.grid] * int(vision.tokens.shape[0])

    def vision_cost(self, vision: VisionStates) -> float:
        """Per-image (batch mean) FLOPs of the tower forward; fixed-size towers: :attr:`vision_flops`, scaled by
        the share of patches re-run under token reuse (an estimate: eventful reuse also projects keys and
        values for every token)."""
        recomputed = vision.meta.get("recomputed")
        if recomputed is None or not self.num_visual_tokens:
            return self.vision_flops
        return self.vision_flops * (recomputed + self.prefix) / (self.num_visual_tokens + self.prefix)

    def scoring_cost(self, vision: VisionStates, intra_signal: str, joint_used: bool) -> float:
        """Per-image (batch mean) FLOPs of ATP scoring (:func:`scoring_flops` on each image's N_b)."""

        def one(n: int) -> float:
            joint = self.joint.joint_flops(n) if joint_used else 0.0
            embed = self.joint.embed_dim if joint_used else 0
            return scoring_flops(n, self.has_cls, self.vision_hidden, intra_signal, joint, embed)

        sizes = [h * w for h, w in self.grids_of(vision)]
        if len(set(sizes)) == 1:  # one grid: the one value, not a mean that may round it
            return one(sizes[0])
        return sum(one(n) for n in sizes) / len(sizes)

    # ================================================================== shared scoring

    def score(self, vision: VisionStates, questions: list[str], atp: AtpConfig) -> tuple[Selection, ScoringInfo, list]:
        """S_intra, S_inter and the selector ``atp`` names: ``(selection, how it was scored, notes)``.

        A selector that needs the question runs CLS-only (alpha 0) when the backend has no
        text tower, with one note saying so; S_inter and the text tower run only when the
        selector uses them.
        """
        notes: list[str] = []
        patches = vision.tokens[:, self.prefix :]  # (B, N, D_c): what a diversity selector compares
        grids = self.grids_of(vision)
        selector = atp.make_selector()
        tower = self.text_tower_id
        if not atp.enabled:
            selection = self.select(selector, ScoreInputs(tokens=patches), grids, atp)
            return selection, ScoringInfo("keep_all", 0.0, "", self.score_layer, "", tower), notes
        alpha = atp.requested_alpha
        tower_note = ""
        if selector.needs_text and self.joint is None:
            tower_note = (
                f"no text tower for {self.model_id}: running {self.intra_only}, alpha=0 instead of selector "
                f"{atp.selector!r} with alpha={alpha} ({self.no_text_reason})"
            )
            notes.append(tower_note)
            selector, alpha = make_selector("cls_only", normalization=atp.normalization), 0.0
        s_intra, signal = None, ""
        if isinstance(selector, ATPSelector):  # random / uniform / DivPrune use no attention signal
            s_intra, signal = self.intra_scores(vision, atp.intra_signal, notes)  # (B, N)
        s_inter, readout = None, ""
        if selector.needs_text:
            states, readout = self.joint_patches(vision, atp.inter_readout, notes)  # (B, N, D_v)
            text = torch.stack([self.text_cache.get(q) for q in questions])  # (B, E), cached per question
            patches_joint = self.joint.patches_to_joint(states)  # (B, N, E)
            s_inter = patch_text_cosine(patches_joint, text.to(patches_joint.device))  # (B, N)
        inputs = ScoreInputs(s_intra=s_intra, s_inter=s_inter, tokens=patches)
        selection = self.select(selector, inputs, grids, atp)
        info = ScoringInfo(selector.name, alpha, signal, self.score_layer, readout, tower, tower_note)
        return selection, info, notes

    @staticmethod
    def select(selector, inputs: ScoreInputs, grids: list[tuple[int, int]], atp: AtpConfig) -> Selection:
        """Run ``selector`` with ``atp``'s budget applied per image on its own N_b = h_b * w_b tokens.

        One grid for the whole batch: one batched call (fixed-size families always take this path).
        Grids that differ: one call per image on its unpadded signals, stacked
        (:func:`~atp_ros.method.stack_selections`); normalization and budgets are per image either
        way, so an image gets the same selection alone as in any batch.
        """
        if len(set(grids)) == 1:
            (h, w) = grids[0]
            return selector.select(replace(inputs, grid=(h, w)), atp.budget(h * w))
        parts = []
        for b, (h, w) in enumerate(grids):
            n = h * w

            def cut(t: Tensor | None, b: int = b, n: int = n) -> Tensor | None:
                return None if t is None else t[b : b + 1, :n]

            one = ScoreInputs(cut(inputs.s_intra), cut(inputs.s_inter), cut(inputs.tokens), grid=(h, w))
            parts.append(selector.select(one, atp.budget(n)))
        return stack_selections(parts)

    def score_qk(self, x: Tensor, query_rows: slice) -> tuple[Tensor, Tensor]:
        """The score layer's queries of ``query_rows`` and keys of all tokens, from its input ``x`` ``(B, L, D)``.

        Default: HF CLIP-style layers (``layer_norm1``; ``self_attn.q_proj``/``k_proj``).
        Returns ``(B, L_q, D)`` and ``(B, L, D)``.
        """
        y = self._score.layer_norm1(x)
        attn = self._score.self_attn
        return attn.q_proj(y[:, query_rows]), attn.k_proj(y)

    def intra_scores(self, vision: VisionStates, signal: str, notes: list[str]) -> tuple[Tensor, str]:
        """``(S_intra (B, N), the signal used)``: CLS attention of the score layer, or received attention."""
        x = vision.score_input  # (B, L, D)
        b, length, _ = x.shape
        heads = self.score_heads
        cls_row = signal == "cls" and self.has_cls
        q, k = self.score_qk(x, slice(0, 1) if cls_row else slice(None))
        k = k.reshape(b, length, heads, -1).transpose(1, 2)  # (B, H, L, Dh)
        if cls_row:
            s = cls_attention(q.reshape(b, heads, -1), k, self.score_scale)  # (B, L): one query row per head
            used = "cls"
        else:
            if signal == "cls":
                notes.append(f"{self.model_id}: the tower has no CLS token: S_intra uses received attention")
            q = q.reshape(b, length, heads, -1).transpose(1, 2)  # (B, H, L, Dh)
            s, used = received_attention(q, k, self.score_scale), "received"
        return s[:, int(self.has_cls) :], used

    def joint_patches(self, vision: VisionStates, readout: str, notes: list[str]) -> tuple[Tensor, str]:
        """``(patch states (B, N, D_v) for the joint space, the read-out used)``; naive unless overridden."""
        if readout != "naive":
            notes.append(f"inter_readout {readout!r} is implemented for LLaVA towers only: naive used")
        return vision.last[:, int(self.has_cls) :], "naive"

    # ================================================================== the family's seam

    def questions(self, images: Sequence[np.ndarray], questions: Sequence[str] | str) -> list[str]:
        """One question per image; a family may clean them (e.g. drop literal image tokens)."""
        return questions_for(images, questions)

    @abc.abstractmethod
    def preprocess(self, images: list[np.ndarray], questions: list[str]) -> Batch:
        """The HF processor on RGB frames and the family's prompts."""

    @abc.abstractmethod
    def encode(self, batch: Batch) -> VisionStates:
        """One forward of the frozen vision tower on ``batch.pixel_values``, returning the states scoring and
        the consumer need (and the per-image grids when they follow the frame)."""

    supports_token_reuse = False  # a family that implements encode_reusing sets it

    def encode_reusing(self, batch: Batch, tower: TowerReuse) -> VisionStates:
        """``encode`` with token reuse (only families with ``supports_token_reuse``): ``meta`` holds
        ``hidden_states`` (every layer, for the next frame) and ``recomputed`` (patches re-run, None: all)."""
        raise NotImplementedError

    @abc.abstractmethod
    def feed(self, vision: VisionStates, selection: Selection, batch: Batch, atp: AtpConfig) -> LmPrompt:
        """Hand the prefix (CLS) and the kept patches to the family's consumer; return generate's inputs."""

    @classmethod
    @abc.abstractmethod
    def joint_space_of(cls, model: nn.Module) -> tuple[Callable[..., JointSpace], int, str]:
        """How to load this model's joint space: ``(loader(source, device=, dtype=), tower width, kind or "")``."""

    @abc.abstractmethod
    def flops(self, kept: list[int], prompt: LmPrompt) -> dict[str, float]:
        """Per-image FLOPs (batch mean) of what the family's consumer does: at least ``projector`` and
        ``llm_prefill`` (the pipeline adds ``vision``, ``scoring`` and their sum, ``pipeline``)."""

    @property
    def generator(self) -> Callable[..., Tensor]:
        """The ``generate`` that decodes from :meth:`feed`'s kwargs."""
        return self.model.generate

    @property
    def eos_token_id(self) -> int | list[int] | None:
        return self.model.generation_config.eos_token_id

    def new_tokens(self, out: Tensor, input_len: int) -> list[list[int]]:
        """New ids per image up to and including EOS (decoder-only: generate echoes the prompt)."""
        return trim_after_eos(out[:, input_len:], self.eos_token_id)

    # ================================================================== description

    @property
    def score_heads(self) -> int:
        return int(self._score.self_attn.num_heads)

    @property
    def score_scale(self) -> float:
        return float(self._score.self_attn.scale)

    @property
    def vision_hidden(self) -> int:
        """Width of the vision tower's states (D_v)."""
        return int(self._score.layer_norm1.normalized_shape[0])

    def describe(self) -> str:
        """One line for logs: model, grid, scored layer, text tower."""
        tower = self.joint.model_id if self.joint is not None else f"none ({self.no_text_reason})"
        return json.dumps(
            {"model": self.model_id, "grid": self.grid, "score_layer": self.score_layer, "text_tower": tower}
        )
