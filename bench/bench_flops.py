"""FLOPs and KV cache of the real architectures, without weights: what ATP saves on a 7B LLaVA.

The configs of llava-1.5-7b/-13b, llava-interleave-qwen-0.5b, blip2-opt-2.7b, idefics-9b,
qwen2.5-vl-3b/-7b, smolvlm2-2.2b/-500m, llava-onevision-qwen2-7b and llava-next-vicuna-7b are in
``bench/archs/`` (nothing can be downloaded here). Per keep ratio the same analytic cost model the
backends report (``llava_costs``, ``blip2_costs``, ``idefics_costs``, ``qwen_costs``,
``smolvlm_costs``, ``onevision_costs``, ``tower_flops``, ``qwen_vision_flops``, ``scoring_flops``;
checked equal to torch's FlopCounterMode on tiny models by the backend contract tests) gives the
LLM prefill FLOPs, the whole pipeline's FLOPs (ViT + ATP scoring + projector/Q-Former/resampler +
prefill) and the fp16 KV cache per frame. A prompt of 40 text tokens is assumed.
Writes ``bench/results/flops.json``.

    PYTHONPATH=atp_ros python bench/bench_flops.py
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from atp_ros.backends.blip2 import blip2_costs
from atp_ros.backends.flops import kv_cache_bytes, scoring_flops, tower_flops
from atp_ros.backends.idefics import idefics_costs
from atp_ros.backends.llava import llava_costs
from atp_ros.backends.llava_onevision import onevision_costs
from atp_ros.backends.qwen2_5_vl import qwen_costs, qwen_vision_flops
from atp_ros.backends.smolvlm import smolvlm_costs
from common import RESULTS, stamp
from rich.console import Console
from rich.table import Table
from transformers import AutoConfig, PretrainedConfig

KEEP_RATIOS = (1.0, 0.6, 0.4, 0.25, 0.11)
TEXT_TOKENS = 40
JOINT_WIDTH = {"llava-1.5-7b": 768, "llava-1.5-13b": 768, "llava-interleave-qwen-0.5b": 1152}  # S_inter space
JOINT_WIDTH |= {"blip2-opt-2.7b": 1024, "idefics-9b": 1024}  # EVA01-g-14, CLIP ViT-H/14
# Qwen2.5-VL's grid follows the frame: a 640x480 camera frame, smart_resize'd to 476x644 px = 34x46 patches of
# 14 px = 17x23 = 391 LLM tokens (2x2 merge). No matching text tower: S_intra alone (received attention).
QWEN_FRAME_PATCHES = (1, 34, 46)


def load(path: Path) -> PretrainedConfig:
    """An architecture's config from its bench/archs JSON (dimensions only, no weights)."""
    spec = json.loads(path.read_text())
    spec.pop("_source", None)
    longest = spec.pop("atp_longest_edge", None)  # SmolVLM: its image processor's resize (not a model setting)
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
    if longest:
        cfg.atp_longest_edge = longest
    return cfg


def rows_for(name: str, cfg: PretrainedConfig) -> list[dict]:
    if cfg.model_type == "qwen2_5_vl":
        return qwen_rows(name, cfg)
    if cfg.model_type == "smolvlm":
        return smolvlm_rows(name, cfg)
    if cfg.model_type in ("llava_onevision", "llava_next"):
        return onevision_rows(name, cfg)
    v = cfg.vision_config
    side = int(v.image_size) // int(v.patch_size)
    n = side * side
    hidden = int(getattr(v, "hidden_size", None) or v.embed_dim)
    has_cls = getattr(v, "model_type", "") != "siglip_vision_model"
    vision = tower_flops(v, has_cls)
    e = JOINT_WIDTH[name]
    rows = []
    for ratio in KEEP_RATIOS:
        k = min(n, max(1, math.ceil(ratio * n - 1e-9)))
        signal = "cls" if has_cls else "probe"
        scoring = 0.0 if ratio == 1.0 else scoring_flops(n, has_cls, hidden, signal, 2.0 * n * hidden * e, e)
        if cfg.model_type == "llava":
            cls_fed = int(has_cls and cfg.vision_feature_select_strategy != "default")
            costs = llava_costs(cfg, [TEXT_TOKENS], [k + cls_fed])
            text_cfg, consumer = cfg.text_config, k + cls_fed
        elif cfg.model_type == "blip-2":
            costs = blip2_costs(cfg, [TEXT_TOKENS], [k + 1])
            text_cfg, consumer = cfg.text_config, k + 1
        else:  # idefics: one <image> token in the text, the LLM cross-attends to 64 latents
            costs = idefics_costs(cfg, [TEXT_TOKENS + 1], [k + 1])
            text_cfg, consumer = cfg, k + 1
        rows.append(_row(name, ratio, k, consumer, vision, scoring, costs, text_cfg))
    return _relative(rows)


