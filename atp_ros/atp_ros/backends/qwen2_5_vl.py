"""Qwen2.5-VL behind ATP: score and prune whole LLM tokens (2x2 merge groups) of a per-frame token grid.

The Qwen2.5-VL adapter of :class:`atp_ros.backends.pipeline.VlmBackend`::

    preprocess  Qwen2_5_VLProcessor: flattened patches (sum L_b, 3*2*p*p) described by image_grid_thw,
                input_ids with N_b = h_b*w_b/4 <|image_pad|> per image between <|vision_start|> and
                <|vision_end|>; the grid follows the frame (smart_resize), so N_b varies per image
    encode      the tower once (window attention, SDPA) with output_hidden_states; the merger's output
                (one D_llm token per 2x2 group, raster order) is what the LLM would get; the block states
                are un-permuted from the window order back to the processor's patch order
    scoring     S_intra: attention each patch *receives* at a full-attention block (default: the last),
                recomputed from that block's input with its own norm1, q/k weights and 2-D rotary
                embedding, per image (the block attends within one image), in chunks of query rows;
                then averaged over each 2x2 merge group -> one score per LLM token.
                S_inter: only with a text tower that is given (none matches Qwen2.5-VL's ViT): the last
                block's states averaged per group, read out by that CLIP/SigLIP space -- an approximation
    feed        kept merged tokens only (ascending, raster order) as ``mm_encoder_outputs``; each run of
                <|image_pad|> shortened N_b -> K_b (<|vision_start|>/<|vision_end|> untouched); M-RoPE
                positions of the *unpruned* prompt from the model's own ``get_rope_index``, the kept
                columns kept, passed explicitly as (4, B, T) (row 0: text positions as generate makes
                them, rows 1-3: temporal/height/width), so decoding continues from the original
                positions (generate appends last + 1 per row, as it does for stock Qwen2.5-VL)

Choices and limits:

* No CLS and no pooling head: ``intra_signal="cls"`` means received attention for this family (said once
  in the load notes, not per call). A window-attention block is refused as score layer: its attention
  never leaves a 112-px window, so "received" would only rank patches within their window.
* Positions: M-RoPE keeps a token's place in the frame in its height/width rows, so only ``original``
  positions exist; ``positions="compact"`` runs as ``original`` with a note.
* Qwen3-VL is not the same seam: its tower feeds DeepStack features into several LLM layers at the
  visual positions (those would have to be pruned with the same columns) and has no window
  attention; it is not supported here.

With ATP disabled (or K = N) the LLM gets exactly what stock ``generate`` gives it (ids, embeddings,
positions), so the tokens are identical; batch rows are independent (budgets and normalization per image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling

from atp_ros.backends.flops import decoder_prefill_flops, lm_dims, scoring_flops
from atp_ros.backends.pipeline import VlmBackend
from atp_ros.backends.results import PixelBox
from atp_ros.backends.stages import Batch, LmPrompt, VisionStates
from atp_ros.backends.text_towers import load_joint_space
from atp_ros.method import AtpConfig, Selection

STRUCTURAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
QUERY_CHUNK = 1024  # query rows per step of the received-attention map: memory O(chunk x L) per head


@dataclass(frozen=True)
class QwenPrompt(LmPrompt):
    """:class:`LmPrompt` plus each image's unpruned token count (for ``llm_prefill_unpruned``)."""

    visual_totals: list[int] = field(default_factory=list)


