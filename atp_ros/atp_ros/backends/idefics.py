"""IDEFICS (open Flamingo) behind ATP: prune ViT patch tokens before the perceiver resampler.

Pipeline per batch (``HuggingFaceM4/idefics-9b`` / ``-80b`` and their ``-instruct`` variants):

    frames + questions -> IdeficsProcessor -> CLIP ViT-H/14 (once, SDPA)   [preprocess, vision]
      -> S_intra: CLS attention of one ViT layer from that layer's own q/k projections
         (one query row per head); S_inter: cosine of each patch in CLIP's joint space
         (``post_layernorm`` + ``visual_projection``) with the question's CLIP text
         embedding                                                          [scoring]
      -> keep CLS + the K selected patches -> perceiver resampler over them only
         (per-sample K: padded keys masked out)                             [projector]
      -> ``perceiver_embeddings`` -> greedy ``IdeficsForVisionText2Text.generate``, whose
         gated cross-attention layers read the resampled latents           [prefill, decode]

Where the saving is: the resampler's keys/values drop from ``(1 + N) + n_latents`` to
``(1 + K) + n_latents`` per block (N = 256 for ViT-H/14 at 224 px). IDEFICS puts one
``<image>`` token per image in the text and its gated cross-attention reads the
``n_latents`` (64) resampled latents, so **neither the LLM sequence length nor its
cross-attention keys change with K**: LLM prefill costs the same; ``VlmResult.flops``
reports it that way. (Checkpoints without a resampler, ``use_resampler=False``, cross-attend
to the kept tokens directly, so there the cross-attention keys do shrink.)

``generate`` threading: ``IdeficsModel.forward`` accepts exactly one of ``pixel_values``,
``image_encoder_embeddings`` or ``perceiver_embeddings``; we pass the resampled latents as
``perceiver_embeddings`` ``(B, 1, n_latents, D)`` and generate's
``_update_model_kwargs_for_generation`` carries them to every decoding step as
``image_hidden_states``, so the vision tower and resampler run once per call.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
from torch import Tensor, nn

from atp_ros.backends.base import (
    AtpConfig,
    Stopwatch,
    VlmBackend,
    VlmResult,
    attention_flops,
    decode_answers,
    decoder_prefill_flops,
    gather_with_prefix,
    generate_timed,
    greedy,
    intra_scores,
    joint_text_cosine,
    patch_grid,
    questions_for,
    record_outputs,
    scoring_flops,
    select_patches,
    serialized,
    trim_after_eos,
    vit_flops,
)
from atp_ros.backends.loading import load_checkpoint, load_text_tower
from atp_ros.backends.text_towers import JointSpace, load_joint_space

# idefics-9b/80b froze OpenCLIP ViT-H/14 (LAION-2B); its HF CLIPModel carries the text side.
CLIP_VIT_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _perceiver_attention_masked(attn: nn.Module, context: Tensor, latents: Tensor, key_mask: Tensor) -> Tensor:
    """``IdeficsPerceiverAttention.forward`` with padded context keys masked out.

    ``context``: ``(B, M, D)``; ``latents``: ``(B, L, D)``; ``key_mask``: ``(B, M)`` 1 = real key.
    Same math as the stock module (keys are ``[context; latents]``) plus the mask.
    """
    context = attn.context_layer_norm(context)
    latents = attn.latents_layer_norm(latents)
    b = context.shape[0]
    kv_in = torch.cat([context, latents], dim=-2)  # (B, M+L, D)
    q, k, v = attn.q_proj(latents), attn.k_proj(kv_in), attn.v_proj(kv_in)
    q, k, v = [x.reshape(b, x.shape[1], attn.n_heads, attn.head_dim).transpose(1, 2) for x in (q, k, v)]  # (B,H,*,Dh)
    if attn.qk_layer_norms:
        q, k = attn.q_layer_norm(q), attn.k_layer_norm(k)
    scores = torch.einsum("... i d, ... j d -> ... i j", q * attn.qk_scale, k)  # (B, H, L, M+L)
    allowed = torch.cat([key_mask.bool(), key_mask.new_ones(b, latents.shape[1]).bool()], dim=1)  # (B, M+L)
    scores = scores.masked_fill(~allowed[:, None, None, :], torch.finfo(scores.dtype).min)
    attn_weights = (scores - scores.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
    resampled = torch.einsum("... i j, ... j d -> ... i d", attn_weights, v)  # (B, H, L, Dh)
    return attn.output_proj(resampled.transpose(1, 2).flatten(-2))  # (B, L, D)


def resample(resampler: nn.Module, context: Tensor, key_mask: Tensor) -> Tensor:
    """Perceiver resampler over ``(B, M, D)`` context -> ``(B, n_latents, D)``.

    Without padding (every ``key_mask`` entry 1) this is the stock module call, bit for
    bit; with per-sample budgets the padded keys get zero attention in every block.
    """
    if bool(key_mask.all()):
        return resampler(context)
    latents = resampler.latents.repeat(context.shape[0], 1, 1)  # (B, L, D)
    for attn, ff in resampler.blocks:
        latents = _perceiver_attention_masked(attn, context, latents, key_mask) + latents
        latents = ff(latents) + latents
    return resampler.layer_norm(latents)


class IdeficsBackend(VlmBackend):
    """IDEFICS with ATP before the perceiver resampler. Build with :meth:`from_pretrained`.

    ``score_layer`` is the ViT block whose attention gives S_intra (default: the last block,
    whose output IDEFICS hands to the resampler). The CLS token (ViT token 0) is always
    kept; ATP selects among the N patches, so the resampler sees ``1 + K`` context tokens.
    """

    family = "idefics"

    def __init__(
        self,
        model,
        processor,
        joint: JointSpace | None,
        model_id: str,
        score_layer: int = -1,
        no_text_reason: str = "",
    ) -> None:
        self.model = model
        self.processor = processor
        self.model_id = model_id
        self.device = model.device
        self.dtype = model.dtype
        self._set_text_tower(joint, no_text_reason)
        self.instruct = "instruct" in model_id.lower()
        vcfg = model.config.vision_config
        self.num_heads = int(vcfg.num_attention_heads)
        self.grid, self.num_visual_tokens = patch_grid(vcfg)
        layers = model.model.vision_model.encoder.layers
        self.score_layer = score_layer % len(layers)
        self._score_attn = layers[self.score_layer].self_attn
        self.processor.tokenizer.padding_side = "left"  # batched generation; reference and ATP paths share it
        self._image_token_id = self.processor.tokenizer.convert_tokens_to_ids("<image>")
        # One call at a time: the capture hooks sit on shared modules (see base.serialized).
        self._lock = threading.Lock()
        v = vcfg  # per-frame constants of the cost model
        self._vision_flops = vit_flops(
            self.num_visual_tokens + 1,
            v.embed_dim,
            v.intermediate_size,
            v.num_hidden_layers,
            v.num_attention_heads,
            v.patch_size,
        )
        self._resampler_keep_all_flops = self.resampler_flops(self.num_visual_tokens + 1)

    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        text_encoder_id: str = "",
        device: str = "auto",
        dtype: str = "auto",
        score_layer: int = -1,
    ) -> IdeficsBackend:
        """Load an IDEFICS checkpoint (hub id or local dir; safetensors, SDPA, no remote code).

        Text tower (an HF ``CLIPModel``): ``text_encoder_id``, else ``<model_dir>/atp_text_tower``,
        else ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` for ViT-H/14 towers. A failing explicit
        or bundled tower raises; an unavailable derived one leaves the backend CLS-only and
        every result says so in its notes.
        """
        from transformers import IdeficsForVisionText2Text

        model_id = str(model_id)
        model, processor, dev, dt = load_checkpoint(IdeficsForVisionText2Text, model_id, device, dtype)
        vcfg = model.config.vision_config
        derived = CLIP_VIT_H14 if (vcfg.embed_dim, vcfg.patch_size) == (1280, 14) else ""
        load = partial(load_joint_space, device=dev, dtype=dt)
        tower = load_text_tower(model_id, text_encoder_id, derived, load, vision_hidden=vcfg.embed_dim)
        return cls(model, processor, tower.joint, model_id, score_layer=score_layer, no_text_reason=tower.reason)

    # ------------------------------------------------------------------ inputs

    def prompt(self, image: np.ndarray, question: str) -> list:
        """IDEFICS prompt items (text and image objects, in order) for one question."""
        if self.instruct:
            return ["User:", image, f"{question}<end_of_utterance>", "\nAssistant:"]
        return [image, f"Question: {question} Answer:"]

    def _inputs(self, images: Sequence[np.ndarray], questions: Sequence[str] | str) -> dict[str, Tensor]:
        """Processor output on the device: input_ids, attention_mask, pixel_values (B,1,3,H,W), image_attention_mask."""
        qs = questions_for(images, questions)
        prompts = [self.prompt(img, q) for img, q in zip(images, qs, strict=True)]
        enc = self.processor(text=prompts, return_tensors="pt", add_end_of_utterance_token=False)
        out = {k: v.to(self.device) for k, v in enc.items()}
        out["pixel_values"] = out["pixel_values"].to(self.dtype)
        return out

    @serialized
    @torch.inference_mode()
    def reference_generate(
        self, images: Sequence[np.ndarray], questions: Sequence[str] | str, max_new_tokens: int = 32
    ) -> list[list[int]]:
        """Stock ``IdeficsForVisionText2Text.generate`` from pixels (greedy, no ATP): new token ids per image."""
        inputs = self._inputs(images, questions)
        out = self.model.generate(**inputs, **greedy(max_new_tokens))
        return trim_after_eos(out[:, inputs["input_ids"].shape[1] :], self.model.generation_config.eos_token_id)

    # ------------------------------------------------------------------ ATP path

    @serialized
    @torch.inference_mode()
    def answer(
        self,
        images: Sequence[np.ndarray],
        questions: Sequence[str] | str,
        atp: AtpConfig = AtpConfig(),
        max_new_tokens: int = 32,
    ) -> VlmResult:
        """Answer one question per image with ATP pruning the resampler's visual context."""
        inner = self.model.model
        watch = Stopwatch(self.device)
        qs = questions_for(images, questions)
        with watch.stage("preprocess"):
            inputs = self._inputs(images, qs)
        pixel_values = inputs["pixel_values"]  # (B, 1, 3, H, W): one image per prompt

        # One ViT pass; hooks keep the scored block's q/k projections (on its layer-normed
        # input) -- the attention itself stays SDPA. IDEFICS feeds the raw last-block output
        # (no post_layernorm) to the resampler; the CLIP joint space applies its own.
        hooks = {"q": self._score_attn.q_proj, "k": self._score_attn.k_proj}
        with watch.stage("vision"), record_outputs(hooks) as rec:
            image_states = inner.vision_model(pixel_values=pixel_values.flatten(0, 1)).last_hidden_state  # (B,1+N,D)

        with watch.stage("scoring"):
            s_intra = intra_scores(rec["q"], rec["k"], self.num_heads, atp.intra_signal)[:, 1:]  # (B, N)

            def s_inter() -> Tensor:  # (B, N), from the raw last-block patches
                return joint_text_cosine(self.joint, self.text_cache, image_states[:, 1:], qs)

            selection, alpha_used, notes = select_patches(
                atp,
                s_intra,
                s_inter if self.joint is not None else None,
                self.grid,
                tokens=image_states[:, 1:],
                no_text_reason=self.no_text_reason,
            )
            kept, key_mask = gather_with_prefix(image_states, selection, prefix=1)  # (B, 1+K, D), (B, 1+K)

        gen = {k: inputs[k] for k in ("input_ids", "attention_mask", "image_attention_mask")}
        with watch.stage("projector"):
            if self.model.config.use_resampler:
                latents = resample(inner.perceiver_resampler, kept, key_mask)  # (B, n_latents, D)
                gen["perceiver_embeddings"] = latents.unsqueeze(1)  # (B, num_images=1, n_latents, D)
            elif bool(key_mask.all()):
                gen["image_encoder_embeddings"] = kept.unsqueeze(1)  # (B, 1, 1+K, D)
            else:
                # Gated cross-attention masks whole images, not tokens: padding would be attended.
                raise ValueError("per-sample budgets (mass) need the perceiver resampler; this checkpoint has none")

        input_len = inputs["input_ids"].shape[1]
        out = generate_timed(self.model.generate, watch, **gen, **greedy(max_new_tokens))
        ids = trim_after_eos(out[:, input_len:], self.model.generation_config.eos_token_id)
        answers = decode_answers(self.processor.tokenizer, ids)
        seq_lens = [int(n) for n in inputs["attention_mask"].sum(dim=1).tolist()]
        n_image_tokens = (inputs["input_ids"] == self._image_token_id).sum(dim=1).tolist()
        kept_counts = [int(k) for k in selection.lengths.tolist()]
        selection.extras.update(
            cls_kept=True, resampler_context=[k + 1 for k in kept_counts], score_layer=self.score_layer
        )
        return VlmResult(
            answers=answers,
            selection=selection,
            visual_tokens_total=self.num_visual_tokens,
            visual_tokens_kept=kept_counts,
            text_tokens=[s - int(n) for s, n in zip(seq_lens, n_image_tokens, strict=True)],
            timings=watch.timings,
            flops=self.flops(kept_counts, seq_lens, atp, alpha_used > 0),
            generated_ids=ids,
            alpha_used=alpha_used,
            notes=notes,
        )

    # ------------------------------------------------------------------ cost model

    def resampler_flops(self, context: int) -> float:
        """Perceiver resampler FLOPs for one image of ``context`` visual tokens (0 without a resampler)."""
        cfg = self.model.config
        if not cfg.use_resampler:
            return 0.0
        p = cfg.perceiver_config
        d, m = cfg.vision_config.embed_dim, p.resampler_n_latents
        inner = p.resampler_n_heads * p.resampler_head_dim
        block = attention_flops(m, context + m, d, d, inner, d) + 2 * 2 * m * d * 4 * d  # attention + MLP (4x)
        return p.resampler_depth * block

    def llm_prefill_flops(self, seq_len: int, image_keys: int) -> float:
        """LLaMA decoder prefill plus the gated cross-attention blocks over ``image_keys`` keys."""
        cfg = self.model.config
        d, f = cfg.hidden_size, cfg.intermediate_size
        decoder = decoder_prefill_flops(seq_len, cfg.num_hidden_layers, d, f, cfg.num_attention_heads)
        n_cross = cfg.num_hidden_layers // cfg.cross_layer_interval
        cross = attention_flops(seq_len, image_keys, d, cfg.vision_config.embed_dim, d, d) + 2 * 3 * seq_len * d * f
        return decoder + n_cross * cross

    def flops(self, kept: list[int], seq_lens: list[int], atp: AtpConfig, used_text: bool) -> dict[str, float]:
        """Analytic per-image FLOPs (batch mean): vision, scoring, projector (resampler), LLM prefill, pipeline.

        ``projector_keep_all`` is the resampler cost without pruning. With a resampler the
        LLM's cross-attention reads ``n_latents`` keys whatever K is, so ``llm_prefill`` does
        not change with ATP.
        """
        cfg = self.model.config
        vision = self._vision_flops
        joint = self.joint if used_text else None
        scoring = scoring_flops(self.num_visual_tokens, cfg.vision_config.embed_dim, atp, joint)
        projector = float(np.mean([self.resampler_flops(k + 1) for k in kept]))

        def keys(k: int) -> int:
            return cfg.perceiver_config.resampler_n_latents if cfg.use_resampler else k + 1

        prefill = float(np.mean([self.llm_prefill_flops(t, keys(k)) for t, k in zip(seq_lens, kept, strict=True)]))
        return {
            "vision": vision,
            "scoring": scoring,
            "projector": projector,
            "projector_keep_all": self._resampler_keep_all_flops,
            "llm_prefill": prefill,
            "pipeline": vision + scoring + projector + prefill,
        }


__all__ = ["CLIP_VIT_H14", "IdeficsBackend", "resample"]
