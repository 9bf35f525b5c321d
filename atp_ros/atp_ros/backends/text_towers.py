"""Joint image-text spaces for ATP's inter-modal score ``S_inter`` (HF transformers, no ROS).

A VLM's own vision tower has no text side, so ``S_inter`` (cosine between each patch and
the question) needs the contrastive model the tower came from: CLIP for LLaVA-1.5 and
IDEFICS, SigLIP for llava-interleave. A :class:`JointSpace` loads only what it needs from
that checkpoint -- the text tower and the small vision-side heads that map ViT states
into the joint space -- and offers one small interface:

* :meth:`JointSpace.encode_text` ``str -> (E,)``: the question in the joint space.
* :meth:`JointSpace.patches_to_joint` ``(B, N, D) -> (B, N, E)``: patch states in the joint space.
* :meth:`JointSpace.probe_attention` ``(B, N, D) -> (B, N)``: a pooled query's attention over
  patches, where the model has one (SigLIP's attention-pooling head); ``None`` otherwise.

Patch states are the *raw residual stream* of the tower's last encoder layer (before the
tower's ``post_layernorm``), i.e. ``hidden_states[-1]`` of an HF CLIP/SigLIP vision model;
each joint space applies its own ``post_layernorm``.

CLIP (:class:`ClipJointSpace`, any ``CLIPModel`` directory or hub id)
    query: ``text_projection(text_model(q).pooler_output)`` (EOS-pooled);
    patch i: ``visual_projection(post_layernorm(h_i))`` -- the map CLIP trained for the CLS
    token, applied to every patch token (the usual "dense CLIP" read-out).

SigLIP (:class:`SiglipJointSpace`, any ``SiglipModel`` directory or hub id)
    query: ``text_model(q).pooler_output`` (last token + head, ``padding="max_length"`` as trained);
    patch i, MaskCLIP-style through the attention-pooling head: with ``x_i = post_layernorm(h_i)``,
    ``o_i = W_o (W_v x_i + b_v) + b_o`` -- the head's value and output projections *without* the
    softmax mixing, i.e. what the pooled embedding would be if the probe attended only to patch i --
    then the head's residual MLP ``e_i = o_i + mlp(layernorm(o_i))``. Since the pooled image
    embedding is ``sum_i a_i o_i`` fed through the same residual MLP, ``e_i`` is patch i's
    contribution in the space SigLIP's text embeddings live in.
    probe attention: ``softmax(q_probe . k_i / sqrt(d))`` per head of the same head, averaged over
    heads -- SigLIP's own "which patches matter" signal, standing in for CLIP's CLS attention.

Both load with ``use_safetensors=True``, ``trust_remote_code=False`` (a local directory with only
pickle weights is refused: :func:`atp_ros.backends.loading.require_safetensors`), offline from a local
directory. The loaded model is pruned to the parts above (the vision encoder is dropped: the
VLM already has one).
"""

from __future__ import annotations

import abc
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

from atp_ros.backends.loading import require_safetensors
from atp_ros.method import cls_attention

JOINT_SPACE_TYPES = ("clip", "siglip")


class JointSpace(abc.ABC):
    """A contrastive model's text tower plus the vision-side read-out into its joint space."""

    kind: str = ""

    def __init__(
        self, model_id: str, tokenizer, device: torch.device, dtype: torch.dtype, vision_hidden: int, embed_dim: int
    ) -> None:
        self.model_id = model_id
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.vision_hidden = vision_hidden  # D: width of the patch states it accepts
        self.embed_dim = embed_dim  # E: joint-space width

    @abc.abstractmethod
    def encode_text(self, text: str) -> Tensor:
        """The question in the joint space: float32 ``(E,)`` on :attr:`device`."""

    @abc.abstractmethod
    def patches_to_joint(self, states: Tensor) -> Tensor:
        """Raw last-layer patch states ``(B, N, D)`` -> float32 joint-space embeddings ``(B, N, E)``."""

    def probe_attention(self, states: Tensor) -> Tensor | None:
        """A pooled query's head-averaged attention over patches ``(B, N)``; None if the model has none."""
        return None

    @property
    def has_probe(self) -> bool:
        return False

    def joint_flops(self, num_patches: int) -> float:
        """Analytic FLOPs of :meth:`patches_to_joint` for one image of ``num_patches`` patches."""
        return 2.0 * num_patches * self.vision_hidden * self.embed_dim

    def _check_states(self, states: Tensor) -> Tensor:
        if states.dim() != 3 or states.shape[-1] != self.vision_hidden:
            raise ValueError(f"patch states must be (B, N, {self.vision_hidden}), got {tuple(states.shape)}")
        return states.to(self.device, self.dtype)

    def _tokenize(self, text: str, max_length: int, pad_to_max: bool) -> dict[str, Tensor]:
        enc = self.tokenizer(
            text,
            truncation=True,
            max_length=max_length,
            padding="max_length" if pad_to_max else False,
            return_tensors="pt",
        )
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


