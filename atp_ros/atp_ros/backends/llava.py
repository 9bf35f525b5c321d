"""LLaVA behind ATP on HF transformers: CLIP towers (llava-1.5) and SigLIP towers (llava-interleave).

The LLaVA adapter of :class:`atp_ros.backends.pipeline.VlmBackend` (the flow lives there)::

    preprocess  HF processor: pixel_values, input_ids (N <image> placeholders per image)
    encode      frozen vision tower, one SDPA forward with output_hidden_states: feature-layer
                states (the projector's input), the score layer's input, the last layer
    feed        projector(kept patches only) -> (K, D_llm) per image; the placeholder run shortened
                N -> K (input_ids, attention mask, positions; left padded); the projected tokens
                go in through LlavaModel's ``mm_encoder_outputs``

Signals and the choices behind them:

* ``S_intra`` on a CLIP tower (``intra_signal="cls"``): CLS attention of the *score layer*, by
  default the encoder layer that produces the VLM's feature layer (llava-1.5: ``vision_feature_layer
  = -2`` is the output of encoder layer ``L-2``, so its attention is the one that formed the features
  the LLM sees). That layer's CLS query and keys are recomputed from its input hidden state with its
  own ``layer_norm1`` and ``q_proj``/``k_proj`` (:meth:`VlmBackend.score_qk`); :func:`atp.cls_attention`
  then computes one query row per head. The ViT never switches to eager attention or ``output_attentions``.
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
* Matching text tower: :func:`atp_ros.backends.loading.find_text_tower` (the rule of every family);
  without one, a load note says so, every result that asked for ``alpha > 0`` carries a note, and
  ``alpha_used`` is 0. Text embeddings are cached per question (:class:`atp.TextEmbeddingCache`).
* With ``vision_feature_select_strategy="full"`` on a CLS tower, the CLS token stays a visual token
  fed to the LLM: it is always kept (``prefix`` 1), and selection runs over the patch grid only.

With ATP disabled (or ``K = N``) the generated tokens are identical to stock ``model.generate``
(:meth:`LlavaBackend.reference_generate`); the tests check it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from atp_ros.backends.flops import decoder_prefill_flops, lm_dims
from atp_ros.backends.partial import WHOLE_TOWER_ABOVE, TowerReuse, encode_rows, rows_to_recompute
from atp_ros.backends.pipeline import VlmBackend
from atp_ros.backends.stages import Batch, LmPrompt, VisionStates
from atp_ros.backends.text_towers import dense_states, head_probe_attention, load_joint_space
from atp_ros.backends.views import processor_view
from atp_ros.method import AtpConfig, Selection

TOWER_KINDS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}


class LlavaBackend(VlmBackend):
    """ATP-gated ``LlavaForConditionalGeneration`` (CLIP or SigLIP tower). Build with :meth:`from_pretrained`."""

    family = "llava"
    hf_class = "LlavaForConditionalGeneration"

    def __init__(self, model, processor, model_id: str, text_tower, score_layer: int | None = None) -> None:
        cfg = model.config
        vcfg = cfg.vision_config
        self.tower_kind = self.joint_space_of(model)[2]  # ValueError for a tower that is neither CLIP nor SigLIP
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.image_token_id = int(cfg.image_token_id)
        self.feature_layer = cfg.vision_feature_layer
        self.select_strategy = cfg.vision_feature_select_strategy
        self.num_layers = int(vcfg.num_hidden_layers)
        has_cls = hasattr(self.tower.embeddings, "class_embedding")
        # CLS reaches the LLM only with the "full" strategy; it is then always kept.
        cls_fed = int(has_cls and self.select_strategy != "default")
        last_feature = self.feature_layer if isinstance(self.feature_layer, int) else self.feature_layer[-1]
        index = self._default_score_layer(last_feature) if score_layer is None else int(score_layer)
        if not 0 <= index < self.num_layers:
            raise ValueError(f"score_layer {index} out of range for a {self.num_layers}-layer tower")
        layer = self.tower.encoder.layers[index]
        if not (hasattr(layer.self_attn, "q_proj") and hasattr(layer.self_attn, "k_proj")):
            raise ValueError(f"{type(layer.self_attn).__name__} has no q_proj/k_proj to score with")
        super().__init__(
            model.eval(), processor, model_id, model.device, model.dtype, vcfg, layer, index, text_tower,
            has_cls=has_cls, prefix=cls_fed,
        )  # fmt: skip
        if model.generation_config.pad_token_id is None and self.tokenizer.pad_token_id is not None:
            # Else generate() warns on every call (once per frame in the node).
            model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        self.num_feature_tokens = self.num_visual_tokens + self.prefix  # <image> placeholders per prompt
        # SigLIP probe: the VLM tower's own head if it kept one, else the matching checkpoint's.
        self._probe_source = ""
        if self.tower_kind == "siglip":
            if getattr(self.tower, "use_head", False):
                self._probe_source = "vlm"
            elif self.joint is not None and self.joint.has_probe:
                self._probe_source = "joint"

    def _default_score_layer(self, feature_layer: int) -> int:
        """Encoder layer whose output is ``hidden_states[feature_layer]`` (index 0 = embeddings -> layer 0)."""
        index = feature_layer % (self.num_layers + 1)
        return max(index - 1, 0)

    # ------------------------------------------------------------------ the seam

    @classmethod
    def joint_space_of(cls, model):
        # The CLIP / SigLIP model the tower came from; a space of the other kind cannot read it.
        vcfg = model.config.vision_config
        kind = TOWER_KINDS.get(vcfg.model_type, "")
        if not kind:
            raise ValueError(f"vision tower {vcfg.model_type!r} is not supported (supported: {sorted(TOWER_KINDS)})")
        return load_joint_space, int(vcfg.hidden_size), kind

    def questions(self, images: Sequence[np.ndarray], questions: Sequence[str] | str) -> list[str]:
        # A literal image token in a question would add placeholders the tower never fills.
        image_token = self.processor.image_token
        return [q.replace(image_token, " ").strip() for q in super().questions(images, questions)]

    def _prompt(self, question: str) -> str:
        if getattr(self.processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return f"USER: {self.processor.image_token}\n{question} ASSISTANT:"

    def preprocess(self, images: list[np.ndarray], questions: list[str]) -> Batch:
        pil = [Image.fromarray(img) for img in images]
        enc = self.processor(images=pil, text=[self._prompt(q) for q in questions], return_tensors="pt", padding=True)
        # input_ids / attention_mask stay on the CPU: _shorten edits them there without a GPU sync per sample.
        pixel_values = enc["pixel_values"].to(self.device, self.dtype)
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "pixel_values": pixel_values}
        views = [processor_view(self.processor.image_processor, *img.shape[:2]) for img in images]
        return Batch(pixel_values, inputs, views)

    supports_token_reuse = True

    def encode(self, batch: Batch) -> VisionStates:
        out = self.tower(batch.pixel_values, output_hidden_states=True, return_dict=True)
        return self._states(out.hidden_states)

    def encode_reusing(self, batch: Batch, tower: TowerReuse) -> VisionStates:
        if tower.states is None or tower.changed is None:
            return self.encode(batch)
        changed = torch.as_tensor(np.asarray(tower.changed, dtype=bool))
        if float(changed.float().mean()) > WHOLE_TOWER_ABOVE:  # a busy frame: the stock forward is cheaper
            return self.encode(batch)  # recomputed None: the whole tower ran
        rows = rows_to_recompute(changed, self.has_cls)
        hs, kv = encode_rows(self.tower, batch.pixel_values, tower.states, rows, tower.variant, tower.kv)
        states = self._states(hs, recomputed=int(changed.sum()))
        states.meta["kv"] = kv
        return states

    def _states(self, hs: tuple[Tensor, ...], recomputed: int | None = None) -> VisionStates:
        """VisionStates from the tower's ``hidden_states`` ((L+1) x (B, T, D): hs[i] is the input of layer i)."""
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        # Exactly LlavaModel.get_image_features' selection, so K = N reproduces stock features.
        pool = [hs[i][:, 1:] if self.select_strategy == "default" else hs[i] for i in layers]
        features = pool[0] if len(pool) == 1 else torch.cat(pool, dim=-1)  # (B, prefix+N, D_feat)
        meta = {"hidden_states": tuple(hs), "recomputed": recomputed}
        return VisionStates(
            tokens=features, score_input=hs[self.score_layer], last=hs[-1], last_input=hs[-2], meta=meta
        )

    def intra_scores(self, vision: VisionStates, signal: str, notes: list[str]) -> tuple[Tensor, str]:
        # SigLIP has no CLS: its pooling head's probe plays that part (on post_layernorm'd last states).
        if signal == "cls" and self._probe_source == "vlm":
            return head_probe_attention(self.tower.head, self.tower.post_layernorm(vision.last)), "probe"
        if signal == "cls" and self._probe_source == "joint":
            return self.joint.probe_attention(vision.last), "probe"
        return super().intra_scores(vision, signal, notes)

    def joint_patches(self, vision: VisionStates, readout: str, notes: list[str]) -> tuple[Tensor, str]:
        states = vision.last  # (B, L, D) naive: the raw last-layer states
        if readout != "naive":
            # The joint space's vision tower is the VLM's (llava-1.5 / CLIP-L-336, warehouse-tiny),
            # so the VLM tower's last layer is the one the read-out modifies.
            states = dense_states(self.tower.encoder.layers[-1], vision.last_input, readout)
        return states[:, int(self.has_cls) :], readout

    def feed(self, vision: VisionStates, selection: Selection, batch: Batch, atp: AtpConfig) -> LmPrompt:
        feats = self._project(vision.tokens, selection)  # B x (prefix + K_b, D_llm)
        kept = [int(f.shape[0]) for f in feats]
        original = selection if atp.positions == "original" else None
        ids, mask, positions, text_tokens = self._shorten(
            batch.inputs["input_ids"], batch.inputs["attention_mask"], kept, original
        )
        kwargs = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=feats)},
        }
        return LmPrompt(kwargs, int(ids.shape[1]), text_tokens, kept)

    def _project(self, features: Tensor, sel: Selection) -> list[Tensor]:
        """Projector on the kept tokens only: list of ``(prefix + K_b, D_llm)``."""
        cls_tok = features[:, : self.prefix]  # (B, 0|1, D_feat)
        patches = features[:, self.prefix :]  # (B, N, D_feat)
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
                patches = kept_idx[b, : kept_len[b]] + self.prefix  # offsets inside the unpruned run
                run = torch.cat([torch.arange(self.prefix), patches]) + start
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

    # ------------------------------------------------------------------ accounting

    def flops(self, kept: list[int], prompt: LmPrompt) -> dict[str, float]:
        return llava_costs(self.model.config, prompt.text_tokens, prompt.consumer_tokens)


