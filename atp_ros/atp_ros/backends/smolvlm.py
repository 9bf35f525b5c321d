"""SmolVLM2 / Idefics3 behind ATP: prune pixel-shuffled tile tokens, keep every text and structural token.

The SmolVLM adapter of :class:`atp_ros.backends.pipeline.VlmBackend` (``model_type`` ``smolvlm`` and
``idefics3``: the same layout, two transformers classes)::

    preprocess  SmolVLMProcessor / Idefics3Processor: the frame resized (longest edge ``size``), stretched to
                whole tiles of ``max_image_size`` and split into rows x cols tiles plus one global tile
                (a frame that fits one tile: the global tile alone); pixel_values (B, tiles, 3, S, S);
                per tile ``<fake_token_around_image><row_i_col_j>`` + g*g ``<image>``, then
                ``<fake_token_around_image><global-img>`` + g*g ``<image>`` + ``<fake_token_around_image>``
    encode      the SigLIP tower once over every real tile (output_hidden_states), the connector's pixel
                shuffle + projection: one LLM token per s x s patch group (g = side / s per tile side)
    scoring     on the image's local tiles laid out as one (rows*g) x (cols*g) grid over the frame (raster
                order, so masks and overlays map back to frame pixels): S_intra per tile (the SigLIP
                pooling-head probe of the given SigLIP text tower; else received attention of the last
                layer), S_inter per tile (SigLIP joint space), each averaged over the s x s patches of an LLM
                token; one top-K over all local tiles of the image (a *global* budget, as HiRED spreads it)
    feed        the kept local tokens in the LLM's order plus the whole global tile; dropped ``<image>``
                tokens leave the prompt, ``<fake_token_around_image>``, ``<row_i_col_j>``, ``<global-img>``
                and the newlines stay; 1-D positions ``compact`` or ``original`` (as LLaVA)

Choices: the global tile is the model's view of the whole frame at tile resolution; it always reaches
the LLM (like CLS in llava's ``full`` strategy) and is not counted in N or K (``consumer_tokens`` has it).
A frame that fits one tile has only the global tile: then that tile is the grid that is pruned.
SmolVLM2's tower is SigLIP fine-tuned inside the VLM: the SigLIP text tower and probe are those of the
checkpoint it started from, an approximation (said in the load notes).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

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
from atp_ros.method import AtpConfig, Budget, ScoreInputs, Selection, select_indices, stack_selections

IMAGE_TEXT = ("<image>", "<fake_token_around_image>", "<global-img>")


@dataclass(frozen=True)
class TilePrompt(LmPrompt):
    """:class:`LmPrompt` plus each image's tile count (the connector and the unpruned prefill depend on it)."""

    tiles: list[int] = field(default_factory=list)


