"""Phase 3 of ``make train-tiny``: projector + Llama decoder on the cached CLIP features (see ``train``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import Tensor

from atp_ros.testing.tiny.llava import IMAGE_TOKEN
from atp_ros.warehouse.scenes import KINDS, Question, Scene, evidence_mask, questions_for_scene
from atp_ros.warehouse.train_data import GRID, NUM_PATCHES, Recipe, lr_at

if TYPE_CHECKING:
    from atp_ros.warehouse.train import Trainer


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
    return (*pad_rows(rows, positions, tok.pad_token_id), image_keep, targets, evidence)


def pad_rows(rows: list[list[int]], positions: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``(B, T)`` token ids, position ids and attention mask of sequences of different lengths."""
    length = max(len(x) for x in rows)
    ids_t = torch.full((len(rows), length), pad_id, dtype=torch.long)
    pos_t = torch.zeros((len(rows), length), dtype=torch.long)
    mask_t = torch.zeros((len(rows), length), dtype=torch.long)
    for b, (ids, pos) in enumerate(zip(rows, positions, strict=True)):
        ids_t[b, : len(ids)] = torch.tensor(ids)
        pos_t[b, : len(pos)] = torch.tensor(pos)
        mask_t[b, : len(ids)] = 1
    return ids_t, pos_t, mask_t


