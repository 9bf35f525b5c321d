"""Token reuse at realistic widths (issue 22, level 3): frame time vs per-frame ATP with 10-100% of patches changed.

The random ``clip-l336-qwen2-0.5b`` checkpoint of ``bench_realistic`` (CLIP ViT-L/14 at 336 px, 576
patches, + a Qwen2-0.5B-shaped LLM; weights random, shapes real). A 640x480 frame is answered once
to fill the stream's tower cache; then, round-robin frame by frame, a frame with ``share`` of the
patches changed (their pixels inverted, random patches, seeded) is answered with per-frame ATP and
with token reuse (``reuse.mode tokens``, both variants), the change detection
(``StreamCache.tower_changes``) included in the reuse time. Answer reuse is off here: every frame
runs the LLM, so the ratio is what token reuse alone buys. ATP keep 0.25, one new token.
A stream's frame before the measured one had one patch changed (so eventful reuse has its per-layer
keys/values cached, as between whole-tower runs of a real stream). Above 85% changed the whole tower
runs (``backends.partial.WHOLE_TOWER_ABOVE``): the 100% row is the overhead when nothing can be
reused. Writes ``bench/results/token_reuse.json`` and ``token_reuse.png``.

    PYTHONPATH=atp_ros python bench/bench_token_reuse.py [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from atp_ros.backends import AtpConfig, load_backend
from atp_ros.backends.partial import TowerReuse
from atp_ros.stream import ReuseConfig, StreamCache
from atp_ros.warehouse.scenes import render_scene
from bench_realistic import QUESTION, checkpoint
from common import RESULTS, stamp
from tqdm import tqdm

SHARES = (0.1, 0.3, 0.6, 1.0)
VARIANTS = ("eventful", "drop")


def changed_frame(base: np.ndarray, view, grid: tuple[int, int], share: float, seed: int) -> np.ndarray:
    """``base`` with ``share`` of the grid's patches inverted (random patches)."""
    rng = np.random.default_rng(seed)
    h, w = grid
    out = base.copy()
    x0, y0, x1, y1 = view
    for k in rng.choice(h * w, size=max(1, round(share * h * w)), replace=False):
        r, c = divmod(int(k), w)
        ya, yb = int(y0 + (y1 - y0) * r / h), int(y0 + (y1 - y0) * (r + 1) / h)
        xa, xb = int(x0 + (x1 - x0) * c / w), int(x0 + (x1 - x0) * (c + 1) / w)
        ya, yb, xa, xb = max(ya, 0), min(yb, base.shape[0]), max(xa, 0), min(xb, base.shape[1])
        out[ya:yb, xa:xb] = 255 - out[ya:yb, xa:xb]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="clip-l336-qwen2-0.5b")
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds after one warm-up round")
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--quick", action="store_true", help="a smoke run on a tiny random LLaVA")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.quick:
        from atp_ros.testing.tiny.llava import save_tiny_llava

        path = save_tiny_llava(Path("out/bench/ckpt/tiny-token-reuse"), image_size=64, patch_size=8)
        args.rounds = 1
    else:
        path = checkpoint(args.checkpoint)
    backend = load_backend(str(path), device="cpu")
    atp = AtpConfig(keep_ratio=args.keep)
    base = render_scene(2_000_100, 480, 640).rgb
    first = backend.answer([base], QUESTION, atp, 1)
    view, grid = first.views[0].as_tuple(), first.grid_of(0)
    nudged = changed_frame(base, view, grid, 1.0 / (grid[0] * grid[1]), seed=7)
    times: dict[tuple, list[float]] = {}
    vision: dict[tuple, list[float]] = {}
    for i in tqdm(range(args.rounds + 1), desc="token reuse rounds", unit="round"):
        for share in SHARES:
            frame = changed_frame(base, view, grid, share, seed=1000 * i + int(share * 100))
            res = backend.answer([frame], QUESTION, atp, 1)
            if i:
                times.setdefault(("per-frame", share), []).append(res.timings.total)
                vision.setdefault(("per-frame", share), []).append(res.timings.vision)
            for variant in VARIANTS:
                cache = StreamCache(ReuseConfig(mode="tokens", variant=variant, refresh_s=1e9))
                tower = cache.tower = TowerReuse(variant)
                backend.answer([base], QUESTION, atp, 1, tower=tower)  # the stream's last whole-tower frame
                cache.tower_stored(base, view, grid, None, 0.0)
                # A frame with one patch changed since: what a stream has between whole-tower runs (for eventful,
                # the keys/values cache exists from here on).
                tower.changed = cache.tower_changes(nudged, 0.05)
                backend.answer([nudged], QUESTION, atp, 1, tower=tower)
                cache.tower_stored(nudged, view, grid, tower.changed, 0.05)
                t = time.perf_counter()
                tower.changed = cache.tower_changes(frame, 0.1)
                detect_ms = (time.perf_counter() - t) * 1e3
                res = backend.answer([frame], QUESTION, atp, 1, tower=tower)
                if i:
                    times.setdefault((variant, share), []).append(res.timings.total + detect_ms)
                    vision.setdefault((variant, share), []).append(res.timings.vision)
                    times.setdefault((variant + " recomputed", share), []).append(
                        tower.recomputed if tower.recomputed is not None else grid[0] * grid[1]
                    )
    rows = []
    n = grid[0] * grid[1]
    for share in SHARES:
        per_frame = statistics.median(times[("per-frame", share)])
        row = {"changed_share": share, "per_frame_ms": per_frame,
               "per_frame_vision_ms": statistics.median(vision[("per-frame", share)])}  # fmt: skip
        for variant in VARIANTS:
            ms = statistics.median(times[(variant, share)])
            row |= {
                f"{variant}_ms": ms,
                f"{variant}_vision_ms": statistics.median(vision[(variant, share)]),
                f"{variant}_speedup": per_frame / ms,
                f"{variant}_recomputed_share": statistics.median(times[(variant + " recomputed", share)]) / n,
            }
        rows.append(row)
    report = {"checkpoint": "tiny (quick)" if args.quick else args.checkpoint, "keep_ratio": args.keep,
              "rounds": args.rounds, "patches": n, "rows": rows, "machine": stamp()}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "token_reuse.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(rows, out / "token_reuse.png", report["checkpoint"])
    for r in rows:
        print(
            f"{r['changed_share']:.0%} changed: per-frame {r['per_frame_ms']:.0f} ms, eventful "
            f"{r['eventful_ms']:.0f} ms ({r['eventful_speedup']:.2f}x), drop {r['drop_ms']:.0f} ms "
            f"({r['drop_speedup']:.2f}x)"
        )
    return 0


def plot(rows: list[dict], path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    shares = [100 * r["changed_share"] for r in rows]
    for variant in VARIANTS:
        ax.plot(shares, [r[f"{variant}_speedup"] for r in rows], marker="o", label=f"token reuse ({variant})")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--", label="per-frame ATP")
    ax.set_xlabel("patches changed since the cached frame (%)")
    ax.set_ylabel("speed-up of the frame vs per-frame ATP")
    ax.set_title(f"Token reuse, {name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
