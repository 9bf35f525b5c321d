"""Phases 3, 4 and 5 of the cell model: projector + Llama decoder from scratch on the cached frozen-tower
features, then on reworded questions, then several reworded questions per image."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from rich.progress import Progress
from torch import Tensor

from atp_ros.testing.tiny.llava import CHAT_TEMPLATE, IMAGE_TOKEN
from atp_ros.warehouse.cell.model.data import Frames, draw_questions, patch_mask
from atp_ros.warehouse.cell.model.ground_phase import kind_labels, letter_labels
from atp_ros.warehouse.cell.model.loop import Phase, run_phase
from atp_ros.warehouse.cell.model.recipe import (
    NUM_PATCHES,
    Recipe,
    bf16_forward,
    llava_feature_layers,
    plain_forward,
)
from atp_ros.warehouse.cell.noise import MORE_TEMPLATES, perturb, reword
from atp_ros.warehouse.cell.questions import Question, contrast_questions, is_contrast
from atp_ros.warehouse.cell.truth import LABELS
from atp_ros.warehouse.train_llava import llava_config, llava_loss, pad_rows

if TYPE_CHECKING:
    from atp_ros.warehouse.cell.model.run import CellTrainer


# A prompt with the question before the image, so every image token is computed knowing the question
# (early fusion; recipe ``question_first``). Measured no better than llava-1.5's image-first order on the
# slot lookup (bench/results/cell_training.json, diagnosis_session_4), so the recipe keeps the image first.
QUESTION_FIRST_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + '\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def chat_template(r: Recipe) -> str:
    """The chat template the recipe trains with (and the checkpoint's processor ships)."""
    return QUESTION_FIRST_TEMPLATE if r.question_first else CHAT_TEMPLATE


class Prompts:
    """Token ids of the turns, split where the chat template puts the image."""

    def __init__(self, tok, template: str = CHAT_TEMPLATE) -> None:
        from jinja2 import Template

        self.tok = tok
        self.image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
        content = [{"type": "image"}, {"type": "text", "text": "{q}"}]
        text = Template(template).render(messages=[{"role": "user", "content": content}], add_generation_prompt=True)
        self.before, self.first_turn = text.split("<image>")  # the question is in one of the two

    def head(self, question: str) -> list[int]:
        """Ids before the image (the question's, when the template puts it first)."""
        return self.tok(self.before.replace("{q}", question), add_special_tokens=False)["input_ids"]

    def turn(self, question: str, answer: str, first: bool) -> tuple[list[int], int, int]:
        """Ids of one turn (text after the image for the first), the answer id and the answer's offset."""
        text = self.first_turn.replace("{q}", question) if first else f" USER: {question} ASSISTANT:"
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        ans = self.tok(answer, add_special_tokens=False)["input_ids"]
        assert len(ans) == 1, f"answer {answer!r} is not one token"
        return [*ids, ans[0], self.tok.eos_token_id], ans[0], len(ids)


def distractor_share(r: Recipe, step: int) -> float:
    """The share of non-evidence patches a training sequence keeps at ``step`` (the curriculum): from
    ``distractors_start`` up to 1 along a square ramp over the first ``distractor_ramp`` of the steps."""
    if r.distractor_ramp <= 0:
        return 1.0
    t = min(1.0, step / (r.distractor_ramp * r.llava_steps))
    return r.distractors_start + (1.0 - r.distractors_start) * t * t


# The share of non-evidence patches a phase-5 pruned sequence keeps, drawn uniformly: with the ~22 evidence
# patches of ten questions (of 256) that spans keeping about 0.12-0.45 of the image, ATP's 0.11-0.4.
PRUNED_OTHERS = (0.03, 0.4)
# Kinds a pruned sequence does not ask. "Is the aisle clear?" has no evidence when it is (only the blockers
# when it is not), so on a pruned image which patches are left would give the answer away. Leaving it out
# did not by itself bring the aisle back on full frames (docs/warehouse.md, the fourteenth attempt).
WHOLE_FRAME_KINDS = ("aisle",)


def kept_patches(rng: np.random.Generator, r: Recipe, evidence: np.ndarray, share: float) -> np.ndarray:
    """Image tokens one sequence keeps: every patch's index (sometimes a random 10-100% subset), or, while
    the curriculum runs (``share`` < 1), the turns' ``evidence`` patches plus ``share`` of the others."""
    if share < 1.0:
        others = np.flatnonzero(~evidence)
        picked = rng.choice(others, size=round(len(others) * share), replace=False)
        keep = np.sort(np.concatenate([np.flatnonzero(evidence), picked]).astype(int))
        return keep if len(keep) else np.sort(rng.choice(NUM_PATCHES, size=1))
    if rng.random() < r.drop_share:
        k = max(1, round(NUM_PATCHES * rng.uniform(0.1, 1.0)))
        return np.sort(rng.choice(NUM_PATCHES, size=k, replace=False))
    return np.arange(NUM_PATCHES)


def sequence_keep(
    rng: np.random.Generator, r: Recipe, masks: list[np.ndarray], share: float = 1.0, pruned: bool = False
) -> np.ndarray:
    """The sorted image-token indices one sequence keeps, given its turns' evidence ``masks`` (flat bool): the
    curriculum's ``share`` (below 1), else, when ``pruned``, the evidence plus a random :data:`PRUNED_OTHERS`
    share of the other patches, else :func:`kept_patches`' every patch or random subset."""
    evidence = np.logical_or.reduce([np.zeros(NUM_PATCHES, bool), *masks])
    if pruned and share >= 1.0:
        share = float(rng.uniform(*PRUNED_OTHERS))
    return kept_patches(rng, r, evidence, share)


def pruned_turns(questions: list[Question]) -> list[Question]:
    """The questions a pruned sequence asks: all but the :data:`WHOLE_FRAME_KINDS`."""
    return [q for q in questions if q.kind not in WHOLE_FRAME_KINDS]


def with_contrast(
    questions: list[Question], truth, rng: np.random.Generator, share: float, split: str
) -> list[Question]:
    """``questions`` with each turn replaced, at probability ``share``, by a question about an item that has a
    same-color twin of the other kind on the racking (:func:`~atp_ros.warehouse.cell.questions.contrast_questions`),
    wordings kept distinct; unchanged when the frame has no such pair."""
    pool = contrast_questions(truth, rng, len(questions), split)
    if not pool:
        return questions
    seen = {q.question for q in questions}
    out = []
    for q, c in zip(questions, pool, strict=True):
        if rng.random() < share and c.question not in seen:
            seen.add(c.question)
            out.append(c)
        else:
            out.append(q)
    return out


def llava_batch(
    prompts: Prompts,
    frames: Frames,
    idx,
    rng: np.random.Generator,
    r: Recipe,
    split: str = "train",
    share: float = 1.0,
    noise: float = 0.0,
    extra: float = 0.0,
    hard: tuple[str, ...] | None = None,
    pruned: float = 0.0,
    twins: float = 0.0,
    sup_contrast: bool = False,
    more: float = 0.0,
):
    """Token ids, original position ids, attention mask, kept patches, targets and evidence positions of a
    batch of sequences (see ``warehouse.train_llava.llava_batch``: the same layout). With the question first
    a sequence holds one question (the image tokens depend on it); otherwise ``llava_turns`` turns. ``extra``:
    the share of questions reworded with :data:`~atp_ros.warehouse.cell.noise.EXTRA_TEMPLATES`, then ``noise``
    the share perturbed by :func:`~atp_ros.warehouse.cell.noise.perturb`; ``split`` "test" words
    every question with a held-out phrasing (for measuring only). ``hard``: the kinds drawn twice as often
    (``r.hard_kinds`` when None). ``pruned``: the share of sequences (when ``share`` is 1) that keep their
    turns' evidence patches and a random :data:`PRUNED_OTHERS` share of the others (:func:`pruned_turns`).
    ``twins``: the share of turns replaced by :func:`with_contrast` (0 draws nothing more). ``sup_contrast``: the
    first turn that :func:`~atp_ros.warehouse.cell.questions.is_contrast` has its attention supervised too. ``more``:
    the share of questions then reworded with :data:`~atp_ros.warehouse.cell.noise.MORE_TEMPLATES`."""
    rows, positions, image_keep, targets, evidence = [], [], [], [], []
    turns = 1 if r.question_first else r.llava_turns
    for i in idx:
        truth = frames.truths[int(i)]
        prune = bool(pruned) and share >= 1.0 and rng.random() < pruned
        qs = draw_questions(truth, rng, turns, split, r.hard_kinds if hard is None else hard, held_out=split == "test")
        qs = with_contrast(qs, truth, rng, twins, split) if twins else qs
        qs = pruned_turns(qs) if prune else qs
        qs = [replace(q, question=reword(q.kind, q.slots, rng)) if extra and rng.random() < extra else q for q in qs]
        if more:  # no draw when off, so the earlier recipes' batches stay what they were
            qs = [
                replace(q, question=reword(q.kind, q.slots, rng, MORE_TEMPLATES)) if rng.random() < more else q
                for q in qs
            ]
        qs = [replace(q, question=perturb(q.question, rng)) if noise and rng.random() < noise else q for q in qs]
        head = prompts.head(qs[0].question if qs else "")
        masks = [patch_mask(q, truth) for q in qs]
        keep = sequence_keep(rng, r, masks, share, prune)
        contrast = [t for t, q in enumerate(qs) if sup_contrast and is_contrast(truth, q.kind, q.slots)]
        supervised = {*range(r.sup_turns), *contrast[:1]}
        ids = head + [prompts.image_id] * len(keep)
        pos = list(range(len(head))) + [len(head) + int(j) for j in keep]
        nxt = len(head) + NUM_PATCHES  # text after the image keeps its unpruned position
        slot_of = {int(j): len(head) + n for n, j in enumerate(keep)}
        tgt, ev_rows = [], []
        for t, q in enumerate(qs):
            tids, ans, off = prompts.turn(q.question, q.answer, first=(t == 0))
            start = len(ids)
            ids += tids
            pos += list(range(nxt, nxt + len(tids)))
            nxt += len(tids)
            tgt += [(start + off - 1, ans), (start + off, prompts.tok.eos_token_id)]
            seq = [slot_of[int(j)] for j in np.flatnonzero(masks[t]) if int(j) in slot_of]
            if seq and t in supervised:
                ev_rows.append((start + off - 1, seq))
        rows.append(ids)
        positions.append(pos)
        image_keep.append(keep)
        targets.append(tgt)
        evidence.append(ev_rows)
    return (*pad_rows(rows, positions, prompts.tok.pad_token_id), image_keep, targets, evidence)


def new_llava(r: Recipe, tok, clip):
    """A fresh LLaVA (warehouse-tiny's layout at the cell's 256 tokens) with the trained CLIP tower inside, frozen."""
    from transformers import LlavaForConditionalGeneration

    config = llava_config(r, tok, clip.config.vision_config)
    config.vision_feature_layer = llava_feature_layers(r)
    config.image_seq_length = NUM_PATCHES
    config.text_config.max_position_embeddings = 1024
    torch.manual_seed(r.seed + 3)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    model.model.vision_tower.requires_grad_(False)
    return model


def train_llava(
    trainer: CellTrainer,
    clip,
    train: tuple[Frames, Tensor],
    val: tuple[Frames, Tensor],
    progress: Progress,
    checkpoint_every_s: float,
    dialog_tower: Callable[[], tuple[object, Tensor, Tensor]] | None = None,
):
    """Phase 3 (and 4 and 5, when ``tune_steps`` and ``dialog_steps``), resumed from ``trainer.state`` and
    checkpointed into it; validation accuracy every 250 steps. ``dialog_tower`` gives phase 5's CLIP and its
    train and validation features when phase 5 reads another tower than phases 3 and 4 (``dialog_tower_steps``)."""
    r = trainer.r
    frames, feats = train
    model = new_llava(r, trainer.tok, clip)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=r.llava_lr, weight_decay=0.01)
    bf16_forward(model.model.language_model, replace(r, bf16=r.llava_bf16))
    prompts = Prompts(trainer.tok, chat_template(r))
    ema: list[float] = []

    def step_fn(
        noise: float,
        extra: float,
        schedule: bool,
        hard: tuple[str, ...] | None = None,
        turns: int = 0,
        pruned: float = 0.0,
        twins: float = 0.0,
        kind_weight: float = 0.0,
        sup_contrast: bool = False,
        more: float = 0.0,
        letter_weight: float = 0.0,
    ):
        rt = replace(r, llava_turns=turns) if turns else r
        kind_ids = {k: trainer.tok(k, add_special_tokens=False)["input_ids"][0] for k in ("box", "tote")}
        letter_ids = torch.tensor([trainer.tok(c.lower(), add_special_tokens=False)["input_ids"][0] for c in LABELS])

        def one_step(rng: np.random.Generator, step: int):
            idx = np.sort(rng.choice(len(frames), size=min(r.llava_batch, len(frames)), replace=False))
            share = distractor_share(r, step) if schedule else 1.0
            batch = llava_batch(
                prompts,
                frames,
                idx,
                rng,
                rt,
                share=share,
                noise=noise,
                extra=extra,
                hard=hard,
                pruned=pruned,
                twins=twins,
                sup_contrast=sup_contrast,
                more=more,
            )
            aux = None
            if kind_weight:
                labels = np.concatenate(
                    [kind_labels(frames.truths[int(i)], kind_ids)[k] for i, k in zip(idx, batch[3], strict=True)]
                )
                aux = (torch.from_numpy(labels), r.sup_layer, kind_weight)
            letters = None
            if letter_weight:
                labels = np.concatenate(
                    [letter_labels(frames.truths[int(i)])[k] for i, k in zip(idx, batch[3], strict=True)]
                )
                letters = (torch.from_numpy(labels), r.sup_layer, letter_weight, letter_ids)
            feats_b = feats[torch.as_tensor(idx)].float()
            loss, acc = llava_loss(model, feats_b, *batch, prompts.image_id, r, aux, letters)
            ema[:] = [acc if not ema else 0.98 * ema[0] + 0.02 * acc]
            info = f"loss {loss.item():.3f} acc~{ema[0]:.3f} distractors {share:.2f}"
            return loss, {"loss": loss.item(), "acc": acc, "distractors": round(share, 4)}, info

        return one_step

    def validate_every(steps: int):
        def validate(step: int) -> dict:
            if step % 250 and step != steps:
                return {}
            out = {
                "val_acc": val_accuracy(model, prompts, r, val),
                "val_held_out_acc": val_accuracy(model, prompts, r, val, held_out=True),
            }
            model.train()
            return out

        return validate

    phase = Phase("llava", r.llava_steps, r.llava_lr, stream=3)
    validate = validate_every(r.llava_steps)
    run_phase(trainer, phase, model, opt, step_fn(0.0, 0.0, True), progress, checkpoint_every_s, after_step=validate)
    if r.tune_steps:
        # Phase 4 goes on from phase 3's weights with a fresh optimizer and schedule, every patch, and
        # ``extra_phrasings`` of the questions in phrasings beyond the grammar's, ``question_noise`` perturbed
        # (see atp_ros.warehouse.cell.noise); ``tune_hard_kinds`` are drawn twice as often.
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=r.tune_lr, weight_decay=0.01)
        tune = Phase("tune", r.tune_steps, r.tune_lr, stream=4)
        run_phase(
            trainer,
            tune,
            model,
            opt,
            step_fn(r.question_noise, r.extra_phrasings, False, tuple(r.tune_hard_kinds)),
            progress,
            checkpoint_every_s,
            after_step=validate_every(r.tune_steps),
        )
    if r.dialog_steps and dialog_tower is not None:
        tower, feats, val_feats = dialog_tower()
        model.model.vision_tower.load_state_dict(tower.vision_model.state_dict())
        val = (val[0], val_feats)
    if r.dialog_steps:
        # Phase 5 goes on from phase 4's weights, fresh optimizer and schedule, phase 4's rewording, with
        # ``dialog_turns`` questions about the image per sequence (more answers per image token computed),
        # ``dialog_pruned`` of the sequences on a pruned image, ``dialog_twins`` of the turns about a same-color
        # box or tote where the frame has both (the first of them attention-supervised with ``dialog_sup_contrast``),
        # the image tokens' object-kind read-out at ``dialog_kind_weight`` and letter read-out at
        # ``dialog_letter_weight``, and ``dialog_hard_kinds`` (else phase
        # 4's) drawn twice as often.
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=r.dialog_lr, weight_decay=0.01)
        dialog = Phase("dialog", r.dialog_steps, r.dialog_lr, stream=5)
        hard = tuple(r.dialog_hard_kinds or r.tune_hard_kinds)
        one_step = step_fn(
            r.question_noise,
            r.extra_phrasings,
            False,
            hard,
            r.dialog_turns,
            r.dialog_pruned,
            r.dialog_twins,
            r.dialog_kind_weight,
            r.dialog_sup_contrast,
            r.dialog_more_phrasings,
            r.dialog_letter_weight,
        )
        after = validate_every(r.dialog_steps)
        run_phase(trainer, dialog, model, opt, one_step, progress, checkpoint_every_s, after_step=after)
    plain_forward(model.model.language_model)
    return model


