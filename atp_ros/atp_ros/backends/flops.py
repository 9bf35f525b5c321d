"""Analytic forward FLOPs (multiply-add = 2) of the parts of a VLM, for ``VlmResult.flops``.

Pure functions of layer counts and widths; the families combine them in their ``flops``.
"""

from __future__ import annotations

GATED_MLP_TYPES = ("llama", "mistral", "qwen2", "gemma", "t5")  # LMs whose FFN has a gate projection


def decoder_prefill_flops(
    seq_len: int,
    num_layers: int,
    hidden: int,
    intermediate: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    gated_mlp: bool = True,
) -> float:
    """Forward FLOPs of a decoder-only transformer over ``seq_len`` tokens (no LM head).

    Per layer: Q,O projections ``2*2*L*d^2``, K,V ``2*2*L*d*d_kv``, attention scores and
    weighted sum ``2*2*L^2*d``, MLP ``2*(3 if gated else 2)*L*d*d_ff``.
    """
    kv = num_kv_heads or num_heads
    d_kv = hidden * kv // num_heads
    attn_proj = 4 * seq_len * hidden * hidden + 4 * seq_len * hidden * d_kv
    attn_mix = 4 * seq_len * seq_len * hidden
    mlp = 2 * (3 if gated_mlp else 2) * seq_len * hidden * intermediate
    return float(num_layers * (attn_proj + attn_mix + mlp))


def attention_flops(num_queries: int, num_keys: int, q_in: int, kv_in: int, inner: int, out: int) -> float:
    """Forward FLOPs of one (cross-)attention block: q/k/v/o projections, scores and weighted sum.

    ``q_in``/``kv_in``: widths the queries/keys are projected from; ``inner``: heads x head dim;
    ``out``: output projection width.
    """
    proj = 2 * num_queries * q_in * inner + 2 * 2 * num_keys * kv_in * inner + 2 * num_queries * inner * out
    return float(proj + 4 * num_queries * num_keys * inner)


def vit_flops(
    num_patches: int, has_cls: bool, hidden: int, intermediate: int, layers: int, heads: int, patch: int
) -> float:
    """Forward FLOPs of a pre-LN ViT over ``num_patches`` patches (plus CLS), patch embedding included."""
    embed = 2.0 * num_patches * 3 * patch * patch * hidden
    tokens = num_patches + int(has_cls)
    return embed + decoder_prefill_flops(tokens, layers, hidden, intermediate, heads, gated_mlp=False)


def lm_dims(cfg) -> dict:
    """Layers/width/FFN/heads of an HF text config, for :func:`decoder_prefill_flops`."""

    def first(*names: str) -> int:
        for name in names:
            value = getattr(cfg, name, None)
            if value:
                return int(value)
        raise ValueError(f"{type(cfg).__name__} has none of {names}")

    gated = bool(getattr(cfg, "is_gated_act", cfg.model_type in GATED_MLP_TYPES))
    return {
        "num_layers": first("num_hidden_layers", "num_layers"),
        "hidden": first("hidden_size", "d_model"),
        "intermediate": first("intermediate_size", "ffn_dim", "d_ff"),
        "num_heads": first("num_attention_heads", "num_heads"),
        "num_kv_heads": getattr(cfg, "num_key_value_heads", None),
        "gated_mlp": gated,
    }


def scoring_flops(
    num_patches: int, has_cls: bool, hidden: int, intra_signal: str, joint_flops: float = 0.0, embed_dim: int = 0
) -> float:
    """ATP scoring FLOPs for one image of ``num_patches`` ViT patches (plus CLS when ``has_cls``).

    S_intra recomputes the score layer's keys (and the CLS query, or every query for
    ``received``) from that layer's input, then one attention row (``cls``) or the full map
    (``received``); ``probe`` is SigLIP's pooling head: keys of every patch and one query row.
    S_inter, when used, adds the joint-space read-out (``joint_flops``) and one cosine per patch
    in ``embed_dim``; the question's text embedding is cached, so it is not counted. ``""``: not scored.
    """
    if not intra_signal:
        return 0.0
    if intra_signal == "probe":
        intra = 2.0 * num_patches * hidden * hidden + 4.0 * num_patches * hidden
    else:
        tokens = num_patches + int(has_cls)
        rows = 1 if intra_signal == "cls" else tokens
        projections = 2.0 * (tokens + rows) * hidden * hidden  # k of every token, q of the scored rows
        intra = projections + 4.0 * rows * tokens * hidden
    return intra + joint_flops + 2.0 * num_patches * embed_dim


def tower_flops(vision_config, has_cls: bool) -> float:
    """Forward FLOPs of a VLM's whole vision tower for one image (all layers run, whatever K is)."""
    v = vision_config
    side = int(v.image_size) // int(v.patch_size)
    hidden = int(getattr(v, "hidden_size", None) or v.embed_dim)
    return vit_flops(
        side * side, has_cls, hidden, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size
    )


def kv_cache_bytes(text_config, seq_len: int, bytes_per_value: int = 2) -> float:
    """Bytes of the LLM's self-attention KV cache after a prefill of ``seq_len`` tokens (fp16: 2 bytes)."""
    dims = lm_dims(text_config)
    kv_heads = dims["num_kv_heads"] or dims["num_heads"]
    head_dim = int(getattr(text_config, "head_dim", None) or dims["hidden"] // dims["num_heads"])
    return float(2 * dims["num_layers"] * seq_len * kv_heads * head_dim * bytes_per_value)
