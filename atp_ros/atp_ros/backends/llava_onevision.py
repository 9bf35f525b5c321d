"""LLaVA-OneVision behind ATP: prune the anyres grid's LLM tokens, keep the base crop and every newline.

The LLaVA-OneVision adapter of :class:`atp_ros.backends.pipeline.VlmBackend`::

    preprocess  LlavaOnevisionProcessor: a base crop plus the crops of the best grid of
                ``image_grid_pinpoints``; the ``<image>`` run counts the base crop's tokens, the grid's
                tokens after unpadding (and bilinear pooling beyond ``anyres_max_9``) and one newline per
                grid row (64 + 192 + 12 = 268 for a 40x50 frame on the tiny model)
    encode      the SigLIP tower once over every crop (output_hidden_states), the projector, and the
                model's own ``pack_image_features``: the stock packed sequence. The same function packs a
                marker (0 per token, 1 per newline) to find the layout, and packs per-patch scores and
                states, so scores are unpadded and pooled exactly as the features are
    scoring     on the packed grid (H' x W' in raster order over the frame, which unpadding makes the grid
                cover exactly): S_intra = the given SigLIP tower's pooling-head probe per crop (else received
                attention, noted), S_inter = its joint space on the packed last-layer states
    feed        the packed sequence minus the pruned grid tokens: the base crop and every newline stay;
                the ``<image>`` run shortened to match; 1-D positions ``compact`` or ``original``

The base crop is the model's view of the whole frame at crop resolution; like SmolVLM's global tile it
always reaches the LLM and is not counted in N or K (``consumer_tokens`` has it and the newlines). The
SigLIP tower was trained inside LLaVA-OneVision: the SigLIP text tower and probe are the checkpoint's it
started from, an approximation (load note).

:class:`LlavaNextBackend` (LLaVA-NeXT / 1.6) is the same adapter on CLIP crops: each crop has its own CLS, so
S_intra is each crop's CLS attention at the feature layer's block, and the CLIP it came from is its joint space.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from atp_ros.backends.flops import decoder_prefill_flops, lm_dims, scoring_flops
from atp_ros.backends.pipeline import VlmBackend
from atp_ros.backends.results import PixelBox
from atp_ros.backends.stages import Batch, LmPrompt, VisionStates
from atp_ros.backends.text_towers import load_joint_space
from atp_ros.method import AtpConfig, Selection


@dataclass(frozen=True)
class PackedPrompt(LmPrompt):
    """:class:`LmPrompt` plus each image's crops and unpruned packed length."""

    crops: list[int] = field(default_factory=list)
    packed: list[int] = field(default_factory=list)


