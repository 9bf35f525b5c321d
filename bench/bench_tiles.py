"""How a frame's budget is spread over SmolVLM2's tiles: one top-K over the whole frame vs one per tile.

On the tiny random SmolVLM2 (2x2 tiles of 4x4 LLM tokens per 64-px frame + the global tile) and rendered
warehouse frames: per setting (keep ratio, or the adaptive mass budget) and spreading rule, the tokens kept,
how unevenly the kept tokens fall on the tiles (the smallest and largest share a tile gets, tiles left with
none) and the fidelity (answers identical, token for token, to the unpruned model's, and the first token
alone). The weights are random: the fidelity compares the two rules on the same model, it says nothing of a
trained SmolVLM2.
Writes ``bench/results/tiles.json``.

    PYTHONPATH=atp_ros python bench/bench_tiles.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from atp_ros.backends import AtpConfig, load_backend
from atp_ros.testing.tiny.smolvlm import save_tiny_smolvlm
from atp_ros.warehouse.scenes import render_scene
from common import RESULTS, stamp

QUESTIONS = ["where is the red box?", "how many pallets are on the shelf?", "is the aisle empty?"]
SETTINGS = {
    "keep 0.5": AtpConfig(keep_ratio=0.5),
    "keep 0.25": AtpConfig(keep_ratio=0.25),
    "mass 0.5": AtpConfig(mass=0.5),
}
G = 4  # tokens per tile side


def tile_shares(result, b: int) -> list[int]:
    """Kept tokens per local tile of image ``b``."""
    mask = result.keep_mask(b)
    h, w = mask.shape
    return [int(mask[r : r + G, c : c + G].sum()) for r in range(0, h, G) for c in range(0, w, G)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        backend = load_backend(str(save_tiny_smolvlm(Path(tmp) / "smolvlm")), device="cpu")
        frames = [render_scene(3_000 + i, 120, 160).rgb for i in range(args.frames)]
        items = [(f, q) for f in frames for q in QUESTIONS]
        imgs, qs = [f for f, _ in items], [q for _, q in items]
        full = backend.answer(imgs, qs, AtpConfig(enabled=False), max_new_tokens=args.new_tokens)
        rows = []
        for name, atp in SETTINGS.items():
            for rule in ("image", "tile"):
                backend.tile_budget = rule
                res = backend.answer(imgs, qs, atp, max_new_tokens=args.new_tokens)
                shares = [tile_shares(res, b) for b in range(len(items))]
                same = sum(a == b for a, b in zip(res.generated_ids, full.generated_ids, strict=True))
                first = sum(a[:1] == b[:1] for a, b in zip(res.generated_ids, full.generated_ids, strict=True))
                rows.append(
                    {
                        "setting": name,
                        "budget": "one top-K per frame" if rule == "image" else "one per tile",
                        "kept_mean": sum(res.visual_tokens_kept) / len(items),
                        "of": res.visual_tokens_total[0],
                        "tile_min_mean": sum(min(s) for s in shares) / len(items),
                        "tile_max_mean": sum(max(s) for s in shares) / len(items),
                        "tiles_empty": sum(x == 0 for s in shares for x in s),
                        "tiles": sum(len(s) for s in shares),
                        "fidelity": same / len(items),
                        "first_token_same": first / len(items),
                        "llm_prefill_vs_full": res.flops["llm_prefill"] / full.flops["llm_prefill"],
                    }
                )
        backend.tile_budget = "image"
    print("| setting | budget | kept / N | per tile min / max | tiles empty | same answer | same 1st token | prefill |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['setting']} | {r['budget']} | {r['kept_mean']:.1f} / {r['of']} | {r['tile_min_mean']:.1f} / "
            f"{r['tile_max_mean']:.1f} | {r['tiles_empty']} of {r['tiles']} | {r['fidelity']:.2f} | "
            f"{r['first_token_same']:.2f} | {r['llm_prefill_vs_full']:.2f}x |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"meta": stamp(), "frames": args.frames, "questions": QUESTIONS, "new_tokens": args.new_tokens, "rows": rows}
    (RESULTS / "tiles.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {RESULTS / 'tiles.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
