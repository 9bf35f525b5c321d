"""The analytic FLOPs behind ``VlmResult.flops`` and ``make bench``'s architecture tables, checked against
``torch.utils.flop_counter`` on tiny real models of every family (eager attention, so the counter sees
the attention matmuls that a fused SDPA kernel would hide from it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from atp_ros.backends import load_backend
from atp_ros.backends.blip2 import qformer_flops
from atp_ros.backends.flops import decoder_prefill_flops, kv_cache_bytes, lm_dims, tower_flops
from atp_ros.backends.idefics import resampler_flops
from atp_ros.backends.llava import llava_costs
from atp_ros.testing.tiny.blip2 import save_tiny_blip2
from atp_ros.testing.tiny.idefics import save_tiny_idefics
from atp_ros.testing.tiny.llava import save_tiny_llava
from torch.utils.flop_counter import FlopCounterMode


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flops")
    return {
        "clip": save_tiny_llava(root / "clip", tower="clip"),
        "siglip": save_tiny_llava(root / "siglip", tower="siglip"),
        "blip2": save_tiny_blip2(root / "blip2"),
        "idefics": save_tiny_idefics(root / "idefics"),
    }


def eager(path: Path):
    backend = load_backend(str(path), device="cpu")
    backend.model.set_attn_implementation("eager")
    return backend


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_llava_tower_projector_and_llm_prefill(tiny, tower: str) -> None:
    be = eager(tiny[tower])
    cfg = be.model.config
    v = cfg.vision_config
    pixels = torch.randn(1, 3, v.image_size, v.image_size)
    assert counted(lambda: be.tower(pixels)) == tower_flops(v, be.has_cls)
    k, text = 10, 23
    feats = torch.randn(1, k, v.hidden_size)
    costs = llava_costs(cfg, [text], [k])
    assert counted(lambda: be.projector(feats)) == costs["projector"]
    embeds = torch.randn(1, text + k, cfg.text_config.hidden_size)
    lm = be.model.model.language_model  # no LM head: the prefill's transformer stack
    assert counted(lambda: lm(inputs_embeds=embeds)) == costs["llm_prefill"]
    assert costs["llm_tokens"] == text + k
    # KV cache: 2 (K, V) x layers x tokens x kv heads x head dim x 2 bytes (fp16)
    t = cfg.text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    assert kv_cache_bytes(t, text + k) == 2 * t.num_hidden_layers * (text + k) * t.num_key_value_heads * head_dim * 2


def test_blip2_tower_qformer_and_opt_prefill(tiny) -> None:
    be = eager(tiny["blip2"])
    cfg = be.model.config
    v = cfg.vision_config
    assert counted(lambda: be.model.vision_model(torch.randn(1, 3, v.image_size, v.image_size))) == tower_flops(v, True)
    keys = torch.randn(1, 1 + 9, v.hidden_size)

    def qformer() -> None:
        out = be.model.qformer(query_embeds=be.model.query_tokens, encoder_hidden_states=keys).last_hidden_state
        be.model.language_projection(out)

    assert counted(qformer) == qformer_flops(cfg, 1 + 9)
    embeds = torch.randn(1, 30, cfg.text_config.hidden_size)
    assert counted(lambda: be.model.language_model.model(inputs_embeds=embeds)) == decoder_prefill_flops(
        30, **lm_dims(cfg.text_config)
    )


def test_idefics_tower_and_resampler(tiny) -> None:
    be = eager(tiny["idefics"])
    cfg = be.model.config
    v = cfg.vision_config
    pixels = torch.randn(1, 3, v.image_size, v.image_size)
    assert counted(lambda: be.model.model.vision_model(pixels)) == tower_flops(v, True)
    context = torch.randn(1, 1 + 9, v.embed_dim)
    assert counted(lambda: be.model.model.perceiver_resampler(context)) == resampler_flops(cfg, 1 + 9)
