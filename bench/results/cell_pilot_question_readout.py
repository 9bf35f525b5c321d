"""Pilot (not in the repo): the cell LLaVA phase with an auxiliary loss that reads the question's meaning
(kind, level, slot, color, object kind) from the answer position's hidden state at the supervised layer,
so the query that must find "slot two of the top level" is taught what the question names.
Run: PYTHONPATH=atp_ros python bench/results/cell_pilot_question_readout.py
    --out out/warehouse-cell6 --work out/train-cell6 --set llava_steps=400
"""

import sys

import atp_ros.warehouse.cell.model.llava_phase as LP
import atp_ros.warehouse.train_llava as TL
import torch
import torch.nn.functional as F
from atp_ros.warehouse.cell.questions import KINDS
from atp_ros.warehouse.cell.truth import COLORS, LEVELS, OBJECT_KINDS, SLOTS

FIELDS = {"kind": KINDS, "level": LEVELS, "slot": SLOTS, "color": COLORS, "object_kind": OBJECT_KINDS}
WEIGHT = 1.0
DRAWN = []


class QHeads(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(dim, len(v) + 1) for k, v in FIELDS.items()})


_new = LP.new_llava


def new_llava(r, tok, clip):
    m = _new(r, tok, clip)
    m.q_aux = QHeads(r.lm_hidden)
    return m


LP.new_llava = new_llava

_draw = LP.draw_questions


def draw(truth, rng, n, split, hard):
    qs = _draw(truth, rng, n, split, hard)
    DRAWN.append(qs)
    return qs


LP.draw_questions = draw

_batch = LP.llava_batch


def llava_batch(*a, **k):
    DRAWN.clear()
    out = _batch(*a, **k)
    LAST[:] = [list(DRAWN)]
    return out


LAST = []
LP.llava_batch = llava_batch


def llava_loss(model, feats, ids, pos, mask, image_keep, targets, evidence, image_token_id, r):
    """warehouse.train_llava.llava_loss plus the question read-out loss, from the same forward."""
    lm = model.model.language_model
    embeds = lm.embed_tokens(ids)
    kept = torch.cat([feats[b, torch.as_tensor(k)] for b, k in enumerate(image_keep)])
    projected = model.model.multi_modal_projector(kept.float())
    embeds = embeds.masked_scatter((ids == image_token_id)[..., None].expand_as(embeds), projected)
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    hidden = out.last_hidden_state
    rows = torch.tensor([b for b, t in enumerate(targets) for _ in t])
    cols = torch.tensor([p for t in targets for p, _ in t])
    gold_ids = torch.tensor([a for t in targets for _, a in t])
    logits = model.lm_head(hidden[rows, cols])
    loss = F.cross_entropy(logits, gold_ids)
    acc = (logits.argmax(-1) == gold_ids)[0::2].float().mean()
    if r.sup_weight > 0:
        sup = TL.attention_to_evidence_loss(lm, out.hidden_states[r.sup_layer], pos, evidence, r.sup_layer, r.sup_heads)
        loss = loss + r.sup_weight * sup
    if hasattr(model, "q_aux") and LAST:
        drawn = LAST[0]
        h = out.hidden_states[r.sup_layer]
        rr, cc, gold = [], [], {k: [] for k in FIELDS}
        for b, t in enumerate(targets):
            for turn, q in enumerate(drawn[b]):
                rr.append(b)
                cc.append(t[2 * turn][0])
                slots = dict(q.slots)
                gold["kind"].append(KINDS.index(q.kind))
                for k in ("level", "slot", "color", "object_kind"):
                    v = slots.get(k)
                    gold[k].append(FIELDS[k].index(v) if v in FIELDS[k] else len(FIELDS[k]))
        x = h[torch.tensor(rr), torch.tensor(cc)]
        aux = sum(F.cross_entropy(model.q_aux.heads[k](x), torch.tensor(v)) for k, v in gold.items())
        loss = loss + WEIGHT * aux
    return loss, float(acc)


LP.llava_loss = llava_loss

from atp_ros.warehouse.cell.model.__main__ import main  # noqa: E402

sys.exit(main())