def llava_costs(config, text_tokens: list[int], image_tokens: list[int]) -> dict[str, float]:
    """Per-image FLOPs of LLaVA's projector and LLM prefill (batch mean) from its config alone.

    ``image_tokens[b]``: visual tokens the LLM gets (K, plus CLS with the ``full`` strategy).
    ``llm_prefill_unpruned`` is the prefill with every visual token; ``llm_tokens`` the mean
    sequence length the LLM attends over (what its KV cache holds). No weights needed.
    """
    v, t = config.vision_config, config.text_config
    layers = config.vision_feature_layer
    n_layers = 1 if isinstance(layers, int) else len(layers)
    side = int(v.image_size) // int(v.patch_size)
    cls_fed = int(v.model_type == "clip_vision_model" and config.vision_feature_select_strategy != "default")
    all_tokens = side * side + cls_fed
    dims = lm_dims(t)
    d_feat, d_text = int(v.hidden_size) * n_layers, int(t.hidden_size)
    per_token = 2.0 * (d_feat * d_text + d_text * d_text)  # linear_1, linear_2
    b = len(image_tokens)
    pairs = list(zip(text_tokens, image_tokens, strict=True))
    return {
        "projector": per_token * sum(image_tokens) / b,
        "llm_prefill": sum(decoder_prefill_flops(tt + k, **dims) for tt, k in pairs) / b,
        "llm_prefill_unpruned": sum(decoder_prefill_flops(tt + all_tokens, **dims) for tt in text_tokens) / b,
        "llm_tokens": sum(tt + k for tt, k in pairs) / b,
    }


__all__ = ["TOWER_KINDS", "LlavaBackend", "llava_costs"]
