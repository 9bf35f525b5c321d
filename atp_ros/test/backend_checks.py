"""Checks shared by the backend tests whose tiny checkpoints keep CLS + K ViT tokens (BLIP-2, IDEFICS).

Both tiny checkpoints see an 8 x 8 patch grid (64 patches plus CLS) and are loaded on the CPU
through ``load_backend``. The ``check_*`` functions hold the assertions every such family
must pass; each test file adds what is particular to its family.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from atp_ros.backends import STAGES, AtpConfig, ModelLoadError, VlmBackend, VlmResult, load_backend
from atp_ros.backends.loading import TEXT_TOWER_SUBDIR
from atp_ros.method import Selection

MAX_NEW = 5
QUESTIONS = ["where is the red box?", "how many pallets are on the shelf?", "is the aisle empty?"]
N = 64  # patches per image: (32 px / patch 4) ** 2


def frames() -> list[np.ndarray]:
    """Three random RGB frames of different sizes: the processor resizes each to the tower's 32 px."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 50), (32, 32), (64, 48))]


class Hooks:
    """Holds hook handles and removes them when the ``with`` block ends."""

    def __init__(self) -> None:
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


class ForwardInputs(Hooks):
    """Forward hooks keeping the first positional input of each hooked module, per call, in :attr:`seen`."""

    def __init__(self, **modules: torch.nn.Module) -> None:
        super().__init__()
        self.seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        self.handles = [m.register_forward_hook(self._keep(name)) for name, m in modules.items()]

    def _keep(self, name: str):
        def hook(_module, args, _out) -> None:
            self.seen[name].append(args[0])

        return hook


@contextmanager
def outputs_of(module: torch.nn.Module, pick: Callable = lambda out: out) -> Iterator[list]:
    """``pick(output)`` of every forward of ``module`` during the block (the output itself is not replaced)."""
    seen: list = []

    def hook(_module, _args, out) -> None:
        seen.append(pick(out))

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def assert_cls_plus_kept(seen: torch.Tensor, states: torch.Tensor, selection: Selection) -> None:
    """Row b of ``seen`` is the CLS token plus the selected patches of ViT ``states`` ``(B, 1+N, D)`` row b."""
    for b in range(states.shape[0]):
        torch.testing.assert_close(seen[b], torch.cat([states[b, :1], states[b, 1 + selection.kept(b)]]))


def check_keep_all_matches_stock(backend: VlmBackend, images: list[np.ndarray], atp: AtpConfig) -> None:
    """Keeping every token generates exactly what the stock ``generate`` does."""
    reference = backend.reference_generate(images, QUESTIONS, max_new_tokens=MAX_NEW)
    result = backend.answer(images, QUESTIONS, atp, max_new_tokens=MAX_NEW)
    assert result.generated_ids == reference
    assert result.visual_tokens_kept == [N] * 3
    assert all(len(ids) >= 1 for ids in reference)


def check_each_alone_matches_batch(
    backend: VlmBackend, images: list[np.ndarray], question: str, result: VlmResult, outputs: list[torch.Tensor]
) -> None:
    """Each image alone with its own K (no padding) picks the same patches as inside the padded batch
    ``result``, and the hooked module's ``outputs`` (batch first, then each single run) agree."""
    kept = result.visual_tokens_kept
    assert len(set(kept)) > 1, f"test needs different per-sample budgets, got {kept}"
    for b, k in enumerate(kept):
        single = backend.answer([images[b]], question, AtpConfig(keep_tokens=k), max_new_tokens=1)
        assert torch.equal(single.selection.kept(0), result.selection.kept(b))
        torch.testing.assert_close(outputs[-1][0], outputs[0][b], atol=1e-5, rtol=1e-5)


def check_mask_sum_equals_kept(backend: VlmBackend, images: list[np.ndarray], atp: AtpConfig) -> None:
    result = backend.answer(images, QUESTIONS, atp, max_new_tokens=2)
    assert result.visual_tokens_total == N and result.grid == (8, 8)
    for b in range(3):
        mask = result.keep_mask(b)
        assert mask.shape == (8, 8) and mask.dtype == np.uint8
        assert int(mask.sum()) == result.visual_tokens_kept[b] == int(result.selection.lengths[b])


