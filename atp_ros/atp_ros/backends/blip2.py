"""BLIP-2 behind ATP: prune ViT patch tokens before the Q-Former.

Pipeline per batch (``Salesforce/blip2-opt-2.7b`` and friends, HF transformers):

    frames + questions -> Blip2Processor -> ViT-g (once, SDPA)            [preprocess, vision]
      -> S_intra: CLS attention of one ViT layer from that layer's own fused qkv projection
         (one query row per head); S_inter: cosine of each patch, mapped into EVA-CLIP's
         joint space, with the question's EVA-CLIP text embedding         [scoring]
      -> keep CLS + the K selected patches -> Q-Former cross-attends only to them
         (``encoder_attention_mask`` masks the padding of per-sample K)   [projector]
      -> language projection -> 32 query embeddings replace the <image> tokens -> greedy
         ``language_model.generate``                                       [prefill, decode]

Where the saving is: the Q-Former's cross-attention keys/values drop from ``1 + N`` to
``1 + K`` (N = 256 for ViT-g/14 at 224 px). The LLM prefix stays ``num_query_tokens`` (32)
tokens whatever K is, so **LLM prefill cost does not change**; ``VlmResult.flops`` reports
both so the saving is never overstated.

Joint space: BLIP-2's ViT-g is EVA01-CLIP-g/14's visual tower with its last (40th) block
removed; the Q-Former reads block 39's output through BLIP-2's own ``ln_vision``
(HF ``post_layernorm``). For S_inter the *pre*-``ln_vision`` output of the last BLIP-2
block (= EVA block 39) goes through EVA-CLIP's visual final norm and projection
(open_clip ``EVA01-g-14``: ``trunk.norm`` -> ``trunk.head``), skipping EVA's block 40.
That is an approximation of EVA-CLIP's own patch read-out, chosen because it needs no extra
ViT block per frame; only S_inter uses it, the Q-Former path is the stock one. The text
side is that open_clip model's text tower (:mod:`atp_ros.backends.openclip_tower`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
from torch import Tensor

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
    lm_dims,
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
from atp_ros.backends.openclip_tower import EVA01_G14, OpenClipJointSpace, load_openclip_joint_space


class Blip2Backend(VlmBackend):
    """BLIP-2 with ATP before the Q-Former. Build with :meth:`from_pretrained`.

    ``score_layer`` is the ViT block whose attention gives S_intra (default: the last
    block, whose output the Q-Former reads). The CLS token (ViT token 0) always reaches the
    Q-Former; ATP selects among the N patches, so the Q-Former sees ``1 + K`` keys.
    """

    family = "blip-2"
    prompt_template = "Question: {question} Answer:"

    def __init__(
        self,
        model,
        processor,
        joint: OpenClipJointSpace | None,
        model_id: str,
        score_layer: int = -1,
        no_text_reason: str = "",
    ) -> None:
        self.model = model
        self.processor = processor
        self.model_id = model_id
        self.device = model.device
        self.dtype = model.vision_model.dtype
        self._set_text_tower(joint, no_text_reason)
        vcfg = model.config.vision_config
        self.num_heads = int(vcfg.num_attention_heads)
        self.grid, self.num_visual_tokens = patch_grid(vcfg)
        layers = model.vision_model.encoder.layers
        self.score_layer = score_layer % len(layers)
        self._score_qkv = layers[self.score_layer].self_attn.qkv  # fused q|k|v projection of the scored block
        self._last_block = layers[-1]
        # Batched decoder-only generation needs left padding; reference and ATP paths share it.
        self.processor.tokenizer.padding_side = "left"
        # One call at a time: the capture hooks sit on shared modules (see base.serialized).
        self._lock = threading.Lock()
        # Per-frame constants of the cost model.
        v = vcfg
        self._vision_flops = vit_flops(
            self.num_visual_tokens + 1,
            v.hidden_size,
            v.intermediate_size,
            v.num_hidden_layers,
            v.num_attention_heads,
            v.patch_size,
        )
        self._qformer_keep_all_flops = self.qformer_flops(self.num_visual_tokens + 1)
        self._lm_dims = lm_dims(model.config.text_config)

    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        text_encoder_id: str = "",
        device: str = "auto",
        dtype: str = "auto",
        score_layer: int = -1,
    ) -> Blip2Backend:
        """Load a BLIP-2 checkpoint (hub id or local dir; safetensors, SDPA, no remote code).

        Text tower: ``text_encoder_id`` (see :mod:`openclip_tower` for accepted forms), else
        ``<model_dir>/atp_text_tower``, else EVA01-g-14 for ViT-g checkpoints. A failing
        explicit or bundled tower raises; a derived one that is not available (offline, not
        cached) leaves the backend CLS-only and every result says so in its notes.
        """
        from transformers import Blip2ForConditionalGeneration

        model_id = str(model_id)
        model, processor, dev, dt = load_checkpoint(Blip2ForConditionalGeneration, model_id, device, dtype)
        if getattr(processor, "num_query_tokens", None) is None or model.config.image_token_index is None:
            raise ValueError(
                "checkpoint predates BLIP-2 image tokens (processor num_query_tokens / config image_token_index unset)"
            )
        vcfg = model.config.vision_config
        derived = EVA01_G14 if (vcfg.hidden_size, vcfg.patch_size) == (1408, 14) else ""
        load = partial(load_openclip_joint_space, device=dev, dtype=dt)
        tower = load_text_tower(model_id, text_encoder_id, derived, load, vision_hidden=vcfg.hidden_size)
        return cls(model, processor, tower.joint, model_id, score_layer=score_layer, no_text_reason=tower.reason)

    # ------------------------------------------------------------------ inputs

    def _inputs(self, images: Sequence[np.ndarray], questions: Sequence[str] | str) -> dict[str, Tensor]:
        """Processor output on the model's device: pixel_values, input_ids, attention_mask."""
        qs = questions_for(images, questions)
        prompts = [self.prompt_template.format(question=q) for q in qs]
        enc = self.processor(images=list(images), text=prompts, return_tensors="pt", padding=True)
        out = {k: v.to(self.device) for k, v in enc.items()}
        out["pixel_values"] = out["pixel_values"].to(self.dtype)
        return out

    def _new_tokens(self, out: Tensor, input_len: int) -> list[list[int]]:
        """Strip the prompt (decoder-only LMs echo it) and padding after EOS."""
        lm_cfg = self.model.language_model.config
        new = out[:, 1:] if lm_cfg.is_encoder_decoder else out[:, input_len:]  # enc-dec: drop decoder start
        return trim_after_eos(new, self.model.language_model.generation_config.eos_token_id)

    @serialized
    @torch.inference_mode()
    def reference_generate(
        self, images: Sequence[np.ndarray], questions: Sequence[str] | str, max_new_tokens: int = 32
    ) -> list[list[int]]:
        """Stock ``Blip2ForConditionalGeneration.generate`` (greedy, no ATP): new token ids per image."""
        inputs = self._inputs(images, questions)
        out = self.model.generate(**inputs, **greedy(max_new_tokens))
        return self._new_tokens(out, inputs["input_ids"].shape[1])

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
        """Answer one question per image with ATP pruning the Q-Former's visual keys."""
        model = self.model
        watch = Stopwatch(self.device)
        qs = questions_for(images, questions)
        with watch.stage("preprocess"):
            inputs = self._inputs(images, qs)

        # One ViT pass. Hooks keep the scored block's fused qkv output and the last block's
        # output (pre ln_vision) for the joint space; the attention itself stays SDPA.
        hooks = {"qkv": self._score_qkv, "last": self._last_block}
        with watch.stage("vision"), record_outputs(hooks) as rec:
            image_embeds = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state  # (B, 1+N, Dv)

        with watch.stage("scoring"):
            dim = image_embeds.shape[-1]
            qkv = rec["qkv"]  # (B, 1+N, 3*Dv) laid out as [q | k | v], heads inside each
            s_all = intra_scores(qkv[..., :dim], qkv[..., dim : 2 * dim], self.num_heads, atp.intra_signal)
            s_intra = s_all[:, 1:]  # (B, N) attention to patches; CLS is always kept

            def s_inter() -> Tensor:  # (B, N), from the last block's patches before ln_vision
                return joint_text_cosine(self.joint, self.text_cache, rec["last"][:, 1:], qs)

            selection, alpha_used, notes = select_patches(
                atp,
                s_intra,
                s_inter if self.joint is not None else None,
                self.grid,
                tokens=image_embeds[:, 1:],
                no_text_reason=self.no_text_reason,
            )
            kept, key_mask = gather_with_prefix(image_embeds, selection, prefix=1)  # (B, 1+K, Dv), (B, 1+K)

        with watch.stage("projector"):
            query_tokens = model.query_tokens.expand(kept.shape[0], -1, -1)
            query_output = model.qformer(
                query_embeds=query_tokens, encoder_hidden_states=kept, encoder_attention_mask=key_mask
            ).last_hidden_state  # (B, num_query_tokens, Hq), fp32
            lm_inputs = model.language_projection(query_output.to(image_embeds.dtype))  # (B, nq, D_lm)
            input_ids = inputs["input_ids"]
            embeds = model.get_input_embeddings()(input_ids)  # (B, T, D_lm)
            image_slots = (input_ids == model.config.image_token_index).unsqueeze(-1)
            embeds = embeds.masked_scatter(image_slots, lm_inputs.to(embeds.dtype))

        gen = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}
        if not model.language_model.config.is_encoder_decoder:
            gen["input_ids"] = input_ids  # what the stock generate passes too
        out = generate_timed(model.language_model.generate, watch, **gen, **greedy(max_new_tokens))

        ids = self._new_tokens(out, input_ids.shape[1])
        answers = decode_answers(self.processor.tokenizer, ids)
        nq = model.config.num_query_tokens
        text_tokens = [int(n) - nq for n in inputs["attention_mask"].sum(dim=1).tolist()]
        kept_counts = [int(k) for k in selection.lengths.tolist()]
        selection.extras.update(cls_kept=True, qformer_keys=[k + 1 for k in kept_counts], score_layer=self.score_layer)
        return VlmResult(
            answers=answers,
            selection=selection,
            visual_tokens_total=self.num_visual_tokens,
            visual_tokens_kept=kept_counts,
            text_tokens=text_tokens,
            timings=watch.timings,
            flops=self.flops(kept_counts, [t + nq for t in text_tokens], atp, alpha_used > 0),
            generated_ids=ids,
            alpha_used=alpha_used,
            notes=notes,
        )

    # ------------------------------------------------------------------ cost model

    def qformer_flops(self, num_keys: int) -> float:
        """Q-Former + language projection FLOPs for one image whose cross-attention sees ``num_keys`` keys."""
        cfg = self.model.config
        q = cfg.qformer_config
        nq, h, dv = cfg.num_query_tokens, q.hidden_size, cfg.vision_config.hidden_size
        total = 0.0
        for layer in range(q.num_hidden_layers):
            total += attention_flops(nq, nq, h, h, h, h) + 4 * nq * h * q.intermediate_size
            if layer % q.cross_attention_frequency == 0:
                total += attention_flops(nq, num_keys, h, dv, h, h)
        return total + 2 * nq * h * self.model.config.text_config.hidden_size

    def flops(self, kept: list[int], seq_lens: list[int], atp: AtpConfig, used_text: bool) -> dict[str, float]:
        """Analytic per-image FLOPs (batch mean): vision, scoring, projector (Q-Former), LLM prefill, pipeline.

        ``projector_keep_all`` is the Q-Former cost without pruning, for comparison: the
        Q-Former cross-attention is the only stage pruning shrinks; ``llm_prefill`` is the
        same with and without ATP because the LLM always gets ``num_query_tokens`` tokens.
        """
        vision = self._vision_flops
        hidden = self.model.config.vision_config.hidden_size
        scoring = scoring_flops(self.num_visual_tokens, hidden, atp, self.joint if used_text else None)
        projector = float(np.mean([self.qformer_flops(k + 1) for k in kept]))
        prefill = float(np.mean([decoder_prefill_flops(t, **self._lm_dims) for t in seq_lens]))
        return {
            "vision": vision,
            "scoring": scoring,
            "projector": projector,
            "projector_keep_all": self._qformer_keep_all_flops,
            "llm_prefill": prefill,
            "pipeline": vision + scoring + projector + prefill,
        }


__all__ = ["Blip2Backend"]
