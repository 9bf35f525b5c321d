"""The cell model's trainer end to end in --quick mode: checkpoint loads with both ATP signals, answers with
ATP on, a finished run is not retrained, and the checkpoint stays within the size limit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("atp_ros.warehouse.cell.scene")  # sets MUJOCO_GL (egl) before MuJoCo loads

from atp_ros.backends import AtpConfig, load_backend
from atp_ros.warehouse.cell.episodes import random_still
from atp_ros.warehouse.cell.model.__main__ import main
from atp_ros.warehouse.cell.model.recipe import (
    NUM_PATCHES,
    Recipe,
    bf16_forward,
    native_bf16,
    plain_forward,
    tower_precision,
)

MAX_MB = 40


def test_quick_train_loads_answers_and_resumes(tmp_path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    assert main(["--out", str(out), "--work", str(work), "--quick"]) == 0

    report = json.loads((out / "metrics.json").read_text())
    assert set(report["settings"]) == {"full", "atp_0.25", "atp_0.11", "random_0.11"}
    assert report["settings"]["atp_0.25"]["tokens_kept"] == pytest.approx(0.25 * NUM_PATCHES, abs=1)
    # Contrast questions (a same-color box and tote on the racking) are scored apart from their kinds' others.
    split = report["settings"]["full"]["contrast"]
    assert set(split) == {"contrast", "same_kinds_otherwise"}
    assert 0 < split["contrast"]["n"] + split["same_kinds_otherwise"]["n"] <= report["settings"]["full"]["n"]
    assert report["tower_precision"] == ("bfloat16" if native_bf16() else "float32")
    assert (out / "learning_curve.png").stat().st_size > 0
    assert (out / "atp_text_tower" / "config.json").is_file()
    assert sum(f.stat().st_size for f in out.rglob("*.safetensors")) <= MAX_MB * 1e6
    # Phase 4 (reworded questions) runs after the LLaVA phase; both validate on held-out phrasings too.
    rows = [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows if x["phase"] == "tune"] == [1, 2]
    assert [x["step"] for x in rows if x["phase"] == "dialog"] == [1, 2], "phase 5 after phase 4"
    assert all("val_held_out_acc" in x for x in rows if x["phase"] in ("llava", "tune", "dialog") and "val_acc" in x)

    backend = load_backend(str(out), device="cpu")
    assert backend.joint is not None, "the atp_text_tower/ CLIP must load for S_inter"
    frame = random_still(123, width=640, height=480)
    result = backend.answer(
        [frame.rgb],
        ["what color is the box on the top shelf in slot two?"],
        AtpConfig(keep_ratio=0.25),
        max_new_tokens=3,
    )
    assert result.visual_tokens_total == [NUM_PATCHES]
    assert result.visual_tokens_kept == [round(0.25 * NUM_PATCHES)]
    assert isinstance(result.answers[0], str)

    # A finished run is found, not retrained: the log and the weights stay as they were.
    log = (work / "train_log.jsonl").read_text()
    weights = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["--out", str(out), "--work", str(work), "--quick"]) == 0
    assert (work / "train_log.jsonl").read_text() == log
    assert (out / "model.safetensors").stat().st_mtime_ns == weights

    # Without the checkpoint, a rerun rebuilds it from the saved state (frames from their cache, no step retrained).
    shutil.rmtree(out)
    assert main(["--out", str(out), "--work", str(work), "--quick"]) == 0
    assert (work / "train_log.jsonl").read_text() == log
    assert (out / "metrics.json").is_file()


def test_init_from_a_checkpoint_runs_only_phase_5_and_a_phase_5_change_reruns_only_it(tmp_path, capsys) -> None:
    first, out, work = tmp_path / "first", tmp_path / "out", tmp_path / "work"
    assert main(["--out", str(first), "--work", str(tmp_path / "w0"), "--quick", "--set", "dialog_steps=0"]) == 0

    # Phases 1-4 come from the checkpoint: the new run's log holds phase 5 only, and its output loads.
    assert main(["--out", str(out), "--work", str(work), "--quick", "--init-from", str(first)]) == 0
    phases = [json.loads(line)["phase"] for line in (work / "train_log.jsonl").read_text().splitlines()]
    assert phases == ["dialog", "dialog"]
    assert load_backend(str(out), device="cpu").joint is not None

    # Another phase 5 (more turns, contrast turns, the kind read-outs, the tower touched up) retrains phase 5
    # alone, from the same phase-4 weights.
    shutil.rmtree(out)
    more = ["--set", "dialog_turns=3", "--set", "dialog_twins=0.5", "--set", "dialog_kind_weight=0.5"]
    more += ["--set", "dialog_letter_weight=0.5"]
    more += ["--set", "dialog_tower_steps=2", "--set", "dialog_tower_letter_weight=5"]
    more += ["--set", "dialog_hard_kinds=holding,empty_slot"]
    assert main(["--out", str(out), "--work", str(work), "--quick", *more]) == 0
    assert json.loads((out / "recipe.json").read_text())["dialog_hard_kinds"] == ["holding", "empty_slot"]
    assert "restarting phase 5" in capsys.readouterr().out
    rows = [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]
    assert [x["phase"] for x in rows] == ["retower", "retower", "dialog", "dialog"]
    assert all("kind" in x for x in rows[:2])
    # The touched tower is the one the LLaVA reads and the one ATP's text tower pairs with.
    from safetensors.torch import load_file

    def tower(ckpt):
        llava = {k.split("vision_tower.", 1)[1]: v for k, v in load_file(ckpt / "model.safetensors").items()
                 if "vision_tower." in k}  # fmt: skip
        clip = {k.split("vision_model.", 1)[1]: v for k, v in load_file(ckpt / "atp_text_tower" / "model.safetensors")
                .items() if k.startswith("vision_model.")}  # fmt: skip
        return llava, clip

    touched, paired = tower(out)
    before, _ = tower(first)
    assert touched.keys() == paired.keys() and all(torch.equal(touched[k], paired[k]) for k in touched)
    assert any(not torch.equal(touched[k], before[k].to(touched[k].dtype)) for k in touched)

    # A checkpoint of another recipe (before phase 5) is refused with one line, nothing trained.
    with pytest.raises(SystemExit) as refused:
        main(["--out", str(tmp_path / "o2"), "--work", str(tmp_path / "w2"), "--quick", "--set", "tune_lr=1e-3",
              "--init-from", str(first)])  # fmt: skip
    assert "another recipe up to phase 4 (tune_lr)" in str(refused.value.code)
    assert not (tmp_path / "w2" / "train_log.jsonl").exists()
    with pytest.raises(SystemExit) as missing:
        main(["--quick", "--init-from", str(tmp_path / "nowhere")])
    assert missing.value.code == 2 and "no such checkpoint directory" in capsys.readouterr().err


def test_recipe_overrides_are_typed_and_a_bad_one_is_one_message(capsys) -> None:
    from atp_ros.warehouse.cell.model.__main__ import recipe_overrides

    got = recipe_overrides(["bf16=false", "llava_turns=6", "hard_kinds=where,count", "llava_lr=5e-4"])
    assert got == {"bf16": False, "llava_turns": 6, "hard_kinds": ("where", "count"), "llava_lr": 5e-4}
    for bad, says in (
        (["--set", "nope=1"], "FIELD=VALUE"),
        (["--set", "bf16=maybe"], "is not a bool"),
        (["--set", "dialog_hard_kinds=holding,holdng"], "'holdng' is not a question kind"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["--quick", *bad])
        assert exit_info.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize(
    ("native", "asked", "expect"), [(False, True, "float32"), (True, True, "bfloat16"), (True, False, "float32")]
)
def test_towers_autocast_to_bfloat16_only_where_asked_and_the_cpu_computes_it_natively(
    monkeypatch, native: bool, asked: bool, expect: str
) -> None:
    # The CPU's capability is what varies between machines; the probes torch exposes stand in for it here.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    r = Recipe(bf16=asked)
    assert tower_precision(r) == expect
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(64, 64), torch.randn(8, 64)
    exact = layer(x)
    bf16_forward(layer, r)
    try:
        got = layer(x)
    finally:
        plain_forward(layer)
    assert got.dtype == torch.float32, "outputs come back in float32 for the losses"
    if expect == "float32":
        assert torch.equal(got, exact)
    else:
        assert not torch.equal(got, exact)
        torch.testing.assert_close(got, exact, atol=0.05, rtol=0.05)
    assert torch.equal(layer(x), exact), "plain_forward restores the class's forward"


def test_grounding_targets_name_each_visible_shelf_objects_slot_and_letter() -> None:
    import numpy as np
    from atp_ros.warehouse.cell.model.ground_phase import IGNORE, NO_LABEL, NO_SLOT, patch_targets
    from atp_ros.warehouse.cell.model.recipe import GRID
    from atp_ros.warehouse.cell.truth import LABELS, LEVELS, SLOTS

    checked = 0
    for seed in range(6):
        truth = random_still(seed, width=640, height=480).truth
        slot, label = patch_targets(truth)
        assert slot.shape == label.shape == (NUM_PATCHES,)
        assert (slot == NO_SLOT).any(), "walls and floor are no slot"
        for o in truth.objects:
            if o.place != "shelf" or o.box is None or o.visible_fraction < 0.6:
                continue
            x0, y0, x1, y1 = o.box
            cx, cy = (x0 + x1) / 2 / truth.width, (y0 + y1) / 2 / truth.height
            center = int(cy * GRID) * GRID + int(cx * GRID)
            if slot[center] == LEVELS.index(o.level) * len(SLOTS) + SLOTS.index(o.slot):
                want = LABELS.index(o.label) if o.label else NO_LABEL
                assert label[center] == want
                checked += 1
        assert set(np.unique(label)) <= {IGNORE, NO_LABEL, *range(len(LABELS))}
    assert checked >= 10, "most visible shelf objects own their center patch"


def test_curriculum_keeps_every_evidence_patch_and_grows_the_distractors_to_all() -> None:
    import numpy as np
    from atp_ros.warehouse.cell.model.llava_phase import distractor_share, kept_patches
    from atp_ros.warehouse.cell.model.recipe import Recipe

    r = Recipe(llava_steps=1000, distractors_start=0.05, distractor_ramp=0.5, drop_share=0.0)
    shares = [distractor_share(r, s) for s in (0, 125, 250, 499, 500, 999)]
    assert shares[0] == pytest.approx(0.05) and shares[-2:] == [1.0, 1.0]
    assert shares == sorted(shares) and shares[1] < 0.2, "the square ramp lingers where distractors are few"
    assert distractor_share(Recipe(distractor_ramp=0.0), 0) == 1.0, "ramp 0: no curriculum"

    rng = np.random.default_rng(0)
    evidence = np.zeros(NUM_PATCHES, dtype=bool)
    evidence[[5, 6, 21, 200]] = True
    keep = kept_patches(rng, r, evidence, share=0.1)
    assert set(np.flatnonzero(evidence)) <= set(keep.tolist())
    assert len(keep) == 4 + round(0.1 * (NUM_PATCHES - 4)) and list(keep) == sorted(set(keep.tolist()))
    assert list(kept_patches(rng, r, evidence, share=1.0)) == list(range(NUM_PATCHES))
    assert len(kept_patches(rng, r, np.zeros(NUM_PATCHES, dtype=bool), share=0.0)) == 1, "never an empty image"


def test_phase_5_pruned_sequences_keep_every_evidence_patch_and_a_share_of_the_rest() -> None:
    import numpy as np
    from atp_ros.warehouse.cell.model.llava_phase import PRUNED_OTHERS, pruned_turns, sequence_keep
    from atp_ros.warehouse.cell.model.recipe import Recipe
    from atp_ros.warehouse.cell.questions import questions_for

    r = Recipe(drop_share=0.0)
    rng = np.random.default_rng(1)
    masks = [np.zeros(NUM_PATCHES, dtype=bool) for _ in range(3)]
    masks[0][[3, 4]] = True
    masks[1][[100, 101, 117]] = True  # the third turn has no evidence patch (e.g. "is the aisle clear?")
    evidence = {3, 4, 100, 101, 117}
    others = NUM_PATCHES - len(evidence)
    sizes = []
    for _ in range(50):
        keep = sequence_keep(rng, r, masks, pruned=True)
        assert evidence <= set(keep.tolist()) and list(keep) == sorted(set(keep.tolist()))
        sizes.append(len(keep) - len(evidence))
    lo, hi = PRUNED_OTHERS
    assert round(lo * others) <= min(sizes) and max(sizes) <= round(hi * others)
    assert max(sizes) - min(sizes) > 0.1 * others, "the kept share varies from sequence to sequence"
    assert list(sequence_keep(rng, r, masks, pruned=False)) == list(range(NUM_PATCHES)), "unpruned: every patch"
    keep = sequence_keep(rng, r, masks, share=0.0, pruned=True)
    assert set(keep.tolist()) == evidence, "the curriculum's share wins while it runs"

    # A clear aisle has no evidence patch, so a pruned image would give its answer away: never asked there.
    truth = random_still(11).truth
    qs = questions_for(truth, rng, 60, "train")
    assert {q.kind for q in qs} >= {"aisle", "count"}
    kept = pruned_turns(qs)
    assert "aisle" not in {q.kind for q in kept} and kept == [q for q in qs if q.kind != "aisle"]


def test_question_first_prompt_matches_what_the_processor_renders(tmp_path) -> None:
    from atp_ros.warehouse.cell.model.llava_phase import QUESTION_FIRST_TEMPLATE, Prompts
    from atp_ros.warehouse.cell.model.recipe import make_tokenizer
    from jinja2 import Template

    tok = make_tokenizer(tmp_path)
    prompts = Prompts(tok, QUESTION_FIRST_TEMPLATE)
    question = "could you tell me what colour the box in bay two of the top shelf is?"
    content = [{"type": "image"}, {"type": "text", "text": question}]
    text = Template(QUESTION_FIRST_TEMPLATE).render(
        messages=[{"role": "user", "content": content}], add_generation_prompt=True
    )
    before, after = text.split("<image>")
    assert question in before, "the question comes before the image"
    ids, _, offset = prompts.turn(question, "red", first=True)
    assert prompts.head(question) == tok(before, add_special_tokens=False)["input_ids"]
    assert ids[:offset] == tok(after, add_special_tokens=False)["input_ids"]


def test_phase_5_contrast_turns_ask_about_items_whose_color_the_other_kind_shares() -> None:
    import numpy as np
    from atp_ros.warehouse.cell.model.llava_phase import with_contrast
    from atp_ros.warehouse.cell.questions import candidates, contrast_questions, questions_for

    rng = np.random.default_rng(3)
    for seed in (9, 15, 20):  # frames with a same-color box and tote on the racking
        truth = random_still(seed).truth
        shelf = {(o.color, o.kind) for o in truth.objects if o.place == "shelf" and o.kind in ("box", "tote")}
        qs = contrast_questions(truth, rng, 40, "train")
        assert len(qs) == 40 and {q.kind for q in qs} >= {"where", "which_level", "exists"}
        for q in qs:
            refs = (q.slots["a"], q.slots["b"]) if q.kind == "left_right" else (q.slots,)
            other = {"box": "tote", "tote": "box"}
            assert any((ref["color"], other[ref["object_kind"]]) in shelf for ref in refs), q
            assert (q.slots, q.answer) in [(s, a) for s, a, _ in candidates(truth, q.kind)], "answers from the truth"
        # The answer is the named kind's place, not its same-color twin's.
        for q in (q for q in qs if q.kind == "where"):
            ref = q.slots
            items = [o for o in truth.objects if o.place == "shelf" and o.color == ref["color"]]
            named = [f"{o.level}-{o.slot}" for o in items if o.kind == ref["object_kind"]]
            twins = [f"{o.level}-{o.slot}" for o in items if o.kind != ref["object_kind"]]
            assert named == [q.answer] and twins and q.answer not in twins
        turns = questions_for(truth, rng, 10, "train")
        assert with_contrast(turns, truth, rng, 0.0, "train") == turns
        mixed = with_contrast(turns, truth, rng, 1.0, "train")
        assert len(mixed) == len(turns) and len({q.question for q in mixed}) == len(mixed), "wordings stay distinct"
        replaced = [q for q, t in zip(mixed, turns, strict=True) if q is not t]
        assert len(replaced) >= len(turns) // 2 and all(
            q.kind in ("where", "which_level", "exists", "left_right") for q in replaced
        )


def test_phase_5_kind_read_out_labels_each_shelf_items_patches_with_its_kind() -> None:
    import numpy as np
    from atp_ros.warehouse.cell.model.ground_phase import KIND_MIN_VISIBLE, kind_labels
    from atp_ros.warehouse.cell.model.recipe import GRID
    from atp_ros.warehouse.cell.questions import contrast_questions
    from atp_ros.warehouse.scenes import evidence_mask

    ids = {"box": 11, "tote": 12}
    truth = random_still(9).truth  # a same-color box and tote on the racking
    labels = kind_labels(truth, ids)
    assert labels.shape == (NUM_PATCHES,) and set(np.unique(labels)) == {-100, 11, 12}
    items = [o for o in truth.objects if o.place == "shelf" and o.kind in ids and o.box is not None]
    for o in items:
        mask = evidence_mask([o.box], (truth.height, truth.width), (GRID, GRID)).reshape(-1)
        own = labels[mask]
        if o.visible_fraction >= KIND_MIN_VISIBLE:
            assert set(own.tolist()) <= {ids[o.kind], -100} and (own == ids[o.kind]).any(), o
    covered = np.logical_or.reduce(
        [evidence_mask([o.box], (truth.height, truth.width), (GRID, GRID)).reshape(-1) for o in items]
    )
    assert (labels[~covered] == -100).all(), "patches showing no shelf item are not labelled"

    # Without a same-color box and tote on the racking there is no contrast question to ask.
    lone = random_still(5).truth
    assert contrast_questions(lone, np.random.default_rng(0), 5, "train") == []


def test_phase_5_letter_read_out_labels_each_readable_boxs_patches_with_its_letter() -> None:
    import numpy as np
    from atp_ros.warehouse.cell.model.ground_phase import LABEL_MIN_VISIBLE, letter_labels
    from atp_ros.warehouse.cell.model.recipe import GRID
    from atp_ros.warehouse.cell.truth import LABELS
    from atp_ros.warehouse.scenes import evidence_mask

    truth = random_still(9).truth
    labels = letter_labels(truth)
    assert labels.shape == (NUM_PATCHES,) and set(np.unique(labels)) <= {-100, *range(len(LABELS))}
    readable = [
        o
        for o in truth.objects
        if o.place == "shelf" and o.label is not None and o.box and o.visible_fraction >= LABEL_MIN_VISIBLE
    ]
    assert readable, "the still has letter-carrying boxes on the racking"
    named = {int(v) for v in labels[labels >= 0]}
    assert named <= {LABELS.index(o.label) for o in readable}
    for o in readable:
        mask = evidence_mask([o.box], (truth.height, truth.width), (GRID, GRID)).reshape(-1)
        assert (labels[mask] >= 0).any(), o
    shelf = [o for o in truth.objects if o.place == "shelf" and o.box]
    covered = np.logical_or.reduce(
        [evidence_mask([o.box], (truth.height, truth.width), (GRID, GRID)).reshape(-1) for o in shelf]
    )
    assert (labels[~covered] == -100).all(), "patches showing no shelf item are not labelled"


def test_phase_5_supervises_the_attention_of_the_first_contrast_turn(tmp_path) -> None:
    import numpy as np
    from atp_ros.warehouse.cell.model.data import Frames
    from atp_ros.warehouse.cell.model.llava_phase import Prompts, chat_template, llava_batch
    from atp_ros.warehouse.cell.model.recipe import Recipe, make_tokenizer, pixels

    r = Recipe(llava_turns=6, sup_turns=1)
    tok = make_tokenizer(tmp_path)
    prompts = Prompts(tok, chat_template(r))
    stills = [random_still(seed) for seed in (9, 15, 20)]  # each with a same-color box and tote on the racking
    frames = Frames(np.stack([pixels(s.rgb) for s in stills]), [s.truth for s in stills])
    idx = np.arange(len(frames))

    def supervised(sup_contrast: bool) -> list[list[int]]:
        # The answer-predicting positions whose attention is supervised, per sequence.
        batch = llava_batch(prompts, frames, idx, np.random.default_rng(7), r, twins=0.5, sup_contrast=sup_contrast)
        return [[pos for pos, _ in rows] for rows in batch[-1]]

    plain, with_contrast_turn = supervised(False), supervised(True)
    assert all(len(rows) <= 1 for rows in plain), "sup_turns=1: the first turn only"
    # The same draws, so the same sequences; each gains its first contrast turn (all three frames have one).
    assert all(set(a) <= set(b) for a, b in zip(plain, with_contrast_turn, strict=True))
    assert sum(len(b) - len(a) for a, b in zip(plain, with_contrast_turn, strict=True)) >= 2


def test_phase_5_words_a_share_of_its_questions_with_the_second_extra_set(tmp_path) -> None:
    import re

    import numpy as np
    from atp_ros.warehouse.cell.model.data import Frames
    from atp_ros.warehouse.cell.model.llava_phase import Prompts, chat_template, llava_batch
    from atp_ros.warehouse.cell.model.recipe import Recipe, make_tokenizer, pixels
    from atp_ros.warehouse.cell.noise import MORE_TEMPLATES

    r = Recipe(llava_turns=6)
    tok = make_tokenizer(tmp_path)
    prompts = Prompts(tok, chat_template(r))
    stills = [random_still(seed) for seed in (9, 15, 20)]
    frames = Frames(np.stack([pixels(s.rgb) for s in stills]), [s.truth for s in stills])
    idx = np.arange(len(frames))

    def texts(more: float) -> list[str]:
        ids = llava_batch(prompts, frames, idx, np.random.default_rng(7), r, more=more)[0]
        return [tok.decode(row, skip_special_tokens=True) for row in ids.tolist()]

    # Each template as a pattern, its placeholders wildcards, to spot its renderings in a decoded sequence.
    patterns = [re.sub(r"\\\{[a-z_]+\\\}", ".+?", re.escape(t)) for ts in MORE_TEMPLATES.values() for t in ts]
    found = lambda text: sum(bool(re.search(p, text)) for p in patterns)  # noqa: E731
    # Off: none of its phrasings; on: most questions in them.
    assert sum(found(t) for t in texts(0.0)) == 0
    assert sum(found(t) for t in texts(1.0)) >= len(frames) * r.llava_turns // 2
