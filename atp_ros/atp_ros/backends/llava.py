"""LLaVA behind ATP on HF transformers: CLIP towers (llava-1.5) and SigLIP towers (llava-interleave).

Per batch of frames, everything in one ``torch.inference_mode()`` pass::

    frames + questions --HF processor--> pixel_values, input_ids (N <image> placeholders per image)
    pixel_values --frozen vision tower (one SDPA forward)--> feature-layer states, last-layer states,
                                                           q/k of the score layer (forward hooks)
    ATP scores from that same forward --selector--> K kept patches per image
    projector(kept patches only) --> (K, D_llm) per image
    placeholder run shortened N -> K (input_ids, attention mask, positions; left padded)
    greedy generate; the projected tokens go in through LlavaModel's ``mm_encoder_outputs``

Signals and the choices behind them:

* ``S_intra`` on a CLIP tower (``intra_signal="cls"``): CLS attention of the *score layer*, by
  default the encoder layer that produces the VLM's feature layer (llava-1.5: ``vision_feature_layer
  = -2`` is the output of encoder layer ``L-2``, so its attention is the one that formed the features
  the LLM sees). Forward hooks grab that layer's ``q_proj``/``k_proj`` outputs (its input after
  ``layer_norm1``) during the tower's normal SDPA forward; :func:`atp.cls_attention` then computes
  one query row per head. The ViT never switches to eager attention or ``output_attentions``.
  ``intra_signal="received"``: :func:`atp.received_attention` on the same layer's q/k.
* ``S_intra`` on a SigLIP tower (no CLS): the attention of SigLIP's pooling-head probe over the
  patches (of the last layer after ``post_layernorm``, what the head was trained on). The head comes
  from the VLM's tower when it kept one, else from the matching SigLIP checkpoint (llava-interleave
  saves its tower with ``vision_use_head=False``). Without either, ``received`` is used and a note says so.
* ``S_inter``: patch states of the tower's **last** encoder layer (raw residual stream), mapped into
  the joint space by the matching contrastive model (:mod:`atp_ros.backends.text_towers`). Not the
  feature layer (-2): CLIP's ``post_layernorm`` + ``visual_projection`` and SigLIP's pooling head were
  trained on last-layer outputs, so last-layer patches are the ones that land in the space the text
  embeddings live in. It costs nothing extra: HF's tower runs all its layers anyway (LLaVA's
  ``get_image_features`` does too), the last one is simply kept.
* Matching text tower: ``text_encoder_id`` when given; else ``<model_dir>/atp_text_tower``; else
  :data:`KNOWN_TEXT_TOWERS`; else none -- then one note ``"no text tower for X: running CLS-only,
  alpha=0"`` is logged at load, put in every result that asked for ``alpha > 0``, and ``alpha_used``
  is 0. Text embeddings are cached per question (:class:`atp.TextEmbeddingCache`).
* With ``vision_feature_select_strategy="full"`` on a CLS tower, the CLS token stays a visual token
  fed to the LLM: it is always kept, and selection runs over the patch grid only.

With ATP disabled (or ``K = N``) the generated tokens are identical to stock ``model.generate``
(:meth:`LlavaBackend.reference_generate`); the tests check it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from transformers import LlavaForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from atp_ros.atp import (
    ATPSelector,
    ScoreInputs,
    Selection,
    TokenSelector,
    cls_attention,
    received_attention,
)
from atp_ros.backends import ModelLoadError
from atp_ros.backends.base import (
    AtpConfig,
    Stopwatch,
    VlmBackend,
    VlmResult,
    decode_answers,
    decoder_prefill_flops,
    generate_timed,
    intra_flops,
    joint_text_cosine,
    lm_dims,
    patch_grid,
    questions_for,
    record_outputs,
    trim_after_eos,
)
from atp_ros.backends.loading import TEXT_TOWER_SUBDIR, load_checkpoint, load_text_tower
from atp_ros.backends.text_towers import JointSpace, dense_states, head_probe_attention, load_joint_space

logger = logging.getLogger(__name__)

# Hub VLM id -> the contrastive checkpoint its vision tower was taken from.
KNOWN_TEXT_TOWERS: dict[str, str] = {
    "llava-hf/llava-1.5-7b-hf": "openai/clip-vit-large-patch14-336",
    "llava-hf/llava-1.5-13b-hf": "openai/clip-vit-large-patch14-336",
    "llava-hf/llava-interleave-qwen-0.5b-hf": "google/siglip-so400m-patch14-384",
    "llava-hf/llava-interleave-qwen-7b-hf": "google/siglip-so400m-patch14-384",
}
TOWER_KINDS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}


@dataclass
class _VisionOut:
    """What one vision-tower forward leaves for scoring and the projector."""

    features: Tensor  # (B, N_feat, D_feat) feature layer(s), select strategy applied: projector input
    last: Tensor  # (B, L, D) raw last-layer states (CLS first on CLIP), for S_inter / the SigLIP probe
    last_input: Tensor  # (B, L, D) input of the last layer, for the dense S_inter read-outs
    q: Tensor | None  # (B, L, D) score layer q_proj output (captured by hook)
    k: Tensor | None  # (B, L, D) score layer k_proj output


class LlavaBackend(VlmBackend):
    """ATP-gated ``LlavaForConditionalGeneration`` (CLIP or SigLIP tower). Build with :meth:`from_pretrained`."""

    family = "llava"

    def __init__(
        self,
        model: LlavaForConditionalGeneration,
        processor,
        model_id: str,
        device: torch.device,
        dtype: torch.dtype,
        joint: JointSpace | None = None,
        text_tower_id: str = "",
        load_notes: Sequence[str] = (),
        score_layer: int | None = None,
        text_cache_size: int = 64,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # batched generation: prompts end where generation starts
        if model.generation_config.pad_token_id is None and self.tokenizer.pad_token_id is not None:
            # Else generate() warns on every call (once per frame in the node).
            model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        cfg = model.config
        vcfg = cfg.vision_config
        self.tower_kind = TOWER_KINDS.get(vcfg.model_type, "")
        if not self.tower_kind:
            raise ValueError(f"vision tower {vcfg.model_type!r} is not supported (supported: {sorted(TOWER_KINDS)})")
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.image_token_id = int(cfg.image_token_id)
        self.feature_layer = cfg.vision_feature_layer
        self.select_strategy = cfg.vision_feature_select_strategy
        self.num_layers = int(vcfg.num_hidden_layers)
        self.grid, self.num_visual_tokens = patch_grid(vcfg)  # N: patches the selector sees
        self.has_cls = hasattr(self.tower.embeddings, "class_embedding")
        # CLS reaches the LLM only with the "full" strategy; it is then always kept.
        self.cls_fed = int(self.has_cls and self.select_strategy != "default")
        self.num_feature_tokens = self.num_visual_tokens + self.cls_fed
        last_feature = self.feature_layer if isinstance(self.feature_layer, int) else self.feature_layer[-1]
        self.score_layer = self._default_score_layer(last_feature) if score_layer is None else int(score_layer)
        if not 0 <= self.score_layer < self.num_layers:
            raise ValueError(f"score_layer {self.score_layer} out of range for a {self.num_layers}-layer tower")
        attn = self.tower.encoder.layers[self.score_layer].self_attn
        if not (hasattr(attn, "q_proj") and hasattr(attn, "k_proj")):
            raise ValueError(f"{type(attn).__name__} has no q_proj/k_proj to score with")
        self._attn = attn
        self._set_text_tower(joint, cache_size=text_cache_size)
        self.text_tower_id = text_tower_id
        self.load_notes = list(load_notes)
        self._no_tower_note = f"no text tower for {model_id}: running CLS-only, alpha=0"
        # SigLIP probe: the VLM tower's own head if it kept one, else the matching checkpoint's.
        self._probe_source = ""
        if self.tower_kind == "siglip":
            if getattr(self.tower, "use_head", False):
                self._probe_source = "vlm"
            elif joint is not None and joint.has_probe:
                self._probe_source = "joint"
        self._vision_flops = self._tower_flops()
        # One call at a time: the capture hooks and the model's kernels are not shared across threads.
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        text_encoder_id: str = "",
        device: str = "auto",
        dtype: str = "auto",
        score_layer: int | None = None,
    ) -> LlavaBackend:
        """Load a LLaVA checkpoint (hub id or local dir) and its matching text tower.

        Offline from a local dir; ``trust_remote_code=False``, safetensors only, SDPA attention.
        Raises :class:`ModelLoadError` naming ``model_id`` (or the text tower) on failure.
        """
        model_id = str(model_id)
        model, processor, dev, dt = load_checkpoint(LlavaForConditionalGeneration, model_id, device, dtype)
        vcfg = model.config.vision_config
        kind = TOWER_KINDS.get(vcfg.model_type, "")
        if not kind:
            raise ModelLoadError(
                f"{model_id}: vision tower {vcfg.model_type!r} is not supported "
                f"(supported: {', '.join(sorted(TOWER_KINDS))})"
            )
        # Only an explicit text_encoder_id must load: a broken bundled tower degrades to CLS-only too.
        tower = load_text_tower(
            model_id,
            text_encoder_id,
            _known_text_tower(model_id),
            partial(load_joint_space, device=dev, dtype=dt),
            vision_hidden=int(vcfg.hidden_size),
            kind=kind,
            soft=("subfolder", "derived"),
        )
        notes = []
        if tower.joint is None:
            notes.append(f"no text tower for {model_id}: running CLS-only, alpha=0 ({tower.reason})")
            logger.warning(notes[0])
        if score_layer is None:
            # A checkpoint may name the S_intra layer chosen for it on validation data (config.json).
            score_layer = getattr(model.config, "atp_score_layer", None)
        try:
            return cls(
                model,
                processor,
                model_id,
                dev,
                dt,
                joint=tower.joint,
                text_tower_id=tower.source,
                load_notes=notes,
                score_layer=score_layer,
            )
        except ValueError as err:
            raise ModelLoadError(f"{model_id}: {err}") from err

    def _default_score_layer(self, feature_layer: int) -> int:
        """Encoder layer whose output is ``hidden_states[feature_layer]`` (index 0 = embeddings -> layer 0)."""
        index = feature_layer % (self.num_layers + 1)
        return max(index - 1, 0)

    # ------------------------------------------------------------------ inference

    def answer(
        self,
        images: Sequence[np.ndarray],
        questions: Sequence[str] | str,
        atp: AtpConfig = AtpConfig(),
        max_new_tokens: int = 32,
    ) -> VlmResult:
        """Answer one question per image with ATP pruning the visual tokens (see the module docstring)."""
        qs = self._questions(images, questions)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        atp.check()
        sw = Stopwatch(self.device)
        notes: list[str] = []
        with self._lock, torch.inference_mode():
            with sw.stage("preprocess"):
                inputs = self._preprocess(images, qs)
            with sw.stage("vision"):
                vis = self._encode(inputs["pixel_values"], capture_qk=atp.enabled)
            with sw.stage("scoring"):
                selection, alpha_used = self._select(vis, qs, atp, notes)
            with sw.stage("projector"):
                feats = self._project(vis.features, selection)  # B x (K_b + cls, D_llm)
                kept = [int(f.shape[0]) for f in feats]
                original = selection if atp.positions == "original" else None
                ids, mask, positions, text_tokens = self._shorten(
                    inputs["input_ids"], inputs["attention_mask"], kept, original
                )
            new_ids = self._generate(ids, mask, positions, feats, max_new_tokens, sw)
        answers = decode_answers(self.tokenizer, new_ids)
        return VlmResult(
            answers=answers,
            selection=selection,
            visual_tokens_total=self.num_feature_tokens,
            visual_tokens_kept=kept,
            text_tokens=text_tokens,
            timings=sw.timings,
            flops=self._flops(text_tokens, kept, self._scoring_flops(atp, selection)),
            generated_ids=new_ids,
            alpha_used=alpha_used,
            notes=notes,
        )

    def reference_generate(
        self, images: Sequence[np.ndarray], questions: Sequence[str] | str, max_new_tokens: int = 32
    ) -> list[list[int]]:
        """Stock ``model.generate(**processor(...), do_sample=False)``: new ids per image up to and including EOS."""
        qs = self._questions(images, questions)
        with self._lock, torch.inference_mode():
            inputs = {k: v.to(self.device) for k, v in self._preprocess(images, qs).items()}
            out = self.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        return self._trim(out[:, inputs["input_ids"].shape[1] :])

    # ------------------------------------------------------------------ stages

    def _questions(self, images: Sequence[np.ndarray], questions: Sequence[str] | str) -> list[str]:
        qs = questions_for(images, questions)
        # A literal image token in a question would add placeholders the tower never fills.
        image_token = self.processor.image_token
        return [q.replace(image_token, " ").strip() for q in qs]

    def _prompt(self, question: str) -> str:
        if getattr(self.processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return f"USER: {self.processor.image_token}\n{question} ASSISTANT:"

    def _preprocess(self, images: Sequence[np.ndarray], questions: list[str]) -> dict[str, Tensor]:
        pil = []
        for i, img in enumerate(images):
            arr = np.asarray(img)
            if arr.ndim != 3 or arr.shape[2] != 3:
                raise ValueError(f"image {i}: expected an HxWx3 RGB array, got shape {arr.shape}")
            pil.append(Image.fromarray(arr.astype(np.uint8, copy=False)))
        enc = self.processor(images=pil, text=[self._prompt(q) for q in questions], return_tensors="pt", padding=True)
        # input_ids / attention_mask stay on the CPU: _shorten edits them there without a GPU sync per sample.
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "pixel_values": enc["pixel_values"].to(self.device, self.dtype),
        }

    def _encode(self, pixel_values: Tensor, capture_qk: bool) -> _VisionOut:
        """One tower forward (the model's own SDPA); hooks keep the score layer's q/k projections."""
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        hooked = {"q": self._attn.q_proj, "k": self._attn.k_proj} if capture_qk else {}
        with record_outputs(hooked) as captured:  # (B, L, D) each; the tower's SDPA forward is untouched
            out = self.tower(pixel_values, output_hidden_states=[*layers, -2, -1], return_dict=True)
        hs = out.hidden_states
        # Exactly LlavaModel.get_image_features' selection, so K = N reproduces stock features.
        pool = [hs[i][:, 1:] if self.select_strategy == "default" else hs[i] for i in layers]
        features = pool[0] if len(pool) == 1 else torch.cat(pool, dim=-1)  # (B, N_feat, D_feat)
        return _VisionOut(features=features, last=hs[-1], last_input=hs[-2], q=captured.get("q"), k=captured.get("k"))

    def _heads(self, x: Tensor) -> Tensor:
        b, length, _ = x.shape
        return x.view(b, length, -1, self._attn.head_dim).transpose(1, 2)  # (B, H, L, Dh)

    def _s_intra(self, vis: _VisionOut, signal: str, notes: list[str]) -> tuple[Tensor, str]:
        """(S_intra (B, N), the signal actually used)."""
        offset = int(self.has_cls)  # drop the CLS column: selection runs over patches
        if signal == "cls" and self.has_cls:
            q = self._heads(vis.q[:, :1])[:, :, 0]  # (B, H, Dh) CLS query only
            return cls_attention(q, self._heads(vis.k), scale=self._attn.scale)[:, offset:], "cls"
        if signal == "cls" and self._probe_source == "vlm":
            x = self.tower.post_layernorm(vis.last)  # (B, N, D)
            return head_probe_attention(self.tower.head, x), "probe"
        if signal == "cls" and self._probe_source == "joint":
            return self.joint.probe_attention(vis.last), "probe"
        if signal == "cls":
            notes.append(f"no pooling head for {self.model_id}: S_intra uses received attention")
        s = received_attention(self._heads(vis.q), self._heads(vis.k), scale=self._attn.scale)  # (B, L)
        return s[:, offset:], "received"

    def _select(
        self, vis: _VisionOut, questions: list[str], atp: AtpConfig, notes: list[str]
    ) -> tuple[Selection, float]:
        patches = vis.features[:, self.cls_fed :]  # (B, N, D_feat)
        n = self.num_visual_tokens
        if not atp.enabled:
            sel = atp.make_selector().select(ScoreInputs(tokens=patches, grid=self.grid), atp.budget(n))
            return sel, 0.0
        requested = {"atp": atp.alpha, "cls_only": 0.0, "text_only": 1.0}.get(atp.selector)
        selector: TokenSelector = atp.make_selector()
        alpha_used = 0.0 if requested is None else requested
        if requested is not None and requested > 0 and self.joint is None:
            notes.append(self._no_tower_note)
            selector = ATPSelector(alpha=0.0, normalization=atp.normalization, name=atp.selector)
            alpha_used = 0.0
        s_intra, used_signal = self._s_intra(vis, atp.intra_signal, notes)
        s_inter = None
        if self.joint is not None and selector.needs_text:  # no joint read-out / text tower when unused
            states = vis.last  # (B, L, D) naive: the raw last-layer states
            if atp.inter_readout != "naive":
                # The joint space's vision tower is the VLM's (llava-1.5 / CLIP-L-336, warehouse-tiny),
                # so the VLM tower's last layer is the one the read-out modifies.
                states = dense_states(self.tower.encoder.layers[-1], vis.last_input, atp.inter_readout)
            s_inter = joint_text_cosine(self.joint, self.text_cache, states[:, int(self.has_cls) :], questions)
        inputs = ScoreInputs(s_intra=s_intra, s_inter=s_inter, tokens=patches, grid=self.grid)
        sel = selector.select(inputs, atp.budget(n))
        sel.s_intra, sel.s_inter = s_intra, s_inter
        sel.extras.update(
            {
                "intra_signal": used_signal,
                "score_layer": self.score_layer,
                "alpha": alpha_used,
                "inter_readout": atp.inter_readout if s_inter is not None else "",
            }
        )
        return sel, alpha_used

    def _project(self, features: Tensor, sel: Selection) -> list[Tensor]:
        """Projector on the kept tokens only: list of ``(K_b + cls, D_llm)``."""
        cls_tok = features[:, : self.cls_fed]  # (B, 0|1, D_feat)
        patches = features[:, self.cls_fed :]  # (B, N, D_feat)
        if sel.uniform:
            # Batched like stock get_image_features, so K = N is bit-identical to it.
            kept = patches if sel.indices.shape[1] == patches.shape[1] else sel.gather(patches)  # (B, K, D_feat)
            return list(self.projector(torch.cat([cls_tok, kept], dim=1)))
        lengths = sel.lengths.tolist()  # one device->host copy, not one per sample
        idx = sel.indices.to(patches.device)
        rows = [torch.cat([cls_tok[b], patches[b, idx[b, :k]]]) for b, k in enumerate(lengths)]
        projected = self.projector(torch.cat(rows))  # (sum K_b, D_llm): position-wise, one call
        return list(projected.split([len(r) for r in rows]))

    def _shorten(
        self, input_ids: Tensor, attention_mask: Tensor, kept: list[int], original: Selection | None = None
    ) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        """Replace each sample's run of N_feat placeholders by ``kept[b]``; left-pad; position ids.

        ``original=None`` ("compact"): positions count the shortened sequence, as generate would
        derive them from the mask. With the selection ("original"): each kept visual token keeps
        the position it had among all N_feat (CLS, when fed, is 0 of the run) and the text after
        the image keeps its unpruned positions; generate continues decoding from the last one + 1.
        Works on the processor's CPU tensors (no GPU sync per sample); returns them on the device.
        """
        input_ids, attention_mask = input_ids.cpu(), attention_mask.cpu()
        rows, text_tokens, pos_rows = [], [], []
        if original is not None:  # one device->host copy for the batch, not one per sample
            kept_idx, kept_len = original.indices.cpu(), original.lengths.cpu().tolist()
        for b in range(input_ids.shape[0]):
            row = input_ids[b][attention_mask[b].bool()]  # unpadded prompt
            where = (row == self.image_token_id).nonzero().flatten()
            if len(where) != self.num_feature_tokens or int(where[-1] - where[0]) + 1 != len(where):
                raise RuntimeError(
                    f"sample {b}: expected one run of {self.num_feature_tokens} image tokens, found {len(where)}"
                )
            start, end = int(where[0]), int(where[-1]) + 1
            rows.append(torch.cat([row[:start], row.new_full((kept[b],), self.image_token_id), row[end:]]))
            text_tokens.append(len(row) - len(where))
            if original is not None:
                patches = kept_idx[b, : kept_len[b]] + self.cls_fed  # offsets inside the unpruned run
                run = torch.cat([torch.arange(self.cls_fed), patches]) + start
                pos_rows.append(torch.cat([torch.arange(start), run, torch.arange(end, len(row))]))
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = input_ids.new_full((len(rows), length), pad)  # (B, T)
        mask = attention_mask.new_zeros((len(rows), length))  # (B, T)
        for b, r in enumerate(rows):
            ids[b, length - len(r) :] = r
            mask[b, length - len(r) :] = 1
        # What generate derives from a left-padded mask; explicit so ids, mask and positions move together.
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (B, T)
        for b, p in enumerate(pos_rows):  # "original": the unpruned positions of the kept tokens
            positions[b, length - len(p) :] = p
        return ids.to(self.device), mask.to(self.device), positions.to(self.device), text_tokens

    def _generate(
        self, ids: Tensor, mask: Tensor, positions: Tensor, feats: list[Tensor], max_new_tokens: int, sw: Stopwatch
    ) -> list[list[int]]:
        out = generate_timed(
            self.model.generate,
            sw,
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=feats)},
            do_sample=False,
            max_new_tokens=max_new_tokens,
        )
        return self._trim(out[:, ids.shape[1] :])

    def _trim(self, new_tokens: Tensor) -> list[list[int]]:
        """New ids per sample up to and including the first EOS (drops generate's post-EOS padding)."""
        return trim_after_eos(new_tokens, self.model.generation_config.eos_token_id)

    # ------------------------------------------------------------------ accounting

    def _tower_flops(self) -> float:
        """Analytic forward FLOPs of the full vision tower for one image (all layers run, as in HF)."""
        v = self.model.config.vision_config
        tokens = self.num_visual_tokens + int(self.has_cls)
        patch_embed = 2.0 * self.num_visual_tokens * v.num_channels * v.patch_size**2 * v.hidden_size
        layers = decoder_prefill_flops(
            tokens, v.num_hidden_layers, v.hidden_size, v.intermediate_size, v.num_attention_heads, gated_mlp=False
        )
        return patch_embed + layers

    def _scoring_flops(self, atp: AtpConfig, sel: Selection) -> float:
        """ATP scoring FLOPs for one image: S_intra from the captured q/k (or the SigLIP probe) and,
        when it was used, the joint-space read-out and cosine; the text tower is cached, so not counted."""
        if not atp.enabled:
            return 0.0
        n, d = self.num_visual_tokens, int(self.model.config.vision_config.hidden_size)
        signal = sel.extras.get("intra_signal", "cls")
        if signal == "probe":
            scoring = 2.0 * n * d * d + 4.0 * n * d  # probe keys of every patch + one query row
        else:
            scoring = intra_flops(n + int(self.has_cls), d, "cls" if signal == "cls" else "received")
        if sel.s_inter is not None and self.joint is not None:
            scoring += self.joint.joint_flops(n) + 2.0 * n * self.joint.embed_dim
        return scoring

    def _flops(self, text_tokens: list[int], kept: list[int], scoring: float = 0.0) -> dict[str, float]:
        """Per-image FLOPs, averaged over the batch (rows differ only with per-sample budgets)."""
        dims = lm_dims(self.model.config.text_config)

        def prefill(seq: int) -> float:
            return decoder_prefill_flops(seq, **dims)

        lin1: nn.Linear = self.projector.linear_1
        lin2: nn.Linear = self.projector.linear_2
        per_token = 2.0 * (lin1.in_features * lin1.out_features + lin2.in_features * lin2.out_features)
        b = len(kept)
        llm = sum(prefill(tt + k) for tt, k in zip(text_tokens, kept, strict=True)) / b
        projector = per_token * sum(kept) / b
        full = sum(prefill(tt + self.num_feature_tokens) for tt in text_tokens) / b
        return {
            "llm_prefill": llm,
            "llm_prefill_unpruned": full,
            "vision": self._vision_flops,
            "scoring": scoring,
            "projector": projector,
            "pipeline": self._vision_flops + scoring + projector + llm,
        }


def _known_text_tower(model_id: str) -> str:
    """Table lookup by hub id, or by the last two path parts of a local copy (``.../llava-hf/llava-1.5-7b-hf``)."""
    if model_id in KNOWN_TEXT_TOWERS:
        return KNOWN_TEXT_TOWERS[model_id]
    parts = Path(model_id).parts
    return KNOWN_TEXT_TOWERS.get("/".join(parts[-2:]), "") if len(parts) >= 2 else ""


__all__ = ["KNOWN_TEXT_TOWERS", "TEXT_TOWER_SUBDIR", "LlavaBackend"]
