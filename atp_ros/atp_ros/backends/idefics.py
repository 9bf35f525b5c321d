"""IDEFICS (open Flamingo) behind ATP: prune ViT patch tokens before the perceiver resampler.

Pipeline per batch (``HuggingFaceM4/idefics-9b`` / ``-80b`` and their ``-instruct`` variants):

    frames + questions -> IdeficsProcessor -> CLIP ViT-H/14 (once, SDPA)   [preprocess, vision]
      -> S_intra: CLS attention of one ViT layer, recomputed from that layer's input with its own
         ``layer_norm1`` and q/k projections (one query row per head); S_inter: cosine of each
         patch in CLIP's joint space
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

The IDEFICS vision tower returns no hidden states, so :meth:`IdeficsBackend.encode` runs its
own submodules in order (embeddings, ``pre_layrnorm``, each encoder layer) and keeps the
inputs of the score layer and of the last layer on the way: the same calls the module makes,
so the output is bit-identical to ``vision_model(pixel_values)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from atp_ros.backends.flops import attention_flops, decoder_prefill_flops
from atp_ros.backends.loading import checkpoint_name
from atp_ros.backends.pipeline import VlmBackend
from atp_ros.backends.stages import Batch, LmPrompt, VisionStates, gather_with_prefix
from atp_ros.backends.text_towers import load_joint_space
from atp_ros.backends.views import processor_view
from atp_ros.method import AtpConfig, Selection


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
    hf_class = "IdeficsForVisionText2Text"

    def __init__(self, model, processor, model_id: str, text_tower, score_layer: int | None = None) -> None:
        layers = model.model.vision_model.encoder.layers
        index = (-1 if score_layer is None else int(score_layer)) % len(layers)
        super().__init__(
            model, processor, model_id, model.device, model.dtype, model.config.vision_config, layers[index],
            index, text_tower, has_cls=True, prefix=1,
        )  # fmt: skip
        # Instruct checkpoints were tuned on a chat layout (the published names end in -instruct).
        self.instruct = checkpoint_name(model_id).lower().endswith("-instruct")
        self._image_token_id = self.tokenizer.convert_tokens_to_ids("<image>")

    # ------------------------------------------------------------------ the seam

    @classmethod
    def joint_space_of(cls, model):
        # An HF CLIPModel (published checkpoints: OpenCLIP ViT-H/14, laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
        return load_joint_space, int(model.config.vision_config.embed_dim), ""

    def prompt(self, image: np.ndarray, question: str) -> list:
        """IDEFICS prompt items (text and image objects, in order) for one question."""
        if self.instruct:
            return ["User:", image, f"{question}<end_of_utterance>", "\nAssistant:"]
        return [image, f"Question: {question} Answer:"]

    def preprocess(self, images: list[np.ndarray], questions: list[str]) -> Batch:
        prompts = [self.prompt(img, q) for img, q in zip(images, questions, strict=True)]
        enc = self.processor(text=prompts, return_tensors="pt", add_end_of_utterance_token=False)
        inputs = {k: v.to(self.device) for k, v in enc.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)  # (B, 1, 3, H, W): one image per prompt
        views = [processor_view(self.processor.image_processor, *img.shape[:2]) for img in images]
        return Batch(inputs["pixel_values"].flatten(0, 1), inputs, views)

    def encode(self, batch: Batch) -> VisionStates:
        # IdeficsVisionTransformer.forward, unrolled to keep two layer inputs (it returns no hidden states).
        vision = self.model.model.vision_model
        h = vision.pre_layrnorm(vision.embeddings(batch.pixel_values, interpolate_pos_encoding=False))  # (B, 1+N, D)
        layers = vision.encoder.layers
        score_input = last_input = h
        for i, layer in enumerate(layers):
            if i == self.score_layer:
                score_input = h
            if i == len(layers) - 1:
                last_input = h
            h = layer(h, None)
        # IDEFICS feeds the raw last-block output (no post_layernorm) to the resampler; the CLIP
        # joint space applies its own post_layernorm for S_inter.
        return VisionStates(tokens=h, score_input=score_input, last=h, last_input=last_input)

    def feed(self, vision: VisionStates, selection: Selection, batch: Batch, atp: AtpConfig) -> LmPrompt:
        kept, key_mask = gather_with_prefix(vision.tokens, selection, prefix=1)  # (B, 1+K, D), (B, 1+K)
        kwargs = {k: batch.inputs[k] for k in ("input_ids", "attention_mask", "image_attention_mask")}
        if self.model.config.use_resampler:
            latents = resample(self.model.model.perceiver_resampler, kept, key_mask)  # (B, n_latents, D)
            kwargs["perceiver_embeddings"] = latents.unsqueeze(1)  # (B, num_images=1, n_latents, D)
        elif bool(key_mask.all()):
            kwargs["image_encoder_embeddings"] = kept.unsqueeze(1)  # (B, 1, 1+K, D)
        else:
            # Gated cross-attention masks whole images, not tokens: padding would be attended.
            raise ValueError("per-sample budgets (mass) need the perceiver resampler; this checkpoint has none")
        input_ids = batch.inputs["input_ids"]
        seq_lens = [int(n) for n in batch.inputs["attention_mask"].sum(dim=1).tolist()]
        n_image = (input_ids == self._image_token_id).sum(dim=1).tolist()
        text_tokens = [s - int(n) for s, n in zip(seq_lens, n_image, strict=True)]
        context = [int(k) + 1 for k in selection.lengths.tolist()]
        return LmPrompt(kwargs, int(input_ids.shape[1]), text_tokens, context)

    # ------------------------------------------------------------------ cost model

    def flops(self, kept: list[int], prompt: LmPrompt) -> dict[str, float]:
        seq_lens = [int(n) for n in prompt.generate_kwargs["attention_mask"].sum(dim=1).tolist()]
        return idefics_costs(self.model.config, seq_lens, prompt.consumer_tokens)


def resampler_flops(config, context: int) -> float:
    """Perceiver resampler FLOPs for one image of ``context`` visual tokens (0 without a resampler)."""
    if not config.use_resampler:
        return 0.0
    p = config.perceiver_config
    d, m = config.vision_config.embed_dim, p.resampler_n_latents
    inner = p.resampler_n_heads * p.resampler_head_dim
    block = attention_flops(m, context + m, d, d, inner, d) + 2 * 2 * m * d * 4 * d  # attention + MLP (4x)
    return p.resampler_depth * block


def idefics_llm_prefill_flops(config, seq_len: int, image_keys: int) -> float:
    """LLaMA decoder prefill plus the gated cross-attention blocks over ``image_keys`` keys."""
    d, f = config.hidden_size, config.intermediate_size
    decoder = decoder_prefill_flops(seq_len, config.num_hidden_layers, d, f, config.num_attention_heads)
    n_cross = config.num_hidden_layers // config.cross_layer_interval
    cross = attention_flops(seq_len, image_keys, d, config.vision_config.embed_dim, d, d) + 2 * 3 * seq_len * d * f
    return decoder + n_cross * cross


def idefics_costs(config, seq_lens: list[int], contexts: list[int]) -> dict[str, float]:
    """Per-image FLOPs of IDEFICS' perceiver resampler (``projector``) and LLM prefill (batch mean) from
    its config. With a resampler the LLM's cross-attention reads ``n_latents`` keys whatever K is, so
    ``llm_prefill`` does not change with ATP; ``projector_keep_all`` is the resampler without pruning."""
    side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)

    def keys(context: int) -> int:
        return config.perceiver_config.resampler_n_latents if config.use_resampler else context

    pairs = list(zip(seq_lens, contexts, strict=True))
    return {
        "projector": float(np.mean([resampler_flops(config, c) for c in contexts])),
        "projector_keep_all": resampler_flops(config, side * side + 1),
        "llm_prefill": float(np.mean([idefics_llm_prefill_flops(config, t, keys(c)) for t, c in pairs])),
        "llm_tokens": float(np.mean(seq_lens)),
    }


__all__ = ["IdeficsBackend", "idefics_costs", "resample", "resampler_flops"]