def qwen_rows(name: str, cfg: PretrainedConfig) -> list[dict]:
    """Qwen2.5-VL on a 640x480 frame: K counts LLM tokens (2x2 merge groups); scoring is received
    attention at a full-attention block over the 4 N patches, intra-only (no text tower)."""
    v = cfg.vision_config
    t, h, w = QWEN_FRAME_PATCHES
    n = t * h * w // 4
    vision = qwen_vision_flops(v, QWEN_FRAME_PATCHES)
    rows = []
    for ratio in KEEP_RATIOS:
        k = min(n, max(1, math.ceil(ratio * n - 1e-9)))
        scoring = 0.0 if ratio == 1.0 else scoring_flops(4 * n, False, int(v.hidden_size), "received")
        costs = qwen_costs(cfg, [TEXT_TOKENS], [k], [n])
        rows.append(_row(name, ratio, k, k, vision, scoring, costs, cfg.text_config))
    return _relative(rows)


def smolvlm_rows(name: str, cfg: PretrainedConfig) -> list[dict]:
    """SmolVLM2 on a 640x480 frame: resized to the processor's longest edge and split into rows x cols tiles +
    the global tile; K counts the local tiles' LLM tokens (one budget per frame), the global tile always reaches
    the LLM. Scoring: the SigLIP probe per tile + the SigLIP joint read-out (its head's value path and MLP)."""
    v = cfg.vision_config
    tile = int(v.image_size)
    longest = int(cfg.atp_longest_edge)
    width, height = longest, int(longest * 480 / 640)
    cols, rows = math.ceil(width / tile), math.ceil(height / tile)
    tiles = rows * cols + 1
    patches = (tile // int(v.patch_size)) ** 2
    g2 = patches // int(cfg.scale_factor) ** 2
    n = rows * cols * g2
    d, ff = int(v.hidden_size), int(v.intermediate_size)
    vision = tiles * tower_flops(v, False)
    text = TEXT_TOKENS + 2 * rows * cols + rows + 4  # <fake_token_around_image><row_i_col_j> per tile, newlines, global
    rows_out = []
    for ratio in KEEP_RATIOS:
        k = min(n, max(1, math.ceil(ratio * n - 1e-9)))
        joint = 2.0 * tiles * g2 * (2 * d * d + 2 * d * ff) + 2.0 * n * d
        scoring = 0.0 if ratio == 1.0 else tiles * scoring_flops(patches, False, d, "probe") + joint
        costs = smolvlm_costs(cfg, [text], [k + g2], [tiles])
        rows_out.append(_row(name, ratio, k, k + g2, vision, scoring, costs, cfg.text_config))
    return _relative(rows_out)


def onevision_rows(name: str, cfg: PretrainedConfig) -> list[dict]:
    """LLaVA-OneVision on a 640x480 frame: the base crop + the anyres grid the model picks, unpadded (and pooled
    beyond anyres_max_9) with transformers' own functions; K counts the grid's tokens, the base crop and the
    newline of every grid row always reach the LLM. Scoring: SigLIP probe per crop + the joint read-out."""
    import torch
    from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image

    v = cfg.vision_config
    side = int(v.image_size) // int(v.patch_size)
    rows, cols = get_anyres_image_grid_shape((480, 640), cfg.image_grid_pinpoints, int(v.image_size))
    h, w = unpad_image(torch.zeros(1, rows * side, cols * side), (480, 640)).shape[1:]
    if cfg.model_type == "llava_onevision":  # anyres_max_9: bilinear pooling of large grids (NeXT has none)
        ratio_pool = math.sqrt(h * w / (int(cfg.vision_aspect_ratio.removeprefix("anyres_max_")) * side * side))
        if ratio_pool > 1.1:
            h, w = int(h // ratio_pool), int(w // ratio_pool)
    crops, p, n = rows * cols + 1, side * side, h * w
    d, ff = int(v.hidden_size), int(v.intermediate_size)
    has_cls = v.model_type == "clip_vision_model"  # NeXT: a CLS per crop (CLS attention; CLIP's projection)
    vision = crops * tower_flops(v, has_cls)
    out = []
    for ratio in KEEP_RATIOS:
        k = min(n, max(1, math.ceil(ratio * n - 1e-9)))
        if has_cls:
            e = int(v.projection_dim)
            intra, joint = scoring_flops(p, True, d, "cls"), 2.0 * n * d * e + 2.0 * n * e
        else:
            intra, joint = scoring_flops(p, False, d, "probe"), 2.0 * n * (2 * d * d + 2 * d * ff) + 2.0 * n * d
        scoring = 0.0 if ratio == 1.0 else crops * intra + joint
        costs = onevision_costs(cfg, [TEXT_TOKENS], [k + p + h], [crops], [n + p + h])
        out.append(_row(name, ratio, k, k + p + h, vision, scoring, costs, cfg.text_config))
    return _relative(out)


def _row(name, ratio, k, consumer, vision, scoring, costs, text_cfg) -> dict:
    pipeline = vision + scoring + costs["projector"] + costs["llm_prefill"]
    return {
        "model": name,
        "keep_ratio": ratio,
        "visual_tokens": k,
        "consumer_tokens": consumer,
        "llm_tokens": costs["llm_tokens"],
        "vision_gflops": vision / 1e9,
        "scoring_gflops": scoring / 1e9,
        "projector_gflops": costs["projector"] / 1e9,
        "llm_prefill_gflops": costs["llm_prefill"] / 1e9,
        "pipeline_gflops": pipeline / 1e9,
        "kv_cache_mib_fp16": kv_cache_bytes(text_cfg, round(costs["llm_tokens"])) / 2**20,
    }


def _relative(rows: list[dict]) -> list[dict]:
    full = rows[0]
    for r in rows:
        r["llm_prefill_vs_full"] = r["llm_prefill_gflops"] / full["llm_prefill_gflops"]
        r["pipeline_vs_full"] = r["pipeline_gflops"] / full["pipeline_gflops"]
        r["kv_vs_full"] = r["kv_cache_mib_fp16"] / full["kv_cache_mib_fp16"]
    return rows


def paper_row() -> dict:
    """ATP's Table 1 on LLaVA-7B: 256 -> ~150 visual tokens, about 0.6x the FLOPs (as the paper states it)."""
    return {"model": "paper Table 1 (LLaVA-7B)", "visual_tokens": "256 -> ~150", "flops_vs_full": "~0.6x"}


def main() -> int:
    """The table of every architecture in bench/archs, written to results/flops.json."""
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help, and nothing else
    archs = Path(__file__).parent / "archs"
    rows = []
    for path in sorted(archs.glob("*.json")):
        rows += rows_for(path.stem, load(path))
    table = Table(title=f"Analytic FLOPs and KV cache per frame ({TEXT_TOKENS} text tokens)")
    for col in ("model", "keep", "K", "LLM tokens", "prefill GFLOPs", "x full", "pipeline GFLOPs", "x full", "KV MiB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["model"],
            f"{r['keep_ratio']:.2f}",
            str(r["visual_tokens"]),
            f"{r['llm_tokens']:.0f}",
            f"{r['llm_prefill_gflops']:.0f}",
            f"{r['llm_prefill_vs_full']:.2f}",
            f"{r['pipeline_gflops']:.0f}",
            f"{r['pipeline_vs_full']:.2f}",
            f"{r['kv_cache_mib_fp16']:.1f}",
        )
    Console(width=160).print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"meta": stamp(), "text_tokens": TEXT_TOKENS, "rows": rows, "paper": paper_row()}
    (RESULTS / "flops.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {RESULTS / 'flops.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