class SmolVLMBackend(VlmBackend):
    """ATP-gated ``SmolVLMForConditionalGeneration`` (SmolVLM2). Build with :meth:`from_pretrained`."""

    family = "smolvlm"
    hf_class = "SmolVLMForConditionalGeneration"
    intra_only = "intra-only (S_intra alone)"
    # How a frame's budget is spread over its tiles: "image" (one top-K over every local tile, as HiRED spreads
    # it; the default) or "tile" (each tile its own budget: keep_ratio and mass per tile, keep_tokens split
    # evenly, ceil(K / tiles) each). bench/bench_tiles.py measures both on the tiny model.
    tile_budget = "image"

    def __init__(self, model, processor, model_id: str, text_tower, score_layer: int | None = None) -> None:
        cfg = model.config
        vcfg = cfg.vision_config
        self.tower = model.model.vision_model
        self.connector = model.model.connector
        self.scale = int(cfg.scale_factor)
        self.patch_side = int(vcfg.image_size) // int(vcfg.patch_size)  # patches per tile side
        self.g = self.patch_side // self.scale  # LLM tokens per tile side
        layers = self.tower.encoder.layers
        index = len(layers) - 1 if score_layer is None else int(score_layer)
        if not 0 <= index < len(layers):
            raise ValueError(f"score_layer {index} out of range for a {len(layers)}-layer tower")
        self.image_token_id = int(cfg.image_token_id)
        notes = [
            f"{self.family}: K counts the local tiles' LLM tokens (one per {self.scale}x{self.scale} patches), "
            "one budget over all tiles of a frame; the global tile always reaches the LLM",
        ]
        if text_tower.joint is not None:
            notes.append(
                f"{self.family}: S_inter and the probe come from {text_tower.source}, the SigLIP the tower was "
                "fine-tuned from: an approximation"
            )
        super().__init__(
            model.eval(), processor, model_id, model.device, model.dtype, vcfg, layers[index], index, text_tower,
            has_cls=False, prefix=0, load_notes=notes,
        )  # fmt: skip
        self.grid = None  # the tile layout follows the frame
        longest = int(processor.image_processor.size["longest_edge"])
        tile = int(processor.image_processor.max_image_size["longest_edge"])
        side = -(-longest // tile)
        self.num_visual_tokens = side * side * self.g * self.g  # at most: a square frame's local tiles
        # vision_flops (the base class's tower_flops) is one tile's pass: vision_cost multiplies by the tiles.
        self._row_tokens = {
            tid: tok for tok, tid in self.tokenizer.get_vocab().items() if tok.startswith("<row_") and "_col_" in tok
        }
        if model.generation_config.pad_token_id is None and self.tokenizer.pad_token_id is not None:
            model.generation_config.pad_token_id = self.tokenizer.pad_token_id

    # ------------------------------------------------------------------ the seam

    @classmethod
    def joint_space_of(cls, model):
        return load_joint_space, int(model.config.vision_config.hidden_size), "siglip"

    def questions(self, images: Sequence[np.ndarray], questions: Sequence[str] | str) -> list[str]:
        # Literal image or layout tokens in a question would add placeholders or fake a tile layout.
        cleaned = []
        for q in super().questions(images, questions):
            for token in IMAGE_TEXT:
                q = q.replace(token, " ")
            cleaned.append(re.sub(r"<row_\d+_col_\d+>", " ", q).strip())
        return cleaned

    def _prompt(self, question: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def preprocess(self, images: list[np.ndarray], questions: list[str]) -> Batch:
        pil = [[Image.fromarray(img)] for img in images]
        enc = self.processor(images=pil, text=[self._prompt(q) for q in questions], return_tensors="pt", padding=True)
        pixel_values = enc["pixel_values"].to(self.device, self.dtype)  # (B, tiles, 3, S, S), zero tiles pad
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "pixel_values": pixel_values}
        if "pixel_attention_mask" in enc:
            inputs["pixel_attention_mask"] = enc["pixel_attention_mask"].to(self.device)
        # The processor stretches the whole frame onto whole tiles (no crop, no pad).
        views = [PixelBox(0.0, 0.0, float(img.shape[1]), float(img.shape[0])) for img in images]
        return Batch(pixel_values, inputs, views)

    def _layouts(self, input_ids: Tensor, attention_mask: Tensor) -> list[tuple[int, int]]:
        """(rows, cols) of local tiles per prompt, read from its ``<row_i_col_j>`` tokens ((0, 0): global only)."""
        out = []
        for b in range(input_ids.shape[0]):
            row = input_ids[b][attention_mask[b].bool()].tolist()
            names = [self._row_tokens[t] for t in row if t in self._row_tokens]
            if not names:
                out.append((0, 0))
                continue
            rc = [tuple(int(x) for x in n.strip("<>").replace("row_", "").split("_col_")) for n in names]
            out.append((max(r for r, _ in rc), max(c for _, c in rc)))
        return out

    def encode(self, batch: Batch) -> VisionStates:
        pv = batch.pixel_values
        b, t = pv.shape[:2]
        flat = pv.reshape(b * t, *pv.shape[2:])
        # Exactly SmolVLMModel.get_image_features: all-zero tiles are batch padding and are dropped.
        real = (flat == 0.0).sum(dim=(-1, -2, -3)) != flat.shape[1:].numel()
        real[0] |= ~torch.any(real)
        per_image = real.view(b, t).sum(dim=1).tolist()
        tiles = flat[real].contiguous()
        mask = batch.inputs.get("pixel_attention_mask")
        if mask is None:
            mask = torch.ones((tiles.shape[0], *tiles.shape[2:]), dtype=torch.bool, device=tiles.device)
        else:
            mask = mask.reshape(b * t, *mask.shape[2:])[real].contiguous()
        p = int(self.tower.patch_size)
        patch_mask = mask.unfold(1, p, p).unfold(2, p, p).sum(dim=(-1, -2)) > 0
        out = self.tower(pixel_values=tiles, patch_attention_mask=patch_mask, output_hidden_states=True)
        hs = out.hidden_states  # (L+1) x (tiles, P, D): hs[i] is layer i's input, hs[-1] the raw last layer
        features = self.connector(out.last_hidden_state)  # (tiles, g*g, D_llm), raster order per tile
        layouts = self._layouts(batch.inputs["input_ids"], batch.inputs["attention_mask"])
        for (rows, cols), n in zip(layouts, per_image, strict=True):
            if n != rows * cols + 1:
                raise RuntimeError(f"{rows}x{cols} tiles in the prompt but {n} tiles of pixels")
        grids = [(r * self.g, c * self.g) if r else (self.g, self.g) for r, c in layouts]
        meta = {"tiles": per_image, "layouts": layouts, "features": features}
        local = self._per_image_grid(features, meta)  # (B, max N_b, D_llm): the prunable grid, frame raster order
        return VisionStates(tokens=local, score_input=hs[self.score_layer], last=hs[-1], grids=grids, meta=meta)

    def _pool(self, per_patch: Tensor) -> Tensor:
        """``(tiles, P, ...)`` per patch -> ``(tiles, g*g, ...)``: the mean over each LLM token's s x s patches."""
        s, g = self.scale, self.g
        x = per_patch.reshape(per_patch.shape[0], g, s, g, s, *per_patch.shape[2:])
        return x.mean(dim=(2, 4)).reshape(per_patch.shape[0], g * g, *per_patch.shape[2:])

    def _per_image_grid(self, per_tile_tokens: Tensor, meta: dict) -> Tensor:
        """``(tiles, g*g, ...)`` -> ``(B, max N_b, ...)``: each image's prunable grid in frame raster order."""
        parts = per_tile_tokens.split(meta["tiles"])
        return _pad_rows([self._to_frame(x, layout) for x, layout in zip(parts, meta["layouts"], strict=True)])

    def _to_frame(self, tiles: Tensor, layout: tuple[int, int]) -> Tensor:
        """One image's per-tile values ``(tiles_b, g*g, ...)`` -> ``(N_b, ...)``: the local tiles stitched into one
        (rows*g) x (cols*g) grid over the frame, raster order (a frame of one tile: that tile)."""
        rows, cols = layout
        g = self.g
        if rows == 0:
            return tiles[0]
        local = tiles[: rows * cols].reshape(rows, cols, g, g, *tiles.shape[2:])
        return local.transpose(1, 2).reshape(rows * g * cols * g, *tiles.shape[2:])

    def intra_scores(self, vision: VisionStates, signal: str, notes: list[str]) -> tuple[Tensor, str]:
        if signal == "cls" and self.joint is not None and self.joint.has_probe:
            per_patch, used = self.joint.probe_attention(vision.last), "probe"  # (tiles, P)
        else:
            if signal == "cls":
                notes.append(f"{self.model_id}: no pooling head to probe with: S_intra uses received attention")
            per_patch, used = super().intra_scores(vision, "received", [])  # (tiles, P), per tile
        return self._per_image_grid(self._pool(per_patch.float()), vision.meta), used

    def joint_patches(self, vision: VisionStates, readout: str, notes: list[str]) -> tuple[Tensor, str]:
        if readout != "naive":
            notes.append(f"inter_readout {readout!r} is implemented for LLaVA towers only: naive used")
        return self._per_image_grid(self._pool(vision.last), vision.meta), "naive"

    def select(self, selector, inputs: ScoreInputs, grids: list[tuple[int, int]], atp: AtpConfig) -> Selection:
        if self.tile_budget == "image":
            return VlmBackend.select(selector, inputs, grids, atp)
        g, parts = self.g, []
        for b, (h, w) in enumerate(grids):
            # Raster indices of each g x g block of the frame grid: one block per tile.
            tiles = torch.arange(h * w).reshape(h // g, g, w // g, g).transpose(1, 2).reshape(-1, g * g)
            budget = atp.budget(g * g)
            if budget.keep_tokens is not None:
                budget = Budget(keep_tokens=min(g * g, -(-atp.keep_tokens // len(tiles))))
            picks, fused = [], torch.zeros(h * w)
            for cells in tiles:

                def cut(t: Tensor | None, cells: Tensor = cells, b: int = b) -> Tensor | None:
                    return None if t is None else t[b : b + 1, cells.to(t.device)]

                one = selector.select(
                    ScoreInputs(cut(inputs.s_intra), cut(inputs.s_inter), cut(inputs.tokens), (g, g)), budget
                )
                picks.append(cells[one.kept(0).cpu()])
                fused[cells] = one.scores[0].float().cpu()
            sel = select_indices([torch.cat(picks)], fused[None], (h, w), method=selector.name)
            signals = {
                k: getattr(inputs, k)[b : b + 1, : h * w]
                for k in ("s_intra", "s_inter")
                if getattr(inputs, k) is not None
            }
            parts.append(replace(sel, **signals))
        return stack_selections(parts)

    def feed(self, vision: VisionStates, selection: Selection, batch: Batch, atp: AtpConfig) -> LmPrompt:
        ids, mask = batch.inputs["input_ids"].cpu(), batch.inputs["attention_mask"].cpu()
        kept_idx, kept_len = selection.indices.cpu(), selection.lengths.cpu().tolist()
        features = vision.meta["features"].split(vision.meta["tiles"])  # per image (tiles_b, g*g, D_llm)
        g2 = self.g * self.g
        rows, pos_rows, feats, text_tokens, consumer = [], [], [], [], []
        for b in range(ids.shape[0]):
            row = ids[b][mask[b].bool()]
            where = (row == self.image_token_id).nonzero().flatten()  # every <image> token, tile by tile
            tiles = features[b]
            if len(where) != tiles.shape[0] * g2:
                raise RuntimeError(f"sample {b}: {len(where)} image tokens for {tiles.shape[0]} tiles of {g2}")
            r_tiles, c_tiles = vision.meta["layouts"][b]
            kept = kept_idx[b, : kept_len[b]]
            if r_tiles:  # frame raster index -> offset among the image tokens (tile-major, then raster)
                rr, cc = kept // (c_tiles * self.g), kept % (c_tiles * self.g)
                offsets = ((rr // self.g) * c_tiles + cc // self.g) * g2 + (rr % self.g) * self.g + cc % self.g
                local = r_tiles * c_tiles * g2
                offsets = torch.cat([offsets.sort().values, torch.arange(local, local + g2)])  # + the global tile
            else:
                offsets = kept
            keep = torch.ones(len(row), dtype=torch.bool)
            keep[where] = False
            keep[where[offsets]] = True
            rows.append(row[keep])
            pos_rows.append(torch.arange(len(row))[keep])
            feats.append(tiles.reshape(-1, tiles.shape[-1])[offsets.to(tiles.device)])
            text_tokens.append(len(row) - len(where))
            consumer.append(len(offsets))
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        new_ids = ids.new_full((len(rows), length), pad)
        new_mask = mask.new_zeros((len(rows), length))
        for b, r in enumerate(rows):
            new_ids[b, length - len(r) :] = r
            new_mask[b, length - len(r) :] = 1
        positions = (new_mask.long().cumsum(-1) - 1).masked_fill(new_mask == 0, 0)  # compact: what generate derives
        if atp.positions == "original":
            for b, p in enumerate(pos_rows):
                positions[b, length - len(p) :] = p
        kwargs = {
            "input_ids": new_ids.to(self.device),
            "attention_mask": new_mask.to(self.device),
            "position_ids": positions.to(self.device),
            "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=feats)},
        }
        return TilePrompt(kwargs, int(length), text_tokens, consumer, tiles=list(vision.meta["tiles"]))

    # ------------------------------------------------------------------ accounting

    def vision_cost(self, vision: VisionStates) -> float:
        tiles = vision.meta["tiles"]
        return self.vision_flops * sum(tiles) / len(tiles)  # one tower pass per tile

    def scoring_cost(self, vision: VisionStates, intra_signal: str, joint_used: bool) -> float:
        # Per tile: S_intra on its P patches; the joint read-out on its g*g pooled tokens; cosines on N_b.
        p = self.patch_side**2
        costs = []
        for tiles, (h, w) in zip(vision.meta["tiles"], vision.grids, strict=True):
            cost = tiles * scoring_flops(p, False, self.vision_hidden, intra_signal) if intra_signal else 0.0
            if joint_used and intra_signal:
                cost += self.joint.joint_flops(tiles * self.g * self.g) + 2.0 * h * w * self.joint.embed_dim
            costs.append(cost)
        return sum(costs) / len(costs)

    def flops(self, kept: list[int], prompt: LmPrompt) -> dict[str, float]:
        tiles = prompt.tiles if isinstance(prompt, TilePrompt) else [1] * len(kept)
        return smolvlm_costs(self.model.config, prompt.text_tokens, prompt.consumer_tokens, tiles)


def _pad_rows(rows: Sequence[Tensor]) -> Tensor:
    """Per-image ``(N_b, ...)`` tensors -> ``(B, max N_b, ...)``, zero padded after ``N_b``."""
    n_max = max(int(r.shape[0]) for r in rows)
    out = rows[0].new_zeros((len(rows), n_max, *rows[0].shape[1:]))
    for b, r in enumerate(rows):
        out[b, : r.shape[0]] = r
    return out


def smolvlm_costs(config, text_tokens: list[int], image_tokens: list[int], tiles: list[int]) -> dict[str, float]:
    """Per-image FLOPs (batch mean) of SmolVLM's connector and LLM prefill from its config alone.

    ``image_tokens[b]``: LLM tokens the image kept (local kept + the global tile); ``tiles[b]``: its tiles
    (the connector projects every tile's tokens whatever K is; its input pixel shuffle is a reshape).
    """
    v, t = config.vision_config, config.text_config
    g2 = (int(v.image_size) // int(v.patch_size)) ** 2 // int(config.scale_factor) ** 2
    wide = int(v.hidden_size) * int(config.scale_factor) ** 2
    dims = lm_dims(t)
    b = len(image_tokens)
    pairs = list(zip(text_tokens, image_tokens, strict=True))
    unpruned = [tt + n * g2 for tt, n in zip(text_tokens, tiles, strict=True)]
    return {
        "projector": sum(2.0 * n * g2 * wide * int(t.hidden_size) for n in tiles) / b,
        "llm_prefill": sum(decoder_prefill_flops(tt + k, **dims) for tt, k in pairs) / b,
        "llm_prefill_unpruned": sum(decoder_prefill_flops(n, **dims) for n in unpruned) / b,
        "llm_tokens": sum(tt + k for tt, k in pairs) / b,
    }


class Idefics3Backend(SmolVLMBackend):
    """ATP-gated ``Idefics3ForConditionalGeneration`` (SmolVLM v1 checkpoints): SmolVLM's layout and adapter."""

    family = "idefics3"
    hf_class = "Idefics3ForConditionalGeneration"


__all__ = ["Idefics3Backend", "SmolVLMBackend", "smolvlm_costs"]