def check_pruned_result(backend: VlmBackend, images: list[np.ndarray]) -> tuple[VlmResult, VlmResult]:
    """Timings, FLOPs and the text cache of a pruned call against a keep-all one: ``(pruned, full)``.

    The pruned stage (Q-Former / resampler) costs less; the LLM prefill does not change with K.
    """
    pruned = backend.answer(images, QUESTIONS, AtpConfig(keep_tokens=8), max_new_tokens=MAX_NEW)
    full = backend.answer(images, QUESTIONS, AtpConfig(enabled=False), max_new_tokens=MAX_NEW)
    assert pruned.alpha_used == 0.5 and pruned.notes == []
    assert pruned.selection.s_inter is not None and pruned.selection.s_intra is not None
    assert len(pruned.answers) == 3 and all(isinstance(a, str) for a in pruned.answers)
    assert pruned.text_tokens == full.text_tokens and all(t > 0 for t in pruned.text_tokens)
    for stage in STAGES:
        assert getattr(pruned.timings, stage) > 0, stage
    f, g = pruned.flops, full.flops
    assert f["projector"] < f["projector_keep_all"] == g["projector"]
    assert f["llm_prefill"] == g["llm_prefill"]
    assert f["pipeline"] == pytest.approx(f["vision"] + f["scoring"] + f["projector"] + f["llm_prefill"])
    misses = backend.text_cache.misses
    backend.answer(images, QUESTIONS, AtpConfig(keep_tokens=8), max_new_tokens=1)
    assert backend.text_cache.misses == misses  # same questions: the text tower did not run again
    return pruned, full


def check_missing_text_tower(ckpt: Path, images: list[np.ndarray], bare: Path) -> None:
    """A copy of ``ckpt`` at ``bare`` without its text tower runs CLS-only and says so; an explicit tower fixes it."""
    shutil.copytree(ckpt, bare, ignore=shutil.ignore_patterns(TEXT_TOWER_SUBDIR))
    backend = load_backend(str(bare), device="cpu")
    assert not backend.has_text_tower
    result = backend.answer(images, QUESTIONS, AtpConfig(alpha=0.5, keep_tokens=8), max_new_tokens=2)
    assert result.alpha_used == 0.0
    assert len(result.notes) == 1 and "CLS-only" in result.notes[0]
    assert result.selection.s_inter is None and result.visual_tokens_kept == [8] * 3
    # An explicit text tower overrides the (missing) bundled one.
    with_tower = load_backend(str(bare), text_encoder_id=str(ckpt / TEXT_TOWER_SUBDIR), device="cpu")
    assert with_tower.has_text_tower
    assert with_tower.answer(images, QUESTIONS, AtpConfig(keep_tokens=8), max_new_tokens=1).notes == []


def check_load_errors(tmp_path: Path, ckpt: Path) -> None:
    """Missing, empty and weightless checkpoints and a missing explicit text tower raise ModelLoadError."""
    with pytest.raises(ModelLoadError):
        load_backend(str(tmp_path / "does_not_exist"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError):
        load_backend(str(empty))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(ckpt / "config.json", no_weights / "config.json")
    with pytest.raises(ModelLoadError):
        load_backend(str(no_weights))
    with pytest.raises(ModelLoadError, match="text tower"):
        load_backend(str(ckpt), text_encoder_id=str(tmp_path / "no_tower_here"))


def check_cuda_auto_dtype_exact(ckpt: Path, images: list[np.ndarray]) -> VlmBackend:
    """On CUDA with the auto dtype: keep-all is still exact and mass budgets still match their masks."""
    backend = load_backend(str(ckpt))  # auto: CUDA, bf16 (or fp16)
    assert backend.device.type == "cuda" and backend.dtype in (torch.bfloat16, torch.float16)
    reference = backend.reference_generate(images, QUESTIONS, max_new_tokens=MAX_NEW)
    disabled = backend.answer(images, QUESTIONS, AtpConfig(enabled=False), max_new_tokens=MAX_NEW)
    assert disabled.generated_ids == reference
    result = backend.answer(images, QUESTIONS, AtpConfig(mass=0.5), max_new_tokens=MAX_NEW)
    assert all(int(result.keep_mask(b).sum()) == k for b, k in enumerate(result.visual_tokens_kept))
    assert result.timings.prefill > 0 and result.timings.decode > 0
    return backend


def check_concurrent_calls_match_sequential(backend: VlmBackend, images: list[np.ndarray]) -> None:
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
