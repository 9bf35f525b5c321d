"""The backend contract, checked on every family's tiny checkpoint (one tester per family in ``backend_checks``).

Each checkpoint is built in-process, saved with ``save_pretrained`` and loaded back through
``atp_ros.backends.load_backend``, like a real one. What only one family does is tested in its
own ``test_backend_<family>.py``.
"""

from __future__ import annotations

import re
import shutil
import threading
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from atp_ros.backends import STAGES, AtpConfig, GenerationStopped, ModelLoadError, VlmBackend, VlmResult, load_backend
from atp_ros.backends.loading import TEXT_TOWER_SUBDIR
from backend_checks import MAX_NEW, QUESTIONS, TESTERS, FamilyTester, LmCalls, counted, outputs_of

B = len(QUESTIONS)


@pytest.fixture(scope="module", params=TESTERS, ids=lambda t: t.name)
def tester(request) -> FamilyTester:
    return request.param


# ---------------------------------------------------------------- loading


def test_loads_through_load_backend(tester, ckpt, backend) -> None:
    assert isinstance(backend, tester.backend_cls) and backend.family == tester.family
    assert backend.has_text_tower and backend.text_tower_id == str(ckpt / TEXT_TOWER_SUBDIR)
    assert backend.joint.vision_hidden == backend.vision_hidden
    assert backend.joint.encode_text("red box").shape == (backend.joint.embed_dim,)
    tester.check_grid(backend)
    assert backend.device.type == "cpu" and backend.dtype == torch.float32
    assert backend.model.config._attn_implementation == "sdpa"
    tester.check_loaded(backend)


def test_tiny_checkpoint_layout_and_determinism(tester, ckpt, tmp_path) -> None:
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()
    assert list((ckpt / TEXT_TOWER_SUBDIR).glob("*.safetensors"))
    again = tester.save(tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()


def test_load_errors_name_the_path(tester, tmp_path, ckpt) -> None:
    """Missing, empty and weightless checkpoints and a missing explicit text tower raise ModelLoadError."""
    missing, empty, no_weights = tmp_path / "does_not_exist", tmp_path / "empty", tmp_path / "no_weights"
    empty.mkdir()
    no_weights.mkdir()
    shutil.copy(ckpt / "config.json", no_weights / "config.json")
    for path in (missing, empty, no_weights):
        with pytest.raises(ModelLoadError, match=re.escape(str(path))):
            load_backend(str(path))
    with pytest.raises(ModelLoadError, match=re.escape(str(no_weights))):
        tester.backend_cls.from_pretrained(str(no_weights))
    with pytest.raises(ModelLoadError, match="text tower"):
        load_backend(str(ckpt), text_encoder_id=str(tmp_path / "no_tower_here"))


def test_missing_text_tower_runs_cls_only_with_note(tester, backend, ckpt, images, tmp_path) -> None:
    """A copy without its text tower runs CLS-only and says so; an explicit tower fixes it."""
    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare, ignore=shutil.ignore_patterns(TEXT_TOWER_SUBDIR))
    cls_only = load_backend(str(bare), device="cpu")
    assert not cls_only.has_text_tower
    assert cls_only.load_notes and "no text tower" in cls_only.load_notes[0]
    result = cls_only.answer(images, QUESTIONS, AtpConfig(alpha=0.7, keep_tokens=8), max_new_tokens=2)
    assert result.alpha_used == 0.0 and f"running {backend.intra_only}, alpha=0" in result.notes[0]
    assert result.selection.s_inter is None and result.selection.s_intra is not None
    assert result.visual_tokens_kept == [8] * B
    ref = backend.answer(images, QUESTIONS, AtpConfig(alpha=0.0, keep_tokens=8), max_new_tokens=2)
    assert ref.notes == []
    if not tester.intra_from_text_tower:  # same tower weights: CLS-only picks what the full backend picks
        assert len(result.notes) == 1 and result.selection.indices.tolist() == ref.selection.indices.tolist()
    else:  # SigLIP's probe came with the text tower: without it S_intra is received attention, noted
        assert len(result.notes) == 2 and "received attention" in result.notes[1]
    explicit = load_backend(str(bare), text_encoder_id=str(ckpt / TEXT_TOWER_SUBDIR), device="cpu")
    assert explicit.has_text_tower and explicit.load_notes == backend.load_notes
    assert explicit.answer(images, QUESTIONS, AtpConfig(keep_tokens=8), max_new_tokens=1).notes == []


