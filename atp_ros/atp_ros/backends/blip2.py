"""BLIP-2 behind ATP: prune ViT patch tokens before the Q-Former.

Pipeline per batch (``Salesforce/blip2-opt-2.7b`` and friends, HF transformers):

    frames + questions -> Blip2Processor -> ViT-g (once, SDPA)            [preprocess, vision]
      -> S_intra: CLS attention of one ViT layer, recomputed from that layer's input with its own
         ``layer_norm1`` and the q/k rows of its fused qkv projection (one query row per head);
         S_inter: cosine of each patch, mapped into EVA-CLIP's
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

import numpy as np
from torch import Tensor, nn

from atp_ros.backends.flops import attention_flops, decoder_prefill_flops, lm_dims
from atp_ros.backends.openclip_tower import load_openclip_joint_space
from atp_ros.backends.pipeline import VlmBackend
from atp_ros.backends.stages import Batch, LmPrompt, VisionStates, gather_with_prefix, trim_after_eos
from atp_ros.backends.views import processor_view
from atp_ros.method import AtpConfig, Selection

BLIP2_NOTE = (
    "S_inter reads BLIP-2's last ViT block through EVA-CLIP's final norm and projection "
    "(EVA's block 40 is skipped): an approximation of EVA-CLIP's own patch read-out"
)


class Blip2Backend(VlmBackend):
    """BLIP-2 with ATP before the Q-Former. Build with :meth:`from_pretrained`.

    ``score_layer`` is the ViT block whose attention gives S_intra (default: the last
    block, whose output the Q-Former reads). The CLS token (ViT token 0) always reaches the
    Q-Former; ATP selects among the N patches, so the Q-Former sees ``1 + K`` keys.
    """

    family = "blip-2"
    hf_class = "Blip2ForConditionalGeneration"
    prompt_template = "Question: {question} Answer:"

    def __init__(self, model, processor, model_id: str, text_tower, score_layer: int | None = None) -> None:
        if getattr(processor, "num_query_tokens", None) is None or model.config.image_token_index is None:
            raise ValueError(
                "checkpoint predates BLIP-2 image tokens (processor num_query_tokens / config image_token_index unset)"
            )
        layers = model.vision_model.encoder.layers
        index = (-1 if score_layer is None else int(score_layer)) % len(layers)
        notes = [BLIP2_NOTE] if text_tower.joint is not None else []
        super().__init__(
            model, processor, model_id, model.device, model.vision_model.dtype, model.config.vision_config,
            layers[index], index, text_tower, has_cls=True, prefix=1, load_notes=notes,
        )  # fmt: skip

    # ------------------------------------------------------------------ the seam

    @classmethod
    def joint_space_of(cls, model):
        # EVA-CLIP's text side lives only in open_clip (published checkpoints: EVA01-g-14).
        return load_openclip_joint_space, int(model.config.vision_config.hidden_size), ""

    def preprocess(self, images: list[np.ndarray], questions: list[str]) -> Batch:
        prompts = [self.prompt_template.format(question=q) for q in questions]
        enc = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in enc.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        views = [processor_view(self.processor.image_processor, *img.shape[:2]) for img in images]
        return Batch(inputs["pixel_values"], inputs, views)

    def encode(self, batch: Batch) -> VisionStates:
        out = self.model.vision_model(pixel_values=batch.pixel_values, output_hidden_states=True)
        hs = out.hidden_states  # hs[i]: input of block i; hs[-1]: last block before ln_vision
        # The Q-Former reads last_hidden_state (after ln_vision); S_inter the raw last block (see module doc).
        return VisionStates(tokens=out.last_hidden_state, score_input=hs[self.score_layer], last=hs[-1])

    def score_qk(self, x: Tensor, query_rows: slice) -> tuple[Tensor, Tensor]:
        # One fused projection laid out [q | k | v] (heads inside each): apply only its q and k rows.
        qkv: nn.Linear = self._score.self_attn.qkv
        d = qkv.in_features
        bias = qkv.bias if qkv.bias is not None else None
        y = self._score.layer_norm1(x)
        q = nn.functional.linear(y[:, query_rows], qkv.weight[:d], None if bias is None else bias[:d])
        k = nn.functional.linear(y, qkv.weight[d : 2 * d], None if bias is None else bias[d : 2 * d])
        return q, k

    def feed(self, vision: VisionStates, selection: Selection, batch: Batch, atp: AtpConfig) -> LmPrompt:
        model = self.model
        kept, key_mask = gather_with_prefix(vision.tokens, selection, prefix=1)  # (B, 1+K, Dv), (B, 1+K)
        query_tokens = model.query_tokens.expand(kept.shape[0], -1, -1)
        query_output = model.qformer(
            query_embeds=query_tokens, encoder_hidden_states=kept, encoder_attention_mask=key_mask
        ).last_hidden_state  # (B, num_query_tokens, Hq), fp32
        lm_inputs = model.language_projection(query_output.to(vision.tokens.dtype))  # (B, nq, D_lm)
        input_ids = batch.inputs["input_ids"]
        embeds = model.get_input_embeddings()(input_ids)  # (B, T, D_lm)
        image_slots = (input_ids == model.config.image_token_index).unsqueeze(-1)
        embeds = embeds.masked_scatter(image_slots, lm_inputs.to(embeds.dtype))
        kwargs = {"inputs_embeds": embeds, "attention_mask": batch.inputs["attention_mask"]}
        if not model.language_model.config.is_encoder_decoder:
            kwargs["input_ids"] = input_ids  # what the stock generate passes too
        nq = model.config.num_query_tokens
        text_tokens = [int(n) - nq for n in batch.inputs["attention_mask"].sum(dim=1).tolist()]
        keys = [int(k) + 1 for k in selection.lengths.tolist()]
        return LmPrompt(kwargs, int(input_ids.shape[1]), text_tokens, keys)

    @property
    def generator(self):
        return self.model.language_model.generate

    def new_tokens(self, out: Tensor, input_len: int) -> list[list[int]]:
        lm = self.model.language_model
        new = out[:, 1:] if lm.config.is_encoder_decoder else out[:, input_len:]  # enc-dec: drop decoder start
        return trim_after_eos(new, lm.generation_config.eos_token_id)

    # ------------------------------------------------------------------ cost model

    def flops(self, kept: list[int], prompt: LmPrompt) -> dict[str, float]:
        return blip2_costs(self.model.config, prompt.text_tokens, prompt.consumer_tokens)


def qformer_flops(config, num_keys: int) -> float:
    """Q-Former + language projection FLOPs for one image whose cross-attention sees ``num_keys`` keys."""
    q = config.qformer_config
    nq, h, dv = config.num_query_tokens, q.hidden_size, config.vision_config.hidden_size
    total = 0.0
    for layer in range(q.num_hidden_layers):
        total += attention_flops(nq, nq, h, h, h, h) + 4 * nq * h * q.intermediate_size
        if layer % q.cross_attention_frequency == 0:
            total += attention_flops(nq, num_keys, h, dv, h, h)
    return total + 2 * nq * h * config.text_config.hidden_size


def blip2_costs(config, text_tokens: list[int], qformer_keys: list[int]) -> dict[str, float]:
    """Per-image FLOPs of BLIP-2's Q-Former (``projector``) and LLM prefill (batch mean) from its config.

    The Q-Former's cross-attention is the only stage pruning shrinks (``projector_keep_all``: without
    pruning); ``llm_prefill`` is the same with and without ATP because the LLM always gets
    ``num_query_tokens`` tokens. No weights needed.
    """
    nq = config.num_query_tokens
    side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
    dims = lm_dims(config.text_config)
    return {
        "projector": float(np.mean([qformer_flops(config, k) for k in qformer_keys])),
        "projector_keep_all": qformer_flops(config, side * side + 1),
        "llm_prefill": float(np.mean([decoder_prefill_flops(t + nq, **dims) for t in text_tokens])),
        "llm_tokens": float(np.mean([t + nq for t in text_tokens])),
    }


__all__ = ["Blip2Backend", "blip2_costs", "qformer_flops"]