def attention_to_evidence_loss(
    lm, hidden_in: Tensor, pos: Tensor, evidence, layer_idx: int, heads: int, detach_keys: bool = False
) -> Tensor:
    """-log of the attention mass that ``heads`` of layer ``layer_idx`` put on the evidence patches,
    from each answer-predicting position (computed from the layer's own q/k and RoPE). ``detach_keys``:
    the loss reaches the keys' projection but not the hidden states they come from."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    layer = lm.layers[layer_idx]
    attn = layer.self_attn
    x = layer.input_layernorm(hidden_in)  # (B, T, D)
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)[:, :heads]  # (B, h, T, Dh)
    # Detached, the loss cannot make the image tokens alike to raise the evidence's share: at weight 3 that
    # erased the cell model's colors (a color_at-only run fell from 0.73 to chance; detached it reached 0.86).
    x_keys = layer.input_layernorm(hidden_in.detach()) if detach_keys else x
    k = attn.k_proj(x_keys).view(b, t, -1, attn.head_dim).transpose(1, 2)[:, :heads]
    cos, sin = lm.rotary_emb(x, pos)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    losses = []
    for row, items in enumerate(evidence):
        for p, seq in items:
            scores = (q[row, :, p : p + 1] @ k[row, :, : p + 1].transpose(-1, -2))[:, 0] * attn.scaling  # (h, p+1)
            logp = scores.log_softmax(-1)
            losses.append(-torch.logsumexp(logp.index_select(1, torch.as_tensor(seq)), dim=-1).mean())
    return torch.stack(losses).mean() if losses else hidden_in.new_zeros(())


def llava_loss(
    model,
    feats: Tensor,
    ids,
    pos,
    mask,
    image_keep,
    targets,
    evidence,
    image_token_id,
    r: Recipe,
    image_labels: tuple[Tensor, int, float] | None = None,
    image_choices: tuple[Tensor, int, float, Tensor] | None = None,
):
    """Cross-entropy on answer + EOS positions (+ attention supervision); image placeholders filled
    with the projected kept features. ``image_labels`` (token ids per kept image token in order, -100 for none;
    a decoder layer; a weight) adds a read-out of those tokens from the image positions' hidden states entering
    that layer through the final norm and ``lm_head`` (no new parameters). ``image_choices`` (indices into its
    last element, a set of token ids, per kept image token, -100 for none; a layer; a weight; the token ids) adds
    such a read-out among those tokens only, so it can share a layer with ``image_labels``."""
    lm = model.model.language_model
    embeds = lm.embed_tokens(ids)  # (B, T, D)
    kept = torch.cat([feats[b, torch.as_tensor(k)] for b, k in enumerate(image_keep)])  # (sum K, D_vis)
    projected = model.model.multi_modal_projector(kept.float())
    embeds = embeds.masked_scatter((ids == image_token_id)[..., None].expand_as(embeds), projected)
    hidden_states = r.sup_weight > 0 or image_labels is not None or image_choices is not None
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, output_hidden_states=hidden_states)
    hidden = out.last_hidden_state
    rows = torch.tensor([b for b, t in enumerate(targets) for _ in t])
    cols = torch.tensor([p for t in targets for p, _ in t])
    gold = torch.tensor([a for t in targets for _, a in t])
    logits = model.lm_head(hidden[rows, cols])
    loss = F.cross_entropy(logits, gold)
    acc = (logits.argmax(-1) == gold)[0::2].float().mean()  # answer tokens only (even entries)
    if r.sup_weight > 0:
        hidden_in, detach = out.hidden_states[r.sup_layer], getattr(r, "sup_detach_keys", False)
        sup = attention_to_evidence_loss(lm, hidden_in, pos, evidence, r.sup_layer, r.sup_heads, detach)
        loss = loss + r.sup_weight * sup
    if image_labels is not None:
        labels, layer, weight = image_labels
        at_images = out.hidden_states[layer][ids == image_token_id]  # (sum K, D), the order of image_keep
        if bool((labels >= 0).any()):
            loss = loss + weight * F.cross_entropy(model.lm_head(lm.norm(at_images)), labels, ignore_index=-100)
    if image_choices is not None:
        labels, layer, weight, among = image_choices
        if bool((labels >= 0).any()):
            at_images = out.hidden_states[layer][ids == image_token_id]
            logits = F.linear(lm.norm(at_images), model.lm_head.weight[among])  # (sum K, len(among))
            loss = loss + weight * F.cross_entropy(logits, labels, ignore_index=-100)
    return loss, float(acc)


def train_llava(
    trainer: Trainer,
    clip,
    train: tuple[list[Scene], Tensor],
    val: tuple[list[Scene], Tensor],
    progress: Progress,
    checkpoint_every_s: float,
):
    """Phase 3 on ``(scenes, cached features)``, resumed from ``trainer.state`` and checkpointed into
    it; validation accuracy every 200 steps. Returns the trained LLaVA (CLIP's vision tower inside)."""
    from transformers import LlavaForConditionalGeneration

    r = trainer.r
    scenes, feats = train
    model = LlavaForConditionalGeneration(llava_config(r, trainer.tok, clip.config.vision_config))
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    model.model.vision_tower.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=r.llava_lr, weight_decay=0.01)
    step = 0
    if "llava" in trainer.state:
        model.load_state_dict(trainer.state["llava"])
        if "llava_opt" in trainer.state:
            opt.load_state_dict(trainer.state["llava_opt"])
        step = trainer.state.get("llava_step", r.llava_steps)
    image_token_id = model.config.image_token_id
    trainer.truncate_log("llava", step)  # a restarted or resumed phase rewrites what came after
    task = progress.add_task("llava", total=r.llava_steps, completed=step, info="")
    rng = np.random.default_rng([r.seed, 3, step])
    model.train()
    last, ema = time.monotonic(), None
    while step < r.llava_steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, r.llava_steps, r.llava_lr)
        idx = rng.choice(len(scenes), size=r.llava_batch, replace=False)
        batch = llava_batch(trainer.tok, scenes, idx, rng, r, image_token_id)
        loss, acc = llava_loss(model, feats[torch.as_tensor(idx)], *batch, image_token_id, r)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema = acc if ema is None else 0.98 * ema + 0.02 * acc
        entry = {"phase": "llava", "step": step, "loss": loss.item(), "acc": acc}
        if step % 200 == 0 or step == r.llava_steps:
            entry["val_acc"] = val_accuracy(model, trainer.tok, r, val, image_token_id)
            model.train()
        progress.update(task, completed=step, info=f"loss {loss.item():.3f} acc~{ema:.3f}")
        trainer.log(**entry)
        if time.monotonic() - last > checkpoint_every_s or step == r.llava_steps:
            last = time.monotonic()
            done = {"llava_opt": opt.state_dict()} if step < r.llava_steps else {}
            trainer.save_state(llava=model.state_dict(), llava_step=step, **done)
    return model


@torch.no_grad()
def val_accuracy(model, tok, recipe: Recipe, val: tuple[list[Scene], Tensor], image_token_id: int) -> float:
    """Answer accuracy on one question per validation scene (every kind, all image tokens)."""
    scenes, feats = val
    model.eval()
    rng = np.random.default_rng(12345)
    r = Recipe(**{**recipe.__dict__, "llava_turns": 1, "drop_share": 0.0, "llava_kinds": KINDS})
    correct = total = 0
    for s in range(0, len(scenes), 50):
        idx = np.arange(s, min(s + 50, len(scenes)))
        ids, pos, mask, keep, targets, _ = llava_batch(tok, scenes, idx, rng, r, image_token_id)
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