# ---------------------------------------------------------------- exactness


KEEP_ALL = {
    "disabled": AtpConfig(enabled=False),
    "k_eq_n": AtpConfig(keep_ratio=1.0),
    "k_eq_n_compact": AtpConfig(keep_ratio=1.0, positions="compact"),
    "k_eq_n_received": AtpConfig(keep_tokens=4096, intra_signal="received"),  # K = min(4096, N_b) = N_b
}


@pytest.mark.parametrize("batch", [1, B])
@pytest.mark.parametrize("case", sorted(KEEP_ALL))
def test_keep_all_matches_stock_generate(tester, backend, images, case: str, batch: int) -> None:
    imgs, qs = images[:batch], QUESTIONS[:batch]
    ref = backend.reference_generate(imgs, qs, max_new_tokens=MAX_NEW)
    assert all(len(r) > 0 for r in ref)
    assert batch == 1 or ref[0] != ref[1]  # the inputs matter: a degenerate model would prove nothing
    result = backend.answer(imgs, qs, KEEP_ALL[case], max_new_tokens=MAX_NEW)
    assert result.generated_ids == ref
    totals = [h * w for h, w in tester.expected_grids(backend, imgs)]
    assert result.visual_tokens_total == result.visual_tokens_kept == totals
    if case == "disabled":
        assert result.selection.method == "keep_all"
    else:
        assert [result.selection.kept(b).tolist() for b in range(batch)] == [list(range(n)) for n in totals]