class LlavaOnevisionBackend(VlmBackend):
    """ATP-gated ``LlavaOnevisionForConditionalGeneration`` (SigLIP tower). Build with :meth:`from_pretrained`."""

    family = "llava_onevision"
    hf_class = "LlavaOnevisionForConditionalGeneration"
    intra_only = "intra-only (S_intra alone)"
    tower_kind, strategy = "siglip", "full"  # LLaVA-NeXT: CLIP crops with a CLS each, "default" (CLS dropped)

    def __init__(self, model, processor, model_id: str, text_tower, score_layer: int | None = None) -> None:
        cfg = model.config
        vcfg = cfg.vision_config
        self.joint_space_of(model)  # ValueError for a tower that is not SigLIP
        self.vlm = model.model
        self.tower = model.model.vision_tower
        self.feature_layer = cfg.vision_feature_layer
        if cfg.vision_feature_select_strategy != self.strategy:
            raise ValueError(f"only the {self.strategy!r} feature strategy is supported for {self.family}")
        layers = getattr(self.tower, "vision_model", self.tower).encoder.layers
        last = self.feature_layer if isinstance(self.feature_layer, int) else self.feature_layer[-1]
        # The encoder layer whose output is the feature layer (as llava.py): its attention formed the features.
        index = max(last % (len(layers) + 1) - 1, 0) if score_layer is None else int(score_layer)
        if not 0 <= index < len(layers):
            raise ValueError(f"score_layer {index} out of range for a {len(layers)}-layer tower")
        notes = [
            f"{self.family}: K counts the anyres grid's LLM tokens after unpadding (and pooling); the base crop "
            "and the newline of every grid row always reach the LLM",
        ]
        if text_tower.joint is not None and self.tower_kind == "siglip":
            notes.append(
                f"{self.family}: S_inter and the probe come from {text_tower.source}, the SigLIP the tower was "
                "trained from: an approximation"
            )
        has_cls = hasattr(getattr(self.tower, "vision_model", self.tower).embeddings, "class_embedding")
        super().__init__(
            model.eval(), processor, model_id, model.device, model.dtype, vcfg, layers[index], index, text_tower,
            has_cls=has_cls, prefix=0, load_notes=notes,
        )  # fmt: skip
        self.side = int(vcfg.image_size) // int(vcfg.patch_size)
        self.grid = None  # the grid follows the frame
        self.num_visual_tokens = 9 * self.side * self.side  # anyres_max_9: at most about 9 crops after pooling
        self.image_token_id = int(getattr(cfg, "image_token_id", None) or cfg.image_token_index)
        if model.generation_config.pad_token_id is None and self.tokenizer.pad_token_id is not None:
            model.generation_config.pad_token_id = self.tokenizer.pad_token_id

    # ------------------------------------------------------------------ the seam

    @classmethod
    def joint_space_of(cls, model):
        vcfg = model.config.vision_config
        if vcfg.model_type != f"{cls.tower_kind}_vision_model":
            raise ValueError(f"vision tower {vcfg.model_type!r} is not supported ({cls.family}: {cls.tower_kind})")
        return load_joint_space, int(vcfg.hidden_size), cls.tower_kind

    def questions(self, images: Sequence[np.ndarray], questions: Sequence[str] | str) -> list[str]:
        return [q.replace("<image>", " ").replace("<video>", " ").strip() for q in super().questions(images, questions)]

    def _prompt(self, question: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def preprocess(self, images: list[np.ndarray], questions: list[str]) -> Batch:
        pil = [Image.fromarray(img) for img in images]
        enc = self.processor(images=pil, text=[self._prompt(q) for q in questions], return_tensors="pt", padding=True)
        pixel_values = enc["pixel_values"].to(self.device, self.dtype)  # (B, crops, 3, S, S), padded crops
        inputs = {k: v for k, v in enc.items() if k != "pixel_values"} | {"pixel_values": pixel_values}
        # Anyres resizes and pads the frame onto the crops; unpadding removes the pad again, so the packed
        # grid covers exactly the frame.
        views = [PixelBox(0.0, 0.0, float(img.shape[1]), float(img.shape[0])) for img in images]
        return Batch(pixel_values, inputs, views)

    def _pack(self, per_crop: list[Tensor], sizes: Tensor, newline: Tensor | None) -> list[Tensor]:
        """The model's own packing (unpad, pool, newlines) of per-crop ``(crops, P, C)`` values."""
        packed, _ = self.vlm.pack_image_features(
            per_crop, sizes, image_newline=newline, vision_aspect_ratio=self.model.config.vision_aspect_ratio
        )
        return list(packed)

    def encode(self, batch: Batch) -> VisionStates:
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        cfg = self.model.config
        sizes = batch.inputs["image_sizes"]
        crops = [
            image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in sizes.tolist()
        ]
        pv = batch.pixel_values
        tiles = torch.cat([pv[b, :n] for b, n in enumerate(crops)])
        out = self.tower(tiles, output_hidden_states=True, return_dict=True)
        hs = out.hidden_states
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        selected = torch.cat([hs[i] for i in layers], dim=-1)
        if self.strategy == "default":
            selected = selected[:, 1:]  # CLS dropped, as the model's get_image_features does
        features = list(self.vlm.multi_modal_projector(selected).split(crops))
        packed = self._pack(features, sizes, self.vlm.image_newline)  # the stock packed sequence per image
        p = self.side * self.side
        marks = self._pack([torch.zeros(n, p, 1, device=tiles.device) for n in crops], sizes, torch.ones(1).to(tiles))
        layouts = []  # per image: (prunable offsets in the packed sequence, grid (h, w))
        for mark in marks:
            newline = mark[:, 0] > 0.5
            rows = int(newline.sum())
            if len(mark) == p + 1:  # one crop: the base alone, then one newline: the base is the grid
                offsets, grid = torch.arange(p), (self.side, self.side)
            else:
                width = (len(mark) - p - rows) // rows
                offsets = p + (torch.arange(rows)[:, None] * (width + 1) + torch.arange(width)[None]).flatten()
                grid = (rows, width)
            layouts.append((offsets, grid))
        meta = {"crops": crops, "sizes": sizes, "packed": packed, "layouts": layouts}
        tokens = _pad_rows([f[o.to(f.device)] for f, (o, _) in zip(packed, layouts, strict=True)])
        return VisionStates(
            tokens=tokens, score_input=hs[self.score_layer], last=hs[-1], grids=[g for _, g in layouts], meta=meta
        )

    def _on_grid(self, per_patch: Tensor, meta: dict) -> Tensor:
        """Per-crop per-patch values ``(crops, P, C)`` -> ``(B, max N_b, C)`` on each image's packed grid."""
        parts = list(per_patch.split(meta["crops"]))
        packed = self._pack(parts, meta["sizes"], None)  # no newlines: base, then the grid rows
        p = self.side * self.side
        return _pad_rows([x if len(x) == p else x[p:] for x in packed])  # one crop: the base is the grid

    def intra_scores(self, vision: VisionStates, signal: str, notes: list[str]) -> tuple[Tensor, str]:
        if self.has_cls:  # LLaVA-NeXT: every crop has its own CLS (per-crop CLS or received attention)
            per_patch, used = super().intra_scores(vision, signal, notes)
            return self._on_grid(per_patch.float()[..., None], vision.meta)[..., 0], used
        if signal == "cls" and self.joint is not None and self.joint.has_probe:
            per_patch, used = self.joint.probe_attention(vision.last), "probe"  # (crops, P)
        else:
            if signal == "cls":
                notes.append(f"{self.model_id}: no pooling head to probe with: S_intra uses received attention")
            per_patch, used = super().intra_scores(vision, "received", [])
        return self._on_grid(per_patch.float()[..., None], vision.meta)[..., 0], used

    def joint_patches(self, vision: VisionStates, readout: str, notes: list[str]) -> tuple[Tensor, str]:
        if readout != "naive":
            notes.append(f"inter_readout {readout!r} is implemented for LLaVA towers only: naive used")
        return self._on_grid(vision.last[:, int(self.has_cls) :], vision.meta), "naive"

    def feed(self, vision: VisionStates, selection: Selection, batch: Batch, atp: AtpConfig) -> LmPrompt:
        ids, mask = batch.inputs["input_ids"].cpu(), batch.inputs["attention_mask"].cpu()
        kept_idx, kept_len = selection.indices.cpu(), selection.lengths.cpu().tolist()
        rows, pos_rows, feats, text_tokens, consumer = [], [], [], [], []
        for b in range(ids.shape[0]):
            row = ids[b][mask[b].bool()]
            where = (row == self.image_token_id).nonzero().flatten()
            packed = vision.meta["packed"][b]
            offsets, _ = vision.meta["layouts"][b]
            if len(where) != len(packed) or int(where[-1] - where[0]) + 1 != len(where):
                raise RuntimeError(f"sample {b}: expected one run of {len(packed)} image tokens, found {len(where)}")
            keep_packed = torch.ones(len(packed), dtype=torch.bool)
            keep_packed[offsets] = False
            keep_packed[offsets[kept_idx[b, : kept_len[b]]]] = True
            keep = torch.ones(len(row), dtype=torch.bool)
            keep[where] = keep_packed
            rows.append(row[keep])
            pos_rows.append(torch.arange(len(row))[keep])
            feats.append(packed[keep_packed.to(packed.device)])
            text_tokens.append(len(row) - len(where))
            consumer.append(int(keep_packed.sum()))
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        new_ids = ids.new_full((len(rows), length), pad)
        new_mask = mask.new_zeros((len(rows), length))
        for b, r in enumerate(rows):
            new_ids[b, length - len(r) :] = r
            new_mask[b, length - len(r) :] = 1
        positions = (new_mask.long().cumsum(-1) - 1).masked_fill(new_mask == 0, 0)
        if atp.positions == "original":
            for b, p in enumerate(pos_rows):
                positions[b, length - len(p) :] = p
        kwargs = {
            "input_ids": new_ids.to(self.device),
            "attention_mask": new_mask.to(self.device),
            "position_ids": positions.to(self.device),
            "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=feats)},
        }
        packed_lens = [len(p) for p in vision.meta["packed"]]
        return PackedPrompt(
            kwargs, int(length), text_tokens, consumer, crops=list(vision.meta["crops"]), packed=packed_lens
        )

    # ------------------------------------------------------------------ accounting

    def vision_cost(self, vision: VisionStates) -> float:
        crops = vision.meta["crops"]
        return self.vision_flops * sum(crops) / len(crops)  # one tower pass per crop

    def scoring_cost(self, vision: VisionStates, intra_signal: str, joint_used: bool) -> float:
        p = self.side * self.side
        costs = []
        for crops, (h, w) in zip(vision.meta["crops"], vision.grids, strict=True):
            cost = crops * scoring_flops(p, False, self.vision_hidden, intra_signal) if intra_signal else 0.0
            if joint_used and intra_signal:
                cost += self.joint.joint_flops(h * w) + 2.0 * h * w * self.joint.embed_dim
            costs.append(cost)
        return sum(costs) / len(costs)

    def flops(self, kept: list[int], prompt: LmPrompt) -> dict[str, float]:
        crops = prompt.crops if isinstance(prompt, PackedPrompt) else [1] * len(kept)
        packed = prompt.packed if isinstance(prompt, PackedPrompt) else prompt.consumer_tokens
        return onevision_costs(self.model.config, prompt.text_tokens, prompt.consumer_tokens, crops, packed)


def _pad_rows(rows: Sequence[Tensor]) -> Tensor:
    """Per-image ``(N_b, ...)`` tensors -> ``(B, max N_b, ...)``, zero padded after ``N_b``."""
    n_max = max(int(r.shape[0]) for r in rows)
    out = rows[0].new_zeros((len(rows), n_max, *rows[0].shape[1:]))
    for b, r in enumerate(rows):
        out[b, : r.shape[0]] = r
    return out


def onevision_costs(
    config, text_tokens: list[int], image_tokens: list[int], crops: list[int], packed: list[int]
) -> dict[str, float]:
    """Per-image FLOPs (batch mean) of LLaVA-OneVision's projector (on every crop's patches, before packing)
    and LLM prefill; ``image_tokens[b]``: what the LLM got (kept grid + base + newlines); ``packed[b]``: unpruned."""
    v, t = config.vision_config, config.text_config
    p = (int(v.image_size) // int(v.patch_size)) ** 2
    d_v, d = int(v.hidden_size), int(t.hidden_size)
    dims = lm_dims(t)
    b = len(image_tokens)
    pairs = list(zip(text_tokens, image_tokens, strict=True))
    return {
        "projector": sum(2.0 * n * p * (d_v * d + d * d) for n in crops) / b,
        "llm_prefill": sum(decoder_prefill_flops(tt + k, **dims) for tt, k in pairs) / b,
        "llm_prefill_unpruned": sum(
            decoder_prefill_flops(tt + n, **dims) for tt, n in zip(text_tokens, packed, strict=True)
        )
        / b,
        "llm_tokens": sum(tt + k for tt, k in pairs) / b,
    }


class LlavaNextBackend(LlavaOnevisionBackend):
    """ATP-gated ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / 1.6): CLIP crops with a CLS each, the
    ``default`` strategy (CLS dropped), the same base + unpadded grid + newline layout (no pooling)."""

    family = "llava_next"
    hf_class = "LlavaNextForConditionalGeneration"
    tower_kind, strategy = "clip", "default"

    def __init__(self, model, processor, model_id: str, text_tower, score_layer: int | None = None) -> None:
        super().__init__(model, processor, model_id, text_tower, score_layer)
        size = int(model.config.vision_config.image_size)
        crops = max(h * w for h, w in model.config.image_grid_pinpoints) // (size * size)
        self.num_visual_tokens = crops * self.side * self.side  # at most: the largest grid, no pooling

    def _pack(self, per_crop: list[Tensor], sizes: Tensor, newline: Tensor | None) -> list[Tensor]:
        packed, _ = self.vlm.pack_image_features(per_crop, sizes, self.strategy, image_newline=newline)
        return list(packed)


__all__ = ["LlavaNextBackend", "LlavaOnevisionBackend", "onevision_costs"]