@torch.no_grad()
def val_accuracy(model, prompts: Prompts, recipe: Recipe, val: tuple[Frames, Tensor], held_out: bool = False) -> float:
    """Answer accuracy on one question per validation frame, all image tokens: worded with training
    phrasings, or (``held_out``) with the phrasings only the test split uses (measured, never trained on)."""
    frames, feats = val
    model.eval()
    rng = np.random.default_rng(12345)
    r = Recipe(**{**recipe.__dict__, "llava_turns": 1, "drop_share": 0.0, "hard_kinds": ()})
    lm = model.model.language_model
    correct = total = 0
    for s in range(0, len(frames), 32):
        idx = np.arange(s, min(s + 32, len(frames)))
        ids, pos, mask, _, targets, _ = llava_batch(prompts, frames, idx, rng, r, split="test" if held_out else "val")
        embeds = lm.embed_tokens(ids)
        projected = model.model.multi_modal_projector(feats[torch.as_tensor(idx)].float().flatten(0, 1))
        embeds = embeds.masked_scatter((ids == prompts.image_id)[..., None].expand_as(embeds), projected)
        hidden = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
        for b, t in enumerate(targets):
            if t:
                correct += int(model.lm_head(hidden[b, t[0][0]]).argmax()) == t[0][1]
                total += 1
    return correct / max(total, 1)