class ClipJointSpace(JointSpace):
    """CLIP's joint space from any ``CLIPModel`` checkpoint (see the module docstring)."""

    kind = "clip"

    def __init__(self, model_id: str, model: nn.Module, tokenizer, device: torch.device, dtype: torch.dtype) -> None:
        cfg = model.config
        super().__init__(model_id, tokenizer, device, dtype, cfg.vision_config.hidden_size, cfg.projection_dim)
        self.text_model = model.text_model.to(device, dtype).eval()
        self.text_projection = model.text_projection.to(device, dtype).eval()
        self.post_layernorm = model.vision_model.post_layernorm.to(device, dtype).eval()
        self.visual_projection = model.visual_projection.to(device, dtype).eval()
        self.max_length = int(cfg.text_config.max_position_embeddings)
        self.eos_token_id = cfg.text_config.eos_token_id

    @torch.inference_mode()
    def encode_text(self, text: str) -> Tensor:
        enc = self._tokenize(text, self.max_length, pad_to_max=False)
        ids = enc["input_ids"]  # (1, T)
        eos = self.tokenizer.eos_token_id
        # CLIP pools at the EOS token; tokenizers without a post-processor (or truncation) may omit it.
        if eos is not None and int(ids[0, -1]) != eos:
            if ids.shape[1] >= self.max_length:
                ids = ids.clone()
                ids[0, -1] = eos
            else:
                ids = torch.cat([ids, ids.new_full((1, 1), eos)], dim=1)
        pooled = self.text_model(input_ids=ids).pooler_output  # (1, D_text)
        return self.text_projection(pooled)[0].float()  # (E,)

    @torch.inference_mode()
    def patches_to_joint(self, states: Tensor) -> Tensor:
        x = self._check_states(states)  # (B, N, D)
        return self.visual_projection(self.post_layernorm(x)).float()  # (B, N, E)


class SiglipJointSpace(JointSpace):
    """SigLIP's joint space from any ``SiglipModel`` checkpoint, read out through its pooling head."""

    kind = "siglip"

    def __init__(self, model_id: str, model: nn.Module, tokenizer, device: torch.device, dtype: torch.dtype) -> None:
        cfg = model.config
        vision = model.vision_model
        if not getattr(vision, "use_head", False):
            raise ValueError(f"{model_id}: SigLIP checkpoint has no attention-pooling head (vision_use_head=False)")
        super().__init__(
            model_id, tokenizer, device, dtype, cfg.vision_config.hidden_size, cfg.text_config.projection_size
        )
        if self.embed_dim != self.vision_hidden:
            raise ValueError(f"{model_id}: text projection {self.embed_dim} != vision width {self.vision_hidden}")
        self.text_model = model.text_model.to(device, dtype).eval()
        self.post_layernorm = vision.post_layernorm.to(device, dtype).eval()
        self.head = vision.head.to(device, dtype).eval()
        self.max_length = int(cfg.text_config.max_position_embeddings)

    @property
    def has_probe(self) -> bool:
        return True

    @torch.inference_mode()
    def encode_text(self, text: str) -> Tensor:
        # SigLIP was trained on max_length-padded text and pools the last position.
        enc = self._tokenize(text, self.max_length, pad_to_max=True)
        return self.text_model(input_ids=enc["input_ids"]).pooler_output[0].float()  # (E,)

    @torch.inference_mode()
    def patches_to_joint(self, states: Tensor) -> Tensor:
        x = self.post_layernorm(self._check_states(states))  # (B, N, D)
        return head_value_readout(self.head, x).float()  # (B, N, E)

    @torch.inference_mode()
    def probe_attention(self, states: Tensor) -> Tensor:
        x = self.post_layernorm(self._check_states(states))  # (B, N, D)
        return head_probe_attention(self.head, x)

    def joint_flops(self, num_patches: int) -> float:
        d = self.vision_hidden
        d_ff = self.head.mlp.fc1.out_features
        return 2.0 * num_patches * (2 * d * d + 2 * d * d_ff)  # v, o projections + MLP


def head_value_readout(head: nn.Module, x: Tensor) -> Tensor:
    """MaskCLIP-style read-out of a SigLIP attention-pooling head for every token.

    ``x``: ``(B, N, D)`` post-layernorm states. Applies the head's value projection, its
    output projection (no softmax mixing), then its ``layernorm`` + MLP residual. Returns ``(B, N, D)``.
    """
    attn: nn.MultiheadAttention = head.attention
    d = attn.embed_dim
    w_v = attn.in_proj_weight[2 * d :]  # (D, D) value rows of the packed q/k/v projection
    b_v = attn.in_proj_bias[2 * d :] if attn.in_proj_bias is not None else None
    v = nn.functional.linear(x, w_v, b_v)  # (B, N, D)
    o = attn.out_proj(v)  # (B, N, D)
    return o + head.mlp(head.layernorm(o))