def check_exact(backend: VlmBackend, images: list[np.ndarray]) -> None:
    """Keep-all is token for token the stock ``generate`` and mass budgets match their masks."""
    reference = backend.reference_generate(images, QUESTIONS, max_new_tokens=MAX_NEW)
    for atp in (AtpConfig(enabled=False), AtpConfig(keep_ratio=1.0)):
        assert backend.answer(images, QUESTIONS, atp, max_new_tokens=MAX_NEW).generated_ids == reference
    result = backend.answer(images, QUESTIONS, AtpConfig(mass=0.5), max_new_tokens=MAX_NEW)
    assert all(int(result.keep_mask(b).sum()) == k for b, k in enumerate(result.visual_tokens_kept))
    assert result.timings.prefill > 0 and result.timings.decode > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_every_dtype_on_cpu_is_exact(tester, ckpt, images, dtype: str) -> None:
    backend = load_backend(str(ckpt), device="cpu", dtype=dtype)
    assert backend.dtype == getattr(torch, dtype)
    check_exact(backend, images)
    tester.check_dtype(backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_dtype_exact(tester, ckpt, images) -> None:
    backend = load_backend(str(ckpt))  # auto: CUDA, bf16 (or fp16)
    assert backend.device.type == "cuda" and backend.dtype in (torch.bfloat16, torch.float16)
    check_exact(backend, images)
    tester.check_dtype(backend)


# ---------------------------------------------------------------- what the LLM gets


@pytest.mark.parametrize("atp", [AtpConfig(keep_tokens=10, positions="compact"), AtpConfig(mass=0.5, alpha=0.0)])
def test_prefill_holds_text_plus_visual_tokens_and_the_kv_cache_that_many(tester, backend, images, atp) -> None:
    """Left padded, the LLM's prefill holds each prompt's text plus its visual tokens (LLaVA: the kept K;
    BLIP-2 and IDEFICS: the same whatever K is); the first decode step finds that many in the KV cache."""
    with LmCalls(tester.language_model(backend)) as lm:
        result = backend.answer(images, QUESTIONS, atp, max_new_tokens=MAX_NEW)
    kept = result.visual_tokens_kept
    assert kept == result.selection.lengths.tolist()
    assert result.consumer_tokens == [tester.always_fed(backend, result, b) + k for b, k in enumerate(kept)]
    assert result.text_tokens[0] != result.text_tokens[1]  # the questions differ in length: padding was exercised
    lengths = [t + tester.llm_image_tokens(backend, result, b) for b, t in enumerate(result.text_tokens)]
    mask, positions = lm.prefill["attention_mask"], lm.prefill["position_ids"]
    assert mask.shape[1] == lm.prefill_tokens().shape[1] == max(lengths)
    assert mask.sum(dim=1).tolist() == lengths
    assert mask[:, -1].all()  # every prompt ends where generation starts
    for b, length in enumerate(lengths):  # positions 0..len-1 on the real tokens
        if atp.positions in tester.position_modes and atp.positions == "compact":
            assert positions[b][mask[b].bool()].tolist() == list(range(length))
    assert lm.calls[1]["cached"] == max(lengths)
    assert result.flops["llm_tokens"] == pytest.approx(np.mean(lengths))
    if atp.mass:
        assert len(set(kept)) > 1, f"pick inputs whose adaptive budgets differ, got {kept}"


def test_position_modes_change_only_position_ids(tester, backend, images) -> None:
    """Same kept tokens, same sequence; only the position ids may differ, and only where visual tokens
    sit in the LLM's sequence (elsewhere the answers are the same)."""
    runs = {}
    for mode in ("compact", "original"):
        with LmCalls(tester.language_model(backend)) as lm:
            result = backend.answer(images, QUESTIONS, AtpConfig(keep_tokens=10, positions=mode), max_new_tokens=3)
        runs[mode] = (lm.prefill, lm.prefill_tokens(), result)
    (compact, tokens_c, res_c), (original, tokens_o, res_o) = runs["compact"], runs["original"]
    torch.testing.assert_close(tokens_o, tokens_c)
    assert torch.equal(original["attention_mask"], compact["attention_mask"])
    assert res_o.selection.indices.tolist() == res_c.selection.indices.tolist()
    if "compact" not in tester.position_modes:  # e.g. M-RoPE: original positions only, and a note says so
        assert torch.equal(original["position_ids"], compact["position_ids"])
        assert res_o.generated_ids == res_c.generated_ids and any("positions" in n for n in res_c.notes)
    elif tester.positions_matter:
        assert not torch.equal(original["position_ids"], compact["position_ids"])
    else:
        assert res_o.generated_ids == res_c.generated_ids


def test_each_image_alone_matches_the_padded_batch(tester, backend, images) -> None:
    """Per-sample budgets pad the batch; each image alone with its own K gives the same selection, the
    same consumer output and the same tokens."""
    atp = AtpConfig(mass=0.5)
    question = "where is the red box?"
    consumer = tester.consumer_output(backend)
    with outputs_of(*consumer) if consumer else nullcontext([]) as outputs:
        result = backend.answer(images, question, atp, max_new_tokens=MAX_NEW)
        batched = outputs[0] if consumer else None
        kept = result.visual_tokens_kept
        assert len(set(kept)) > 1, f"test needs different per-sample budgets, got {kept}"
        for b, k in enumerate(kept):
            single = backend.answer([images[b]], question, AtpConfig(keep_tokens=k), max_new_tokens=MAX_NEW)
            assert single.visual_tokens_kept == [k]
            assert torch.equal(single.selection.kept(0), result.selection.kept(b))
            assert single.generated_ids[0] == result.generated_ids[b]
            if consumer:
                torch.testing.assert_close(outputs[-1][0], batched[b], atol=1e-5, rtol=1e-5)
            alone = backend.answer([images[b]], question, atp, max_new_tokens=MAX_NEW)  # its own mass budget
            assert alone.visual_tokens_kept == [k] and alone.generated_ids[0] == result.generated_ids[b]


# ---------------------------------------------------------------- result contents


def test_result_contents(tester, backend, images) -> None:
    result = backend.answer(images, QUESTIONS, AtpConfig(keep_tokens=12), max_new_tokens=MAX_NEW)
    sel = result.selection
    grids = tester.expected_grids(backend, images)
    assert len(result.answers) == B and all(isinstance(a, str) for a in result.answers)
    assert [result.grid_of(b) for b in range(B)] == grids
    assert result.visual_tokens_total == [h * w for h, w in grids]
    assert len(result.views) == B
    for b in range(B):
        idx = sel.kept(b)
        assert int(sel.mask[b].sum()) == result.visual_tokens_kept[b] == 12
        assert torch.all(idx[1:] > idx[:-1])
        assert sel.mask_of(b).flatten().nonzero().flatten().tolist() == idx.tolist()
        assert result.keep_mask(b).shape == grids[b]
        assert result.keep_mask(b).dtype == np.uint8 and int(result.keep_mask(b).sum()) == 12
        assert result.score_grid(b).shape == grids[b]
    assert sel.s_intra.shape == sel.s_inter.shape == (B, max(result.visual_tokens_total))
    assert result.alpha_used == 0.5 and result.notes == []
    assert set(result.timings.as_dict()) >= set(STAGES)
    assert all(v >= 0 for v in result.timings.as_dict().values())


@pytest.mark.parametrize("atp", [AtpConfig(keep_tokens=8), AtpConfig(keep_ratio=0.3), AtpConfig(mass=0.6)])
def test_mask_sum_equals_kept(tester, backend, images, atp) -> None:
    result = backend.answer(images, QUESTIONS, atp, max_new_tokens=2)
    grids = tester.expected_grids(backend, images)
    assert result.visual_tokens_total == [h * w for h, w in grids]
    for b in range(B):
        mask = result.keep_mask(b)
        assert mask.shape == grids[b] and mask.dtype == np.uint8
        assert int(mask.sum()) == result.visual_tokens_kept[b] == int(result.selection.lengths[b])


def test_pruned_result_timings_and_flops(tester, backend, images) -> None:
    """Every stage is timed; the stages pruning shrinks cost less, the others the same as keep-all;
    ``pipeline`` is the sum of its parts; scoring costs what the selector runs."""
    pruned = backend.answer(images, QUESTIONS, AtpConfig(keep_tokens=8), max_new_tokens=MAX_NEW)
    full = backend.answer(images, QUESTIONS, AtpConfig(enabled=False), max_new_tokens=MAX_NEW)
    assert pruned.selection.s_inter is not None and pruned.selection.s_intra is not None
    assert pruned.text_tokens == full.text_tokens and all(t > 0 for t in pruned.text_tokens)
    for stage in STAGES:
        assert getattr(pruned.timings, stage) > 0, stage
    f, g = pruned.flops, full.flops
    for stage in ("projector", "llm_prefill"):
        assert (f[stage] < g[stage]) if stage in tester.shrinking else (f[stage] == g[stage]), stage
    key, stage = tester.unpruned
    assert f[key] == g[stage] == g[key]
    assert f["pipeline"] == pytest.approx(f["vision"] + f["scoring"] + f["projector"] + f["llm_prefill"])
    assert f["pipeline"] < g["pipeline"] + f["scoring"]
    cls_only = backend.answer(images, QUESTIONS, AtpConfig(alpha=0.0, keep_tokens=8), max_new_tokens=1)
    assert g["scoring"] == 0.0 < cls_only.flops["scoring"] < f["scoring"]  # the joint read-out is counted


def test_flops_match_torch_flop_counter(tester, ckpt) -> None:
    """The analytic FLOPs behind ``VlmResult.flops`` and ``make bench``'s tables equal what
    ``torch.utils.flop_counter`` counts on the real modules (eager attention, so the counter sees the
    attention matmuls a fused SDPA kernel would hide from it)."""
    backend = load_backend(str(ckpt), device="cpu")
    backend.model.set_attn_implementation("eager")
    for stage, (run, expected) in (tester.vision_flop_cases(backend) | tester.flop_cases(backend)).items():
        assert counted(run) == expected, stage


# ---------------------------------------------------------------- scoring choices


@pytest.mark.parametrize(
    ("selector", "alpha"), [("random", 0.0), ("uniform", 0.0), ("divprune", 0.0), ("text_only", 1.0), ("cls_only", 0.0)]
)
def test_selectors(backend, images, selector: str, alpha: float) -> None:
    result = backend.answer(images, QUESTIONS, AtpConfig(selector=selector, keep_tokens=6), max_new_tokens=1)
    assert result.visual_tokens_kept == [6] * B and result.selection.method == selector
    assert result.alpha_used == alpha


def test_received_signal(tester, backend, images) -> None:
    atp = AtpConfig(intra_signal="received", alpha=0.0, keep_tokens=6)
    result = backend.answer(images, QUESTIONS, atp, max_new_tokens=2)
    assert result.scoring.intra_signal == "received" and result.visual_tokens_kept == [6] * B
    s = result.selection.s_intra
    assert s.shape == (B, max(result.visual_tokens_total))
    assert all(torch.all(s[b, :n] > 0) for b, n in enumerate(result.visual_tokens_total))
    cls = backend.answer(images, QUESTIONS, AtpConfig(alpha=0.0, keep_tokens=6), max_new_tokens=2)
    if tester.default_intra == "received":  # no CLS and no probe: the family's S_intra is received attention
        assert cls.scoring.intra_signal == "received" and torch.equal(s, cls.selection.s_intra)
    else:
        assert not torch.allclose(s, cls.selection.s_intra)


def test_inter_readouts_are_used_or_noted(tester, backend, images) -> None:
    """maskclip / clearclip where the family implements them; elsewhere naive, with a note (never silent)."""
    inter = {}
    for readout in ("naive", "maskclip", "clearclip"):
        result = backend.answer(images, QUESTIONS, AtpConfig(alpha=1.0, inter_readout=readout), max_new_tokens=1)
        inter[readout] = result.selection.s_inter
        assert inter[readout].shape == (B, max(result.visual_tokens_total)) and torch.isfinite(inter[readout]).all()
        if tester.dense_readouts or readout == "naive":
            assert result.scoring.inter_readout == readout and result.notes == []
        else:
            assert result.scoring.inter_readout == "naive"
            assert any(f"inter_readout {readout!r}" in n for n in result.notes)
    if tester.dense_readouts:
        assert not torch.allclose(inter["naive"], inter["maskclip"])
        assert not torch.allclose(inter["maskclip"], inter["clearclip"])


def test_text_cache_hits_and_cls_only_skips_the_text_tower(backend, images) -> None:
    question = "is the aisle empty?"
    backend.answer(images[:1], question, AtpConfig(keep_tokens=8), max_new_tokens=1)
    hits, misses = backend.text_cache.hits, backend.text_cache.misses
    backend.answer(images[:1], question, AtpConfig(keep_tokens=8), max_new_tokens=1)
    assert backend.text_cache.hits == hits + 1 and backend.text_cache.misses == misses
    # A selector that does not use S_inter runs neither the text tower nor the joint read-out.
    for atp in (AtpConfig(alpha=0.0, keep_tokens=8), AtpConfig(selector="uniform", keep_tokens=8)):
        result = backend.answer(images[:2], ["a question asked only here", "and another one"], atp, max_new_tokens=1)
        assert result.selection.s_inter is None and result.alpha_used == 0.0
    assert backend.text_cache.misses == misses


def test_bad_inputs_are_rejected(backend, images) -> None:
    with pytest.raises(ValueError, match="questions"):
        backend.answer(images, QUESTIONS[:2], max_new_tokens=1)
    with pytest.raises(ValueError, match="HxWx3"):
        backend.answer([np.zeros((8, 8), np.uint8)], "what?", max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        backend.answer(images[:1], "what?", max_new_tokens=0)
    for bad in ({"positions": "sideways"}, {"inter_readout": "magic"}, {"intra_signal": "x"}, {"selector": "x"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            backend.answer(images[:1], QUESTIONS[0], AtpConfig(**bad))


# ---------------------------------------------------------------- calls that stop or overlap


def test_stop_hook_ends_the_call(backend, images) -> None:
    """``stop`` is asked before each stage and after every token: True at once stops before the model
    runs, True later ends the decode within a token; never True changes nothing."""
    atp = AtpConfig(keep_tokens=8)
    with pytest.raises(GenerationStopped, match="before the answer"):
        backend.answer(images, QUESTIONS, atp, max_new_tokens=MAX_NEW, stop=lambda: True)
    polls: list[int] = []

    def later() -> bool:
        polls.append(1)
        return len(polls) > 4  # 3 checks before generate, then one per token

    with pytest.raises(GenerationStopped, match="mid-decode after 2 new tokens"):
        backend.answer(images, QUESTIONS, atp, max_new_tokens=20, stop=later)
    plain = backend.answer(images, QUESTIONS, atp, max_new_tokens=MAX_NEW)
    never = backend.answer(images, QUESTIONS, atp, max_new_tokens=MAX_NEW, stop=lambda: False)
    assert never.generated_ids == plain.generated_ids


def test_concurrent_calls_match_sequential(backend, images) -> None:
    """Calls from several threads at once (the node's service and worker) give what the same calls give
    one after another: the capture hooks of one call never see another call's tensors."""
    jobs = [([images[i]], QUESTIONS[i], AtpConfig(keep_tokens=4 + 3 * i)) for i in range(len(images))] * 3
    expected = [backend.answer(imgs, q, atp, max_new_tokens=3) for imgs, q, atp in jobs]
    got: list[VlmResult | None] = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(j: int) -> None:
        try:
            imgs, q, atp = jobs[j]
            got[j] = backend.answer(imgs, q, atp, max_new_tokens=3)
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(j,)) for j in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for want, have in zip(expected, got, strict=True):
        assert have is not None
        assert have.generated_ids == want.generated_ids
        assert have.selection.indices.tolist() == want.selection.indices.tolist()
