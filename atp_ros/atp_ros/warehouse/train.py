"""``make train-tiny``: train ``warehouse-tiny`` from nothing on the synthetic warehouse (CPU, seeded, resumable).

Three phases, each checkpointed every few minutes under ``--work`` so a stopped run
resumes where it was (``--fresh`` starts over):

1. **clip** -- a small CLIP (ViT 4 layers x 128, patch 16 at 192 px: 12 x 12 = 144 patches;
   text 2 layers x 128) trained on rendered training scenes with two losses:

   * global: symmetric InfoNCE between the image embedding and a caption of 2-3 facts
     about parts of the scene, written in the questions' words;
   * region: for a question (or a single fact) about the image, a softmax over the image's
     144 patch embeddings -- the same read-out ATP's ``S_inter`` uses (``post_layernorm`` +
     ``visual_projection`` of each last-layer patch) -- against the text embedding must put
     its mass on the question's evidence patches. A global objective alone does not align
     patches with text (``shared/notes/embedded-model-probe.md``); this is the dense,
     region-caption training that makes ``S_inter`` a relevance signal.
2. **features** -- the frozen tower's LLaVA feature layer (the last layer, CLS dropped: the
   states the region loss aligned with the questions' words) for every training image,
   cached once (float16).
3. **llava** -- projector + Llama decoder (4 layers x 256) trained from scratch on the
   cached features, several question/answer turns per image in one sequence, loss on the
   answer token and its end token only, plus attention supervision: two heads of one LM layer
   are taught to look, from the answer-predicting position, at the question's evidence patches
   (a first run without it stalled at chance on every slot-bound question). Slot-bound question
   kinds are drawn twice as often. A share of the sequences drops a random subset of
   image tokens (keep 10-100%), keeping each kept token's original position id: the
   model learns to answer from a subset, as ``atp.positions: original`` feeds it.

The result is saved as a standard ``LlavaForConditionalGeneration`` directory (float16
safetensors, processor, chat template) with the CLIP as ``atp_text_tower/``; it loads
through ``load_backend`` like any LLaVA. Progress shows with ETA; ``learning_curve.png``
and ``train_log.jsonl`` go next to the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor

from atp_ros.testing.tiny.llava import CHAT_TEMPLATE, IMAGE_TOKEN  # llava-1.5's prompt, reduced
from atp_ros.warehouse.scenes import (
    KINDS,
    Question,
    Scene,
    captions_for_scene,
    evidence_mask,
    question_words,
    questions_for_scene,
    render_scene,
    split_seed,
)

IMAGE_SIZE = 192
PATCH = 16
GRID = IMAGE_SIZE // PATCH  # 12
NUM_PATCHES = GRID * GRID  # 144
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CHAT_WORDS = ["user", "assistant"]


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights (seeded: the same recipe gives the same model)."""

    seed: int = 0
    train_images: int = 24_000
    wide_share: float = 0.2  # share of training frames rendered 4:3 and squeezed (camera frames are 4:3)
    clip_steps: int = 700
    clip_batch: int = 64
    clip_lr: float = 1e-3
    llava_steps: int = 1800
    llava_batch: int = 32
    llava_turns: int = 6
    llava_lr: float = 1e-3
    drop_share: float = 0.3  # sequences trained on a random subset of image tokens
    # Attention supervision: in this LM layer, these heads of the answer-predicting position are
    # taught to look at the question's evidence patches (the generator knows where they are).
    sup_layer: int = 2
    sup_heads: int = 2
    sup_weight: float = 1.0
    # The LLM reads the tower's last layer: the one the region loss aligned with the questions' words,
    # so "top shelf, slot two" is a direction in the patch states, not only a position.
    feature_layer: int = -1
    # Question kinds drawn for the LLM (repeats weigh a kind up: slot-bound lookups are the hard part).
    llava_kinds: tuple[str, ...] = (
        "color_at",
        "color_at",
        "label_at",
        "label_at",
        "which_level",
        "left_right",
        "count",
        "exists",
        "gripper",
        "aisle",
    )
    vision_hidden: int = 128
    vision_layers: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    lm_hidden: int = 256
    lm_layers: int = 4
    lm_intermediate: int = 640


CLIP_FIELDS = (
    "seed",
    "train_images",
    "wide_share",
    "clip_steps",
    "clip_batch",
    "clip_lr",
    "vision_hidden",
    "vision_layers",
    "text_hidden",
    "text_layers",
)


