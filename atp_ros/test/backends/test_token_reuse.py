"""Token reuse (issue 22, level 3) through ``VlmBackend.answer(..., tower=...)`` on tiny random LLaVA
checkpoints (CLIP and SigLIP towers): re-running every patch is the stock forward, re-running none keeps
the cached states, a partial run touches only the changed rows, and families without it say so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from atp_ros.backends import AtpConfig, load_backend
from atp_ros.backends.partial import TowerReuse, encode_rows
from atp_ros.testing.tiny.llava import save_tiny_llava

QUESTION = "what color is the box on the left shelf?"
ATP = AtpConfig(keep_ratio=0.25)


@pytest.fixture(scope="module", params=["clip", "siglip"])
def backend(request, tmp_path_factory: pytest.TempPathFactory):
    path: Path = save_tiny_llava(tmp_path_factory.mktemp(f"reuse_{request.param}") / "ckpt", tower=request.param)
    return load_backend(str(path), device="cpu")


def frame(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def test_rows_recomputed_everywhere_are_the_stock_tower(backend) -> None:
    tower = backend.model.model.vision_tower
    px = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        stale = tower(torch.randn(1, 3, 64, 64), output_hidden_states=True).hidden_states
        want = tower(px, output_hidden_states=True).hidden_states
        for variant in ("eventful", "drop"):
            got, _ = encode_rows(tower, px, stale, torch.arange(want[0].shape[1]), variant)
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), variant
        # Eventful with cached keys/values gives what recomputing them from the cached states gives.
        rows = torch.tensor([0, 3, 4, 9])
        first, kv = encode_rows(tower, px, stale, rows)
        px2 = px.clone()
        px2[..., :8, :8] += 1.0
        fresh, _ = encode_rows(tower, px2, first, rows)
        reused, _ = encode_rows(tower, px2, first, rows, kv=kv)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fresh, reused, strict=True))
    with pytest.raises(ValueError, match="variant"):
        encode_rows(tower, px, stale, torch.arange(3), "sparse")


def test_answer_with_token_reuse(backend) -> None:
    grid = backend.grid
    still, moved = frame(0), frame(0)
    moved[:16, :16] = 255 - moved[:16, :16]  # the top-left corner changes
    plain = backend.answer([moved], QUESTION, ATP, max_new_tokens=3)

    cache = TowerReuse()
    first = backend.answer([still], QUESTION, ATP, max_new_tokens=3, tower=cache)
    assert cache.states is not None and cache.recomputed is None, "no cached states yet: the whole tower ran"
    full_states = cache.states

    # Every patch changed: the stock forward, so exactly the answer and keep mask of a plain call.
    cache.changed = np.ones(grid, dtype=bool)
    every = backend.answer([moved], QUESTION, ATP, max_new_tokens=3, tower=cache)
    assert cache.recomputed is None and cache.kv is None, "above WHOLE_TOWER_ABOVE the whole tower runs"
    assert every.generated_ids == plain.generated_ids
    assert np.array_equal(every.keep_mask(0), plain.keep_mask(0))

    # Nothing changed: the cached states come back untouched (CLS, when there is one, is re-run).
    cache.states, cache.changed = full_states, np.zeros(grid, dtype=bool)
    same = backend.answer([still], QUESTION, ATP, max_new_tokens=3, tower=cache)
    assert cache.recomputed == 0
    assert same.generated_ids == first.generated_ids
    patches = slice(int(backend.has_cls), None)
    assert torch.equal(cache.states[-1][:, patches], full_states[-1][:, patches])

    # Some patches changed: only their rows differ from the cached states.
    changed = np.zeros(grid, dtype=bool)
    changed[:2, :2] = True
    cache.states, cache.changed = full_states, changed
    backend.answer([moved], QUESTION, ATP, max_new_tokens=3, tower=cache)
    assert cache.recomputed == 4
    differs = (cache.states[-1][0, patches] != full_states[-1][0, patches]).any(-1).reshape(grid).numpy()
    assert differs[:2, :2].all() and not differs[~changed].any()
    assert cache.states[-1] is not full_states[-1], "the cached tuple is never written in place"

    with pytest.raises(ValueError, match="one image"):
        backend.answer([still, still], QUESTION, ATP, tower=TowerReuse())


def test_families_without_token_reuse_refuse_it(tmp_path: Path) -> None:
    from atp_ros.testing.tiny.blip2 import save_tiny_blip2

    backend = load_backend(str(save_tiny_blip2(tmp_path / "blip2")), device="cpu")
    assert not backend.supports_token_reuse
    with pytest.raises(ValueError, match="not implemented for the blip-2 family"):
        backend.answer([frame()], QUESTION, ATP, tower=TowerReuse())