def head_probe_attention(head: nn.Module, x: Tensor) -> Tensor:
    """Head-averaged attention of a SigLIP pooling head's probe over ``x`` ``(B, N, D)`` -> ``(B, N)`` float32.

    The same numbers ``nn.MultiheadAttention(probe, x, x, need_weights=True)`` would return,
    computed for the one probe row only.
    """
    attn: nn.MultiheadAttention = head.attention
    d, h = attn.embed_dim, attn.num_heads
    b, n, _ = x.shape
    bias = attn.in_proj_bias if attn.in_proj_bias is not None else x.new_zeros(3 * d)
    q = nn.functional.linear(head.probe.reshape(1, d).to(x.dtype), attn.in_proj_weight[:d], bias[:d])  # (1, D)
    k = nn.functional.linear(x, attn.in_proj_weight[d : 2 * d], bias[d : 2 * d])  # (B, N, D)
    q = q.view(1, h, d // h).expand(b, h, d // h)  # (B, H, Dh)
    k = k.view(b, n, h, d // h).transpose(1, 2)  # (B, H, N, Dh)
    return cls_attention(q, k)  # (B, N)


def dense_states(layer: nn.Module, x: Tensor, readout: str) -> Tensor:
    """Last-layer token states for a dense ``S_inter`` read-out, before the joint space's own map.

    ``layer``: the tower's last encoder layer (HF CLIP/SigLIP: ``layer_norm1``, ``self_attn`` with
    ``q_proj``/``v_proj``/``out_proj``); ``x``: ``(B, L, D)`` its *input* hidden states. The result
    ``(B, L, D)`` goes through :meth:`JointSpace.patches_to_joint` like the raw last-layer states.

    * ``maskclip`` (Zhou et al., ECCV 2022): the value path only, ``out_proj(v_proj(ln1(x)))``:
      no query-key mixing, no residual, no MLP -- each token keeps its own content.
    * ``clearclip`` (Lan et al., ECCV 2024): self-self (query-query) attention in the last layer,
      no residual, no MLP: ``out_proj(softmax(q q^T * scale) v)``.
    """
    attn = layer.self_attn
    y = layer.layer_norm1(x)
    v = attn.v_proj(y)  # (B, L, D)
    if readout == "maskclip":
        return attn.out_proj(v)
    if readout == "clearclip":
        b, length, d = v.shape
        heads = attn.num_heads
        q = attn.q_proj(y).view(b, length, heads, -1).transpose(1, 2)  # (B, H, L, Dh)
        vh = v.view(b, length, heads, -1).transpose(1, 2)
        o = nn.functional.scaled_dot_product_attention(q, q, vh, scale=attn.scale)  # (B, H, L, Dh)
        return attn.out_proj(o.transpose(1, 2).reshape(b, length, d))
    raise ValueError(f"dense read-out must be 'maskclip' or 'clearclip', got {readout!r}")


def joint_space_type(model_id: str) -> str:
    """``clip`` or ``siglip`` from the checkpoint's config; ValueError for anything else."""
    cfg = AutoConfig.from_pretrained(model_id, trust_remote_code=False)
    if cfg.model_type not in JOINT_SPACE_TYPES:
        raise ValueError(f"{model_id}: model_type {cfg.model_type!r} is not a joint space ({JOINT_SPACE_TYPES})")
    return cfg.model_type


def load_joint_space(model_id: str | Path, device: torch.device, dtype: torch.dtype) -> JointSpace:
    """Load a CLIP or SigLIP joint space (text tower + vision read-out) from a dir or hub id.

    Loads the full checkpoint on CPU, keeps the text tower and the small vision-side heads,
    moves those to ``device``/``dtype`` and lets the rest (the vision encoder) go.
    """
    model_id = str(model_id)
    require_safetensors(model_id)
    kind = joint_space_type(model_id)
    model = AutoModel.from_pretrained(
        model_id, trust_remote_code=False, use_safetensors=True, dtype=dtype, attn_implementation="sdpa"
    )
    tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=False)
    cls = ClipJointSpace if kind == "clip" else SiglipJointSpace
    return cls(model_id, model, tokenizer, device, dtype)


__all__ = [
    "ClipJointSpace",
    "JointSpace",
    "SiglipJointSpace",
    "dense_states",
    "head_probe_attention",
    "head_value_readout",
    "joint_space_type",
    "load_joint_space",
]