def _clip_part(recipe: dict) -> dict:
    return {k: recipe.get(k) for k in CLIP_FIELDS}


def make_tokenizer():
    from atp_ros.testing.tiny.tokenizer import make_tiny_tokenizer

    tok = make_tiny_tokenizer([IMAGE_TOKEN], vocab_size=0, words=CHAT_WORDS + question_words())
    tok.padding_side = "left"
    return tok


def pixels(rgb: np.ndarray) -> np.ndarray:
    """What the shipped CLIPImageProcessor does: bicubic resize to 192 x 192 (no crop), rescale, normalize."""
    img = Image.fromarray(rgb)
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return x.transpose(2, 0, 1)


def render_pool(split: str, count: int, wide_share: float, seed: int, desc: str, progress: Progress):
    """Scenes of ``split`` (offsets ``0..count-1``), their normalized pixels (float16) and per-scene RNG seeds."""
    rng = np.random.default_rng(seed)
    scenes: list[Scene] = []
    px = np.empty((count, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float16)
    task = progress.add_task(desc, total=count, info="")
    for i in range(count):
        wide = rng.random() < wide_share
        h, w = (IMAGE_SIZE, IMAGE_SIZE * 4 // 3) if wide else (IMAGE_SIZE, IMAGE_SIZE)
        sc = render_scene(split_seed(split, i), height=h, width=w)
        px[i] = pixels(sc.rgb)
        scenes.append(sc)
        progress.advance(task)
    return scenes, px


# ---------------------------------------------------------------------------- models


def clip_config(r: Recipe, tok):
    from transformers import CLIPConfig

    text = {
        "vocab_size": len(tok),
        "hidden_size": r.text_hidden,
        "intermediate_size": 4 * r.text_hidden,
        "num_hidden_layers": r.text_layers,
        "num_attention_heads": 4,
        "max_position_embeddings": 40,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,  # id 3: CLIP pools at the first EOS (not the legacy argmax rule of id 2)
    }
    vision = {
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH,
        "hidden_size": r.vision_hidden,
        "intermediate_size": 4 * r.vision_hidden,
        "num_hidden_layers": r.vision_layers,
        "num_attention_heads": 4,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=r.vision_hidden)


def llava_config(r: Recipe, tok, vision_config):
    from transformers import LlavaConfig

    text = {
        "model_type": "llama",
        "vocab_size": len(tok),
        "hidden_size": r.lm_hidden,
        "intermediate_size": r.lm_intermediate,
        "num_hidden_layers": r.lm_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "tie_word_embeddings": False,
    }
    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=NUM_PATCHES,
        vision_feature_layer=r.feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config.pad_token_id = tok.pad_token_id
    return config


def encode_texts(tok, texts: list[str], max_len: int = 40) -> tuple[Tensor, Tensor]:
    """Right-padded ids with EOS appended (CLIP pools there) and the attention mask."""
    rows = [[*tok(t, add_special_tokens=False)["input_ids"][: max_len - 1], tok.eos_token_id] for t in texts]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


# ---------------------------------------------------------------------------- phase 1: CLIP


def clip_batch(scenes: list[Scene], idx: np.ndarray, rng: np.random.Generator):
    """Captions (one per image) and region texts with their evidence patch masks."""
    captions, region_texts, region_img, region_masks = [], [], [], []
    for b, i in enumerate(idx):
        sc = scenes[int(i)]
        facts = captions_for_scene(sc, rng, facts=int(rng.integers(2, 4)))
        captions.append(" and ".join(f for f, _ in facts))
        regions = [(q.question, q.evidence) for q in questions_for_scene(sc, rng, 3) if q.evidence]
        regions += [(f, ev) for f, ev in captions_for_scene(sc, rng, facts=1)]
        for text, ev in regions:
            region_texts.append(text)
            region_img.append(b)
            region_masks.append(evidence_mask(ev, sc.rgb.shape[:2], (GRID, GRID)).reshape(-1))
    return captions, region_texts, np.array(region_img), np.stack(region_masks)


def clip_losses(model, tok, px: Tensor, captions, region_texts, region_img, region_masks, dense_scale):
    vis = model.vision_model(pixel_values=px)
    img = F.normalize(model.visual_projection(vis.pooler_output), dim=-1)  # (B, E)
    patches = F.normalize(
        model.visual_projection(model.vision_model.post_layernorm(vis.last_hidden_state[:, 1:])), dim=-1
    )
    ids, mask = encode_texts(tok, captions + region_texts)
    txt = model.text_model(input_ids=ids, attention_mask=mask).pooler_output
    txt = F.normalize(model.text_projection(txt), dim=-1)  # (B + R, E)
    cap, reg = txt[: len(captions)], txt[len(captions) :]
    logits = model.logit_scale.exp() * img @ cap.T
    target = torch.arange(len(captions))
    global_loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    # Region loss: each text's softmax over its own image's patches, mass on the evidence patches.
    sims = dense_scale.exp() * torch.einsum("rne,re->rn", patches[torch.as_tensor(region_img)], reg)  # (R, N)
    ev = torch.as_tensor(region_masks)
    region_loss = (torch.logsumexp(sims, -1) - torch.logsumexp(sims.masked_fill(~ev, -1e4), -1)).mean()
    return global_loss, region_loss


# ---------------------------------------------------------------------------- phase 3: LLaVA


def turn_ids(tok, q: Question, first: bool) -> tuple[list[int], int, int]:
    """Ids of one turn (the image run is added by the caller for the first), the answer id and its offset."""
    text = ("user : " if not first else "") + q.question + " assistant :"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ans = tok.convert_tokens_to_ids(q.answer)
    return [*ids, ans, tok.eos_token_id], ans, len(ids)


def llava_batch(tok, scenes, idx, rng: np.random.Generator, r: Recipe, image_token_id: int):
    """Token ids, original position ids, image slots, targets and evidence positions of a batch of
    multi-turn sequences; ``evidence[b]`` lists ``(answer-predicting position, [sequence positions of
    the kept evidence patches])`` per question that has evidence."""
    rows, positions, image_keep, targets, evidence = [], [], [], [], []
    head = tok("user :", add_special_tokens=False)["input_ids"]
    for i in idx:
        sc = scenes[int(i)]
        qs, seen = [], set()
        for q in questions_for_scene(sc, rng, r.llava_turns * 2, kinds=r.llava_kinds):
            if q.question not in seen and len(qs) < r.llava_turns:
                seen.add(q.question)
                qs.append(q)
        keep = np.arange(NUM_PATCHES)
        if rng.random() < r.drop_share:
            k = max(1, round(NUM_PATCHES * rng.uniform(0.1, 1.0)))
            keep = np.sort(rng.choice(NUM_PATCHES, size=k, replace=False))
        ids = head + [image_token_id] * len(keep)
        pos = list(range(len(head))) + [len(head) + int(j) for j in keep]
        nxt = len(head) + NUM_PATCHES  # text after the image keeps its unpruned position
        tgt, ev_rows = [], []
        slot_of = {int(j): len(head) + n for n, j in enumerate(keep)}  # patch index -> sequence position
        for t, q in enumerate(qs):
            tids, ans, off = turn_ids(tok, q, first=(t == 0))
            start = len(ids)
            ids += tids
            pos += list(range(nxt, nxt + len(tids)))
            nxt += len(tids)
            tgt.append((start + off - 1, ans))  # ":" predicts the answer
            tgt.append((start + off, tok.eos_token_id))  # the answer predicts EOS
            patches = np.flatnonzero(evidence_mask(q.evidence, sc.rgb.shape[:2], (GRID, GRID)))
            seq = [slot_of[int(j)] for j in patches if int(j) in slot_of]
            if seq:
                ev_rows.append((start + off - 1, seq))
        rows.append(ids)
        positions.append(pos)
        image_keep.append(keep)
        targets.append(tgt)
        evidence.append(ev_rows)
    length = max(len(x) for x in rows)
    ids_t = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
    pos_t = torch.zeros((len(rows), length), dtype=torch.long)
    mask_t = torch.zeros((len(rows), length), dtype=torch.long)
    for b, (ids, pos) in enumerate(zip(rows, positions, strict=True)):
        ids_t[b, : len(ids)] = torch.tensor(ids)
        pos_t[b, : len(pos)] = torch.tensor(pos)
        mask_t[b, : len(ids)] = 1
    return ids_t, pos_t, mask_t, image_keep, targets, evidence


def attention_to_evidence_loss(lm, hidden_in: Tensor, pos: Tensor, evidence, layer_idx: int, heads: int) -> Tensor:
    """-log of the attention mass that ``heads`` of layer ``layer_idx`` put on the evidence patches,
    from each answer-predicting position (computed from the layer's own q/k and RoPE)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    layer = lm.layers[layer_idx]
    attn = layer.self_attn
    x = layer.input_layernorm(hidden_in)  # (B, T, D)
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)[:, :heads]  # (B, h, T, Dh)
    k = attn.k_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)[:, :heads]
    cos, sin = lm.rotary_emb(x, pos)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    losses = []
    for row, items in enumerate(evidence):
        for p, seq in items:
            scores = (q[row, :, p : p + 1] @ k[row, :, : p + 1].transpose(-1, -2))[:, 0] * attn.scaling  # (h, p+1)
            logp = scores.log_softmax(-1)
            losses.append(-torch.logsumexp(logp.index_select(1, torch.as_tensor(seq)), dim=-1).mean())
    return torch.stack(losses).mean() if losses else hidden_in.new_zeros(())


def llava_loss(model, feats: Tensor, ids, pos, mask, image_keep, targets, evidence, image_token_id, r: Recipe):
    """Cross-entropy on answer + EOS positions (+ attention supervision); image placeholders filled
    with the projected kept features."""
    lm = model.model.language_model
    embeds = lm.embed_tokens(ids)  # (B, T, D)
    kept = torch.cat([feats[b, torch.as_tensor(k)] for b, k in enumerate(image_keep)])  # (sum K, D_vis)
    projected = model.model.multi_modal_projector(kept.float())
    embeds = embeds.masked_scatter((ids == image_token_id)[..., None].expand_as(embeds), projected)
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, output_hidden_states=r.sup_weight > 0)
    hidden = out.last_hidden_state
    rows = torch.tensor([b for b, t in enumerate(targets) for _ in t])
    cols = torch.tensor([p for t in targets for p, _ in t])
    gold = torch.tensor([a for t in targets for _, a in t])
    logits = model.lm_head(hidden[rows, cols])
    loss = F.cross_entropy(logits, gold)
    acc = (logits.argmax(-1) == gold)[0::2].float().mean()  # answer tokens only (even entries)
    if r.sup_weight > 0:
        sup = attention_to_evidence_loss(lm, out.hidden_states[r.sup_layer], pos, evidence, r.sup_layer, r.sup_heads)
        loss = loss + r.sup_weight * sup
    return loss, float(acc)


# ---------------------------------------------------------------------------- driver


def lr_at(step: int, total: int, peak: float, warmup: int = 150) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


class Trainer:
    def __init__(self, work: Path, recipe: Recipe, fresh: bool, console_print=print) -> None:
        self.work = work
        self.r = recipe
        self.print = console_print
        self.state_path = work / "state.pt"
        self.log_path = work / "train_log.jsonl"
        work.mkdir(parents=True, exist_ok=True)
        if fresh:
            for p in (self.state_path, self.log_path, work / "features.pt"):
                p.unlink(missing_ok=True)
        torch.manual_seed(recipe.seed)
        self.tok = make_tokenizer()
        self.state = torch.load(self.state_path, weights_only=False) if self.state_path.exists() else {}
        saved = self.state.get("recipe", {})
        if self.state and _clip_part(saved) != _clip_part(recipe.__dict__):
            raise SystemExit(f"{self.state_path} was trained with another recipe; rerun with --fresh")
        if self.state and saved != recipe.__dict__ and "llava" in self.state:
            # Only the LLaVA phase's settings changed: keep the finished CLIP, retrain the rest.
            print("recipe changed after the CLIP phase: keeping CLIP, restarting the LLaVA phase")
            for key in ("llava", "llava_opt", "llava_step"):
                self.state.pop(key, None)

    def save_state(self, **kw) -> None:
        self.state.update(kw, recipe=self.r.__dict__)
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(self.state, tmp)
        tmp.replace(self.state_path)

    def log(self, **kw) -> None:
        with self.log_path.open("a") as f:
            f.write(json.dumps(kw) + "\n")

    def run(self, out: Path, checkpoint_every_s: float = 180.0) -> None:
        from transformers import CLIPModel, LlavaForConditionalGeneration

        r = self.r
        cols = (
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*cols, refresh_per_second=1) as progress:
            scenes, px = render_pool("train", r.train_images, r.wide_share, r.seed, "render train", progress)
            val_scenes, val_px = render_pool("validation", 300, r.wide_share, r.seed + 1, "render val", progress)
            # ---- phase 1: CLIP
            clip = CLIPModel(clip_config(r, self.tok))
            dense_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
            opt = torch.optim.AdamW([*clip.parameters(), dense_scale], lr=r.clip_lr, weight_decay=0.05)
            step = 0
            if "clip" in self.state:
                clip.load_state_dict(self.state["clip"])
                dense_scale.data.fill_(self.state["dense_scale"])
                if "clip_opt" in self.state:
                    opt.load_state_dict(self.state["clip_opt"])
                step = self.state.get("clip_step", r.clip_steps)
            task = progress.add_task("clip", total=r.clip_steps, completed=step, info="")
            rng = np.random.default_rng([r.seed, 1, step])
            last = time.monotonic()
            clip.train()
            while step < r.clip_steps:
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, r.clip_steps, r.clip_lr)
                idx = rng.choice(len(scenes), size=r.clip_batch, replace=False)
                caps, texts, rimg, rmask = clip_batch(scenes, idx, rng)
                g_loss, r_loss = clip_losses(
                    clip, self.tok, torch.from_numpy(px[idx]).float(), caps, texts, rimg, rmask, dense_scale
                )
                opt.zero_grad(set_to_none=True)
                (g_loss + r_loss).backward()
                torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
                opt.step()
                step += 1
                progress.update(task, completed=step, info=f"global {g_loss.item():.3f} region {r_loss.item():.3f}")
                self.log(phase="clip", step=step, global_loss=g_loss.item(), region_loss=r_loss.item())
                if time.monotonic() - last > checkpoint_every_s or step == r.clip_steps:
                    last = time.monotonic()
                    done = {"clip_opt": opt.state_dict()} if step < r.clip_steps else {}
                    self.save_state(clip=clip.state_dict(), dense_scale=dense_scale.item(), clip_step=step, **done)
            clip.eval().requires_grad_(False)
            self.state.pop("clip_opt", None)
            # ---- phase 2: cached features
            feats = self._features(clip, px, progress, "features train")
            val_feats = self._features(clip, val_px, progress, "features val")
            del px
            # ---- phase 3: LLaVA
            model = LlavaForConditionalGeneration(llava_config(r, self.tok, clip.config.vision_config))
            model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
            model.model.vision_tower.requires_grad_(False)
            params = [p for n, p in model.named_parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=r.llava_lr, weight_decay=0.01)
            step = 0
            if "llava" in self.state:
                model.load_state_dict(self.state["llava"])
                if "llava_opt" in self.state:
                    opt.load_state_dict(self.state["llava_opt"])
                step = self.state.get("llava_step", r.llava_steps)
            image_token_id = model.config.image_token_id
            self._truncate_log("llava", step)  # a restarted or resumed phase rewrites what came after
            task = progress.add_task("llava", total=r.llava_steps, completed=step, info="")
            rng = np.random.default_rng([r.seed, 3, step])
            model.train()
            last, ema = time.monotonic(), None
            while step < r.llava_steps:
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, r.llava_steps, r.llava_lr)
                idx = rng.choice(len(scenes), size=r.llava_batch, replace=False)
                batch = llava_batch(self.tok, scenes, idx, rng, r, image_token_id)
                loss, acc = llava_loss(model, feats[torch.as_tensor(idx)], *batch, image_token_id, r)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                step += 1
                ema = acc if ema is None else 0.98 * ema + 0.02 * acc
                entry = {"phase": "llava", "step": step, "loss": loss.item(), "acc": acc}
                if step % 200 == 0 or step == r.llava_steps:
                    entry["val_acc"] = self._val_accuracy(model, val_scenes, val_feats, image_token_id)
                    model.train()
                progress.update(task, completed=step, info=f"loss {loss.item():.3f} acc~{ema:.3f}")
                self.log(**entry)
                if time.monotonic() - last > checkpoint_every_s or step == r.llava_steps:
                    last = time.monotonic()
                    done = {"llava_opt": opt.state_dict()} if step < r.llava_steps else {}
                    self.save_state(llava=model.state_dict(), llava_step=step, **done)
        model.eval()
        save_checkpoint(out, model, clip, self.tok, r)
        plot_learning_curve(self.log_path, out / "learning_curve.png")
        self.print(f"saved {out}")

    def _truncate_log(self, phase: str, step: int) -> None:
        if not self.log_path.exists():
            return
        keep = [
            line
            for line in self.log_path.read_text().splitlines()
            if line.strip() and not (json.loads(line)["phase"] == phase and json.loads(line)["step"] > step)
        ]
        self.log_path.write_text("".join(line + "\n" for line in keep))

    def _features(self, clip, px: np.ndarray, progress: Progress, desc: str) -> Tensor:
        """LLaVA feature layer (``hidden_states[feature_layer]``, CLS dropped) for every image, float16 (N, 144, D)."""
        out = torch.empty((len(px), NUM_PATCHES, self.r.vision_hidden), dtype=torch.float16)
        task = progress.add_task(desc, total=len(px), info="")
        with torch.inference_mode():
            for s in range(0, len(px), 128):
                x = torch.from_numpy(px[s : s + 128]).float()
                hs = clip.vision_model(pixel_values=x, output_hidden_states=True).hidden_states
                out[s : s + 128] = hs[self.r.feature_layer][:, 1:].half()
                progress.advance(task, len(x))
        return out

    @torch.no_grad()
    def _val_accuracy(self, model, scenes, feats, image_token_id) -> float:
        model.eval()
        rng = np.random.default_rng(12345)
        r = Recipe(**{**self.r.__dict__, "llava_turns": 1, "drop_share": 0.0, "llava_kinds": KINDS})
        correct = total = 0
        for s in range(0, len(scenes), 50):
            idx = np.arange(s, min(s + 50, len(scenes)))
            ids, pos, mask, keep, targets, _ = llava_batch(self.tok, scenes, idx, rng, r, image_token_id)
            lm = model.model.language_model
            embeds = lm.embed_tokens(ids)
            projected = model.model.multi_modal_projector(feats[torch.as_tensor(idx)].float().flatten(0, 1))
            embeds = embeds.masked_scatter((ids == image_token_id)[..., None].expand_as(embeds), projected)
            hidden = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
            for b, t in enumerate(targets):
                p, a = t[0]
                correct += int(model.lm_head(hidden[b, p]).argmax()) == a
                total += 1
        return correct / max(total, 1)


def save_checkpoint(out: Path, model, clip, tok, r: Recipe) -> None:
    """A standard LLaVA directory (float16 safetensors) + processor + ``atp_text_tower/`` (the CLIP)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from atp_ros.backends.loading import TEXT_TOWER_SUBDIR
    from atp_ros.testing.tiny.common import set_special_ids

    out.mkdir(parents=True, exist_ok=True)
    image_processor = CLIPImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    set_special_ids(model.generation_config, tok)
    model.generation_config.max_new_tokens = 4
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
    processor.save_pretrained(out)
    tower = out / TEXT_TOWER_SUBDIR
    clip.to(torch.float16).save_pretrained(tower, safe_serialization=True)
    clip.to(torch.float32)
    tok.save_pretrained(tower)
    (out / "recipe.json").write_text(json.dumps(r.__dict__, indent=1) + "\n")


def plot_learning_curve(log_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    clip = [x for x in rows if x["phase"] == "clip"]
    lm = [x for x in rows if x["phase"] == "llava"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))

    def smooth(v, k=25):
        v = np.asarray(v, dtype=float)
        return np.convolve(v, np.ones(k) / k, mode="valid") if len(v) > k else v

    if clip:
        ax[0].plot(smooth([x["global_loss"] for x in clip]), label="global (image-caption)")
        ax[0].plot(smooth([x["region_loss"] for x in clip]), label="region (question-evidence patches)")
        ax[0].set(title="CLIP", xlabel="step", ylabel="loss")
        ax[0].legend()
    if lm:
        ax[1].plot(smooth([x["loss"] for x in lm]), label="train loss")
        ax2 = ax[1].twinx()
        vs = [(x["step"], x["val_acc"]) for x in lm if "val_acc" in x]
        if vs:
            ax2.plot(*zip(*vs, strict=True), "o-", color="C2", label="validation answer accuracy")
            ax2.set_ylim(0, 1)
        ax2.plot(smooth([x["acc"] for x in lm]), color="C1", alpha=0.6, label="train answer accuracy")
        ax[1].set(title="LLaVA (projector + LM)", xlabel="step", ylabel="loss")
        ax2.legend(loc="center right")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="train-tiny", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/warehouse-tiny", help="where the checkpoint directory goes")
    ap.add_argument("--work", default="out/train-tiny", help="resumable state (checkpoints every few minutes)")
    ap.add_argument("--fresh", action="store_true", help="ignore saved state and start over")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a minutes-long smoke run (tiny counts), not the model")
    args = ap.parse_args(argv)
    recipe = Recipe(seed=args.seed)
    if args.quick:
        recipe = Recipe(seed=args.seed, train_images=400, clip_steps=20, clip_batch=16, llava_steps=20, llava_batch=8)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    Trainer(Path(args.work), recipe, args.fresh).run(Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