class Qwen25VLBackend(VlmBackend):
    """ATP-gated ``Qwen2_5_VLForConditionalGeneration``. Build with :meth:`from_pretrained`."""

    family = "qwen2_5_vl"
    hf_class = "Qwen2_5_VLForConditionalGeneration"
    intra_only = "intra-only (S_intra alone)"

    def __init__(self, model, processor, model_id: str, text_tower, score_layer: int | None = None) -> None:
        cfg = model.config
        vcfg = cfg.vision_config
        self.visual = model.model.visual
        self.merge = int(vcfg.spatial_merge_size)
        self.unit = self.merge * self.merge  # patches per LLM token
        full = [int(i) for i in vcfg.fullatt_block_indexes]
        index = full[-1] if score_layer is None else int(score_layer)
        if index not in full:
            raise ValueError(
                f"score_layer {index} is not a full-attention block of the tower (those are {full}): "
                "a window block's attention never leaves its window"
            )
        self.image_token_id = int(cfg.image_token_id)
        notes = [
            f"Qwen2.5-VL: S_intra is the attention each patch receives at full-attention block {index} "
            f"(no CLS token), averaged over each {self.merge}x{self.merge} merge group: one score per LLM token",
            "Qwen2.5-VL: M-RoPE positions: kept tokens keep their original positions (positions=compact is not "
            "available for this family)",
        ]
        if text_tower.joint is not None:
            notes.append(
                f"Qwen2.5-VL: S_inter through {text_tower.source}, a text tower Qwen2.5-VL was not trained with "
                "(it has none): an approximation"
            )
        super().__init__(
            model.eval(), processor, model_id, model.device, model.dtype, vcfg, self.visual.blocks[index], index,
            text_tower, has_cls=False, prefix=0, load_notes=notes,
        )  # fmt: skip
        if self.joint is None:
            self.load_notes[0] += "; Qwen2.5-VL has no matching contrastive text tower (text_encoder_id may name one)"
        ip = processor.image_processor
        factor = int(ip.patch_size) * int(ip.merge_size)
        max_pixels = int(ip.size["longest_edge"])  # smart_resize's upper bound (the max_pixels setting)
        self.num_visual_tokens = max_pixels // (factor * factor)  # per-image maximum: the grid varies
        if model.generation_config.pad_token_id is None and self.tokenizer.pad_token_id is not None:
            model.generation_config.pad_token_id = self.tokenizer.pad_token_id

    # ------------------------------------------------------------------ the seam

    @classmethod
    def joint_space_of(cls, model):
        # No contrastive model shares Qwen2.5-VL's ViT: any CLIP/SigLIP space of its width may be given.
        return load_joint_space, int(model.config.vision_config.hidden_size), ""

    def questions(self, images: Sequence[np.ndarray], questions: Sequence[str] | str) -> list[str]:
        # A literal vision token in a question would add placeholders the tower never fills.
        cleaned = []
        for q in super().questions(images, questions):
            for token in STRUCTURAL_TOKENS:
                q = q.replace(token, " ")
            cleaned.append(q.strip())
        return cleaned

    def _prompt(self, question: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def preprocess(self, images: list[np.ndarray], questions: list[str]) -> Batch:
        pil = [Image.fromarray(img) for img in images]
        enc = self.processor(images=pil, text=[self._prompt(q) for q in questions], return_tensors="pt", padding=True)
        pixel_values = enc["pixel_values"].to(self.device, self.dtype)  # (sum L_b, 3 * t * p * p)
        # input_ids, mask and token types stay on the CPU: feed edits them there.
        inputs = {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "mm_token_type_ids": enc["mm_token_type_ids"],
            "pixel_values": pixel_values,
            "image_grid_thw": enc["image_grid_thw"],
        }
        # smart_resize scales the whole frame (no crop, no pad): the grid covers all of it.
        views = [PixelBox(0.0, 0.0, float(img.shape[1]), float(img.shape[0])) for img in images]
        return Batch(pixel_values, inputs, views)

    def encode(self, batch: Batch) -> VisionStates:
        from transformers.vision_utils import get_vision_window_index

        thw = batch.inputs["image_grid_thw"]  # (B, 3) on the CPU: patches per image (t, h, w)
        out = self.visual(batch.pixel_values, grid_thw=thw.to(self.device), output_hidden_states=True)
        hs = out.hidden_states  # (depth + 1) x (sum L_b, D): hs[i] is block i's input, in window order
        vcfg = self.visual.config
        window_index, _ = get_vision_window_index(thw, self.merge, vcfg.window_size, vcfg.patch_size)
        order = torch.argsort(window_index).to(self.device)  # window order -> the processor's group order

        def unwindow(x: Tensor) -> Tensor:
            return x.reshape(-1, self.unit, x.shape[-1])[order].reshape(x.shape)

        grids = [(int(h) // self.merge, int(w) // self.merge) for _, h, w in thw.tolist()]
        merged = out.pooler_output.split([h * w for h, w in grids])  # per image (N_b, D_llm), raster order
        tokens = _pad_rows(merged)  # (B, max N_b, D_llm)
        return VisionStates(
            tokens=tokens,
            score_input=unwindow(hs[self.score_layer]).unsqueeze(0),  # (1, sum L_b, D): packed
            last=unwindow(hs[-1]).unsqueeze(0),
            grids=grids,
        )

    def intra_scores(self, vision: VisionStates, signal: str, notes: list[str]) -> tuple[Tensor, str]:
        # No CLS, no probe: received attention whatever was asked (the load notes say so once).
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
        from transformers.vision_utils import get_vision_position_ids

        block = self._score
        heads, dim = self.score_heads, self.vision_hidden
        scores = []
        for (h, w), x in zip(vision.grids, self._per_image(vision.score_input[0], vision.grids), strict=True):
            thw = torch.tensor([[1, h * self.merge, w * self.merge]])
            pos = get_vision_position_ids(thw, self.merge).to(x.device)  # (L, 2), the processor's patch order
            cos, sin = self.visual.rotary_pos_emb(x, pos)
            # q and k only (the first 2D rows of the fused qkv projection): v is not needed.
            qk = F.linear(block.norm1(x), block.attn.qkv.weight[: 2 * dim], block.attn.qkv.bias[: 2 * dim])
            q, k = qk.reshape(x.shape[0], 2, heads, -1).unbind(1)  # (L, H, Dh) each
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            q, k = q.transpose(0, 1).float(), k.transpose(0, 1).float()  # (H, L, Dh)
            received = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
            for start in range(0, x.shape[0], QUERY_CHUNK):
                logits = torch.einsum("hqd,hkd->hqk", q[:, start : start + QUERY_CHUNK], k) * self.score_scale
                received += logits.softmax(dim=-1).sum(dim=(0, 1))
            received /= heads * x.shape[0]  # mean over heads and queries, as atp.received_attention
            scores.append(received.reshape(-1, self.unit).mean(dim=1))  # (N_b,): per 2x2 merge group
        return _pad_rows(scores), "received"

    def joint_patches(self, vision: VisionStates, readout: str, notes: list[str]) -> tuple[Tensor, str]:
        if readout != "naive":
            notes.append(f"inter_readout {readout!r} is implemented for LLaVA towers only: naive used")
        states = self._per_image(vision.last[0], vision.grids)
        groups = [x.reshape(-1, self.unit, x.shape[-1]).mean(dim=1) for x in states]  # (N_b, D_v) per image
        return _pad_rows(groups), "naive"  # last-block states averaged per merge group

    def feed(self, vision: VisionStates, selection: Selection, batch: Batch, atp: AtpConfig) -> LmPrompt:
        ids, mask = batch.inputs["input_ids"].cpu(), batch.inputs["attention_mask"].cpu()
        # The unpruned prompt's M-RoPE positions, from the model's own rope-index function.
        rope, _ = self.model.model.get_rope_index(
            ids,
            mm_token_type_ids=batch.inputs["mm_token_type_ids"].cpu(),
            image_grid_thw=batch.inputs["image_grid_thw"].cpu(),
            attention_mask=mask,
        )  # (3, B, T)
        kept_idx, kept_len = selection.indices.cpu(), selection.lengths.cpu().tolist()
        totals = [h * w for h, w in vision.grids]
        rows, pos_rows, feats, text_tokens = [], [], [], []
        for b in range(ids.shape[0]):
            real = mask[b].bool()
            row, pos = ids[b][real], rope[:, b][:, real]  # unpadded prompt and its (3, L) positions
            where = (row == self.image_token_id).nonzero().flatten()
            if len(where) != totals[b] or int(where[-1] - where[0]) + 1 != len(where):
                raise RuntimeError(f"sample {b}: expected one run of {totals[b]} image tokens, found {len(where)}")
            start, end = int(where[0]), int(where[-1]) + 1
            kept = kept_idx[b, : kept_len[b]]  # ascending offsets inside the run
            columns = torch.cat([torch.arange(start), kept + start, torch.arange(end, len(row))])
            rows.append(row[columns])
            pos_rows.append(pos[:, columns])
            feats.append(vision.tokens[b, kept.to(vision.tokens.device)])
            text_tokens.append(len(row) - len(where))
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        new_ids = ids.new_full((len(rows), length), pad)
        new_mask = mask.new_zeros((len(rows), length))
        mrope = rope.new_zeros((3, len(rows), length))  # get_rope_index leaves 0 on padding too
        for b, (r, p) in enumerate(zip(rows, pos_rows, strict=True)):
            new_ids[b, length - len(r) :] = r
            new_mask[b, length - len(r) :] = 1
            mrope[:, b, length - len(r) :] = p
        # Row 0: the text positions generate derives from the mask (Qwen2_5_VL's _prepare_position_ids_for_generation).
        text_pos = (new_mask.long().cumsum(-1) - 1).masked_fill(new_mask == 0, 0)
        positions = torch.cat([text_pos[None], mrope], dim=0)  # (4, B, T)
        kwargs = {
            "input_ids": new_ids.to(self.device),
            "attention_mask": new_mask.to(self.device),
            "position_ids": positions.to(self.device),
            "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=tuple(feats))},
        }
        notes = []
        if atp.positions == "compact":
            notes.append(f"{self.model_id}: M-RoPE: positions=compact is not available, original positions used")
        kept = [int(k) for k in kept_len]
        return QwenPrompt(kwargs, int(length), text_tokens, kept, notes=notes, visual_totals=totals)

    # ------------------------------------------------------------------ description and accounting

    @property
    def score_heads(self) -> int:
        return int(self._score.attn.num_heads)

    @property
    def score_scale(self) -> float:
        return float(self._score.attn.scaling)

    @property
    def vision_hidden(self) -> int:
        return int(self.visual.config.hidden_size)

    def _per_image(self, packed: Tensor, grids: list[tuple[int, int]]) -> tuple[Tensor, ...]:
        """Packed ``(sum L_b, D)`` tower states -> one ``(L_b, D)`` per image."""
        return packed.split([h * w * self.unit for h, w in grids])

    def vision_cost(self, vision: VisionStates) -> float:
        costs = [qwen_vision_flops(self.visual.config, (1, h * self.merge, w * self.merge)) for h, w in vision.grids]
        return sum(costs) / len(costs)

    def scoring_cost(self, vision: VisionStates, intra_signal: str, joint_used: bool) -> float:
        # S_intra runs on the patches (L_b = 4 N_b); the joint read-out and cosine on the N_b pooled tokens.
        def one(n: int) -> float:
            intra = scoring_flops(n * self.unit, False, self.vision_hidden, intra_signal) if intra_signal else 0.0
            if not (joint_used and intra_signal):
                return intra
            return intra + self.joint.joint_flops(n) + 2.0 * n * self.joint.embed_dim

        costs = [one(h * w) for h, w in vision.grids]
        return sum(costs) / len(costs)

    def flops(self, kept: list[int], prompt: LmPrompt) -> dict[str, float]:
        totals = prompt.visual_totals if isinstance(prompt, QwenPrompt) else prompt.consumer_tokens
        return qwen_costs(self.model.config, prompt.text_tokens, prompt.consumer_tokens, totals)


def _pad_rows(rows: Sequence[Tensor]) -> Tensor:
    """Per-image ``(N_b, ...)`` tensors -> ``(B, max N_b, ...)``, zero padded after ``N_b``."""
    n_max = max(int(r.shape[0]) for r in rows)
    out = rows[0].new_zeros((len(rows), n_max, *rows[0].shape[1:]))
    for b, r in enumerate(rows):
        out[b, : r.shape[0]] = r
    return out


def qwen_vision_flops(vision_config, grid_thw: tuple[int, int, int]) -> float:
    """Forward FLOPs of Qwen2.5-VL's tower for one image of ``grid_thw`` patches, merger included.

    Patch embedding (Conv3d), per block the fused qkv and output projections, the attention
    matmuls over each attention segment (full blocks: the image; window blocks: each window of
    ``window_size`` px), the gated MLP; then the 2x2 merger MLP. Normalizations and RoPE are elementwise.
    """
    from transformers.vision_utils import get_vision_window_index

    v = vision_config
    t, h, w = grid_thw
    length, d, m = t * h * w, int(v.hidden_size), int(v.spatial_merge_size)
    embed = 2.0 * length * d * int(v.in_channels) * int(v.temporal_patch_size) * int(v.patch_size) ** 2
    _, cu_window = get_vision_window_index(torch.tensor([grid_thw]), m, v.window_size, v.patch_size)
    windows = [int(s) for s in torch.diff(cu_window).tolist()]  # window blocks: one segment per window
    n_full = sum(1 for i in range(v.depth) if i in v.fullatt_block_indexes)  # full blocks: one per frame
    per_block = 2.0 * length * d * 3 * d + 2.0 * length * d * d + 2.0 * 3 * length * d * int(v.intermediate_size)
    mix = n_full * t * 4.0 * (h * w) ** 2 * d + (v.depth - n_full) * sum(4.0 * s * s * d for s in windows)
    wide = d * m * m
    merger = 2.0 * (length // (m * m)) * (wide * wide + wide * int(v.out_hidden_size))
    return embed + v.depth * per_block + mix + merger


def qwen_costs(config, text_tokens: list[int], image_tokens: list[int], totals: list[int]) -> dict[str, float]:
    """Per-image FLOPs of Qwen2.5-VL's LLM prefill (batch mean) from its config alone.

    ``image_tokens[b]``: kept LLM tokens of image ``b``; ``totals[b]``: its unpruned N_b. The merger
    runs inside the tower on every patch (``vision``), so ``projector`` is 0.
    """
    dims = lm_dims(config.text_config) | {"gated_mlp": True}  # Qwen2's SwiGLU MLP (model_type qwen2_5_vl_text)
    b = len(image_tokens)
    pairs = list(zip(text_tokens, image_tokens, strict=True))
    return {
        "projector": 0.0,
        "llm_prefill": sum(decoder_prefill_flops(tt + k, **dims) for tt, k in pairs) / b,
        "llm_prefill_unpruned": sum(
            decoder_prefill_flops(tt + n, **dims) for tt, n in zip(text_tokens, totals, strict=True)
        )
        / b,
        "llm_tokens": sum(tt + k for tt, k in pairs) / b,
    }


__all__ = ["Qwen25VLBackend", "qwen_costs", "qwen_vision_flops"]
