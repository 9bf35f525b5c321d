"""Change detection and the answer-reuse decision (issue 22) on rendered warehouse-cell frames."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("atp_ros.warehouse.cell.scene")  # sets MUJOCO_GL (egl) before MuJoCo loads

from atp_ros.stream import ReuseConfig, StreamCache, changed_patches, patch_signature
from atp_ros.stream.reuse import dilate
from atp_ros.warehouse.cell.episodes import random_still

GRID = (16, 16)
VIEW = (0.0, 0.0, 640.0, 480.0)


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    return random_still(11, width=640, height=480).rgb


def _sig(rgb: np.ndarray) -> np.ndarray:
    return patch_signature(rgb, VIEW, GRID)


def test_noise_and_lighting_are_not_change_but_a_new_object_is(frame) -> None:
    rng = np.random.default_rng(0)
    ref = _sig(frame)
    noisy = np.clip(frame + rng.normal(0, 4, frame.shape), 0, 255).astype(np.uint8)
    assert not changed_patches(ref, _sig(noisy)).any(), "sensor noise (sigma 4) is no change"
    for gain in (0.85, 1.1):  # an exposure step or a flicker of the lights
        lit = np.clip(frame.astype(np.float32) * gain, 0, 255).astype(np.uint8)
        assert not changed_patches(ref, _sig(lit)).any(), f"lighting x{gain} is no change"
    moved = frame.copy()
    moved[200:240, 300:340] = (255, 0, 0)  # a red box 40 px wide appears
    changed = changed_patches(ref, _sig(moved))
    rows, cols = np.nonzero(changed)
    assert changed.any() and changed.sum() <= 9
    assert rows.min() * 30 <= 240 and (rows.max() + 1) * 30 >= 200  # 480 / 16 = 30 px per patch row
    assert cols.min() * 40 <= 340 and (cols.max() + 1) * 40 >= 300


def test_a_view_reaching_past_the_frame_reads_black_there(frame) -> None:
    sig = patch_signature(frame, (0.0, -80.0, 640.0, 560.0), GRID)  # padded to a square
    assert sig.shape == (16, 16, 8, 8, 3)
    assert sig[0].max() == 0 and sig[-1].max() == 0 and sig[8].max() > 0
    for view in ((0.0, 19.5, 160.3, 140.2), (-0.4, -0.6, 639.7, 480.5)):  # fractional edges of a processor
        assert patch_signature(frame, view, (8, 10)).shape == (8, 10, 8, 8, 3)
    with pytest.raises(ValueError, match="empty view"):
        patch_signature(frame, (10.0, 10.0, 10.0, 20.0), GRID)


def test_reuse_only_while_question_and_watched_patches_hold(frame) -> None:
    cache = StreamCache(ReuseConfig(mode="answer", refresh_frames=3, refresh_s=100.0))
    question = "is the aisle clear?"
    assert cache.decide(frame, question, 0.0).reason == "first"
    keep = np.zeros(GRID, dtype=bool)
    keep[12:16, 0:4] = True  # bottom-left corner kept
    cache.store(frame, question, keep, VIEW, now=0.0, result="clear")
    got = cache.decide(frame, question, 0.1)
    assert got.reuse and got.frames_since_full == 1 and cache.result == "clear"
    assert cache.decide(frame, "what does the gripper hold?", 0.2).reason == "question"
    far = frame.copy()
    far[0:60, 560:640] = 255  # top-right, far from the watched corner
    assert cache.decide(far, question, 0.3).reuse
    near = frame.copy()
    near[330:360, 160:200] = 255  # just right of the kept block: inside the one-patch margin
    got = cache.decide(near, question, 0.4)
    assert not got.reuse and got.reason == "changed" and got.changed_share > 0
    assert cache.decide(frame, question, 0.5).frames_since_full == 3
    assert cache.decide(frame, question, 0.6).reason == "refresh", "three reused frames, then a full run"
    assert cache.decide(frame[:240], question, 0.5).reason in ("refresh", "geometry")


def test_refresh_by_time_and_off_mode(frame) -> None:
    cache = StreamCache(ReuseConfig(mode="answer", refresh_frames=100, refresh_s=1.0))
    cache.store(frame, "q", np.ones(GRID, dtype=bool), VIEW, now=10.0)
    assert cache.decide(frame, "q", 10.5).reuse
    assert cache.decide(frame, "q", 11.5).reason == "refresh"
    assert StreamCache().decide(frame, "q", 0.0).reason == "none"
    with pytest.raises(ValueError, match="reuse mode"):
        ReuseConfig(mode="sparse").check()


def test_dilate_grows_by_margin() -> None:
    mask = np.zeros((5, 5), dtype=bool)
    mask[2, 2] = True
    assert dilate(mask, 1).sum() == 9 and dilate(mask, 0).sum() == 1 and dilate(mask, 2).all()


def test_a_gripper_letting_go_is_a_change() -> None:
    """Episode 9000 releases a box at frame 143: only the fingers move (a few pixels), and the truth flips."""
    from atp_ros.warehouse.cell.episodes import Episode

    episode = Episode(9000)
    try:
        frames = [next(episode) for _ in range(144)]
    finally:
        episode.close()
    before, after = frames[139], frames[143]
    assert before.truth.gripper_holding is not None and after.truth.gripper_holding is None
    changed = changed_patches(_sig(before.rgb), _sig(after.rgb))
    x0, y0, x1, y1 = after.truth.arm_box
    rows, cols = np.nonzero(changed)
    assert len(rows) > 0, "the release must refresh an answer that watched the gripper"
    assert ((cols + 1) * 40 > x0 - 40).all() and (cols * 40 < x1 + 40).all()  # at the gripper, nowhere else
    assert ((rows + 1) * 30 > y0 - 30).all() and (rows * 30 < y1 + 30).all()


def test_token_reuse_recomputes_what_changed_since_the_tower_saw_it(frame) -> None:
    cache = StreamCache(ReuseConfig(mode="tokens", refresh_frames=3, refresh_s=600.0))
    assert cache.tower_changes(frame, 0.0) is None, "no cached tower states: the whole tower runs"
    cache.tower_stored(frame, VIEW, GRID, None, 0.0)
    assert not cache.tower_changes(frame, 0.1).any(), "the same frame: nothing to re-run"
    moved = frame.copy()
    moved[200:240, 300:340] = (255, 0, 0)
    changed = cache.tower_changes(moved, 0.1)
    assert changed.any() and changed.sum() <= 9
    cache.tower_stored(moved, VIEW, GRID, changed, 0.1)
    # Those patches were re-run on the new pixels: the same frame again has nothing left to re-run ...
    assert not cache.tower_changes(moved, 0.2).any()
    # ... and going back re-runs them again (each patch is compared with what its states saw).
    back = cache.tower_changes(frame, 0.2)
    assert np.array_equal(back, changed)
    cache.tower_stored(frame, VIEW, GRID, back, 0.2)
    cache.tower_stored(frame, VIEW, GRID, back, 0.3)
    assert cache.tower_changes(frame, 0.4) is None, "after refresh_frames partial runs, the whole tower"
    assert cache.tower_changes(frame[:240], 0.4) is None, "another frame size: the whole tower"
    cache.tower_stored(frame, VIEW, GRID, None, 0.4)
    cache.clear()
    assert cache.tower_changes(frame, 0.5) is None and cache.tower is None
    answer_only = StreamCache(ReuseConfig(mode="answer"))
    answer_only.tower_stored(frame, VIEW, GRID, None, 0.0)
    assert answer_only.tower_changes(frame, 0.1) is None, "mode answer never re-runs part of the tower"
    with pytest.raises(ValueError, match="variant"):
        ReuseConfig(mode="tokens", variant="sparse").check()
