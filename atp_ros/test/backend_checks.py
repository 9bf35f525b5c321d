"""What the backend tests share: frames and questions, hook recorders, and one *tester* per VLM family.

A tester (like transformers' ``ModelTester``) knows how to build its family's tiny checkpoint
(:mod:`atp_ros.testing.tiny`), which module is its language model, how its consumer of the kept
tokens looks to the FLOP counter, and its quirks. ``backends/test_backend_contract.py`` runs every
contract check on every tester in :data:`TESTERS`: a new family gets them all by adding one tester.
Tests of what only one family does stay in its ``backends/test_backend_<family>.py``.

Every tiny checkpoint sees an 8 x 8 patch grid (64 patches) and is loaded on the CPU through
``load_backend``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from atp_ros.backends import VlmBackend, VlmResult
from atp_ros.backends.blip2 import Blip2Backend, qformer_flops
from atp_ros.backends.flops import decoder_prefill_flops, lm_dims, tower_flops
from atp_ros.backends.idefics import IdeficsBackend, resampler_flops
from atp_ros.backends.llava import LlavaBackend, llava_costs
from atp_ros.backends.llava_onevision import LlavaNextBackend, LlavaOnevisionBackend, onevision_costs
from atp_ros.backends.qwen2_5_vl import Qwen25VLBackend, qwen_costs, qwen_vision_flops
from atp_ros.backends.smolvlm import SmolVLMBackend, smolvlm_costs
from atp_ros.method import Selection
from atp_ros.testing.tiny.blip2 import save_tiny_blip2
from atp_ros.testing.tiny.idefics import save_tiny_idefics
from atp_ros.testing.tiny.llava import save_tiny_llava
from atp_ros.testing.tiny.llava_next import save_tiny_llava_next
from atp_ros.testing.tiny.llava_onevision import save_tiny_llava_onevision
from atp_ros.testing.tiny.qwen2_5_vl import save_tiny_qwen2_5_vl
from atp_ros.testing.tiny.smolvlm import save_tiny_smolvlm
from torch.utils.flop_counter import FlopCounterMode

MAX_NEW = 5
QUESTIONS = ["where is the red box?", "how many pallets are on the shelf?", "is the aisle empty?"]
N = 64  # patches per image in every tiny checkpoint


def frames() -> list[np.ndarray]:
    """Three random RGB frames of different sizes: each processor resizes them to its tower's input."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 50), (32, 32), (64, 48))]


def counted(fn: Callable[[], Any]) -> int:
    """FLOPs ``torch.utils.flop_counter`` counts while ``fn()`` runs (no grad)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


# ---------------------------------------------------------------- hook recorders


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


class LmCalls(Hooks):
    """Keyword inputs of every forward of a language model (prefill first, then one per decode step)."""

    KEYS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids")

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []
        self.handles = [lm.register_forward_pre_hook(self._keep, with_kwargs=True)]

    def _keep(self, _module, _args, kwargs) -> None:
        call = {k: kwargs.get(k) for k in self.KEYS}
        cache = kwargs.get("past_key_values")
        call["cached"] = 0 if cache is None else int(cache.get_seq_length())
        self.calls.append(call)

    @property
    def prefill(self) -> dict[str, Any]:
        return self.calls[0]

    def prefill_tokens(self) -> torch.Tensor:
        """What the prefill embedded: ``inputs_embeds`` when given, else ``input_ids``."""
        call = self.prefill
        return call["inputs_embeds"] if call["inputs_embeds"] is not None else call["input_ids"]


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


# ---------------------------------------------------------------- one tester per family


class FamilyTester:
    """The contract suite's view of one family; subclasses fill in what differs."""

    name = ""
    family = ""
    requires: tuple[str, ...] = ()  # importable modules the tiny checkpoint needs (skip without them)
    positions_matter = False  # do AtpConfig.positions reach the LLM (visual tokens in its sequence)?
    position_modes = ("compact", "original")  # the modes the family implements (the others: a note)
    default_intra = "cls"  # S_intra of intra_signal="cls": "cls", "probe" (SigLIP) or "received" (no CLS, no probe)
    intra_from_text_tower = False  # does S_intra read something only the text tower brings (SigLIP's probe)?
    dense_readouts = False  # maskclip / clearclip S_inter read-outs implemented
    shrinking = ("projector",)  # FLOP stages that pruning shrinks; the others do not change with K
    unpruned = ("projector_keep_all", "projector")  # (flops key, stage): that stage without pruning

    backend_cls: type[VlmBackend] = VlmBackend
    builder: Callable[..., Path]  # the family's save_tiny_* (a staticmethod)
    build_kwargs: tuple[tuple[str, Any], ...] = ()

    def save(self, path: Path) -> Path:
        """Build and save the tiny checkpoint (with its text tower) under ``path``."""
        return self.builder(path, **dict(self.build_kwargs))

    def expected_grids(self, backend: VlmBackend, images: list[np.ndarray]) -> list[tuple[int, int]]:
        """Each image's token grid as the stock processor makes it (fixed-size families: 8 x 8 for every frame)."""
        return [(8, 8)] * len(images)

    def always_fed(self, backend: VlmBackend, result: VlmResult, b: int) -> int:
        """Visual tokens image ``b``'s consumer gets besides the K kept (CLS when fed: ``backend.prefix``)."""
        return backend.prefix

    def check_grid(self, backend: VlmBackend) -> None:
        """What the loaded backend says about its grid (fixed-size families: one 8 x 8 grid, N = 64)."""
        assert backend.grid == (8, 8) and backend.num_visual_tokens == N

    def vision_flop_cases(self, backend: VlmBackend) -> dict[str, tuple[Callable[[], Any], float]]:
        """``{name: (a call of the vision tower, the FLOPs the backend reports for it)}``, eager attention."""
        v = backend.model.config.vision_config
        pixels = torch.randn(1, 3, v.image_size, v.image_size)
        assert backend.vision_flops == tower_flops(v, backend.has_cls)
        return {"vision": (lambda: self.vision_tower(backend)(pixels), tower_flops(v, backend.has_cls))}

    def language_model(self, backend: VlmBackend) -> torch.nn.Module:
        """The module whose forward gets the prompt's ids or embeddings, mask, positions and KV cache."""
        raise NotImplementedError

    def vision_tower(self, backend: VlmBackend) -> torch.nn.Module:
        raise NotImplementedError

    def llm_image_tokens(self, backend: VlmBackend, result: VlmResult, b: int) -> int:
        """Tokens of prompt ``b`` the LLM sequence holds for the image (besides ``result.text_tokens[b]``)."""
        raise NotImplementedError

    def flop_cases(self, backend: VlmBackend) -> dict[str, tuple[Callable[[], Any], float]]:
        """``{stage: (a call of the real modules, the analytic FLOPs it should count)}``, eager attention."""
        raise NotImplementedError

    def consumer_output(self, backend: VlmBackend) -> tuple[torch.nn.Module, Callable] | None:
        """``(module, pick)`` whose per-image output depends only on that image's kept tokens, if any."""
        return None

    def check_loaded(self, backend: VlmBackend) -> None:
        """What only this family's freshly loaded backend shows."""

    def check_dtype(self, backend: VlmBackend) -> None:
        """What only this family keeps in another dtype (checked on every dtype and on CUDA)."""


class LlavaTester(FamilyTester):
    family = "llava"
    positions_matter = True
    dense_readouts = True
    shrinking = ("projector", "llm_prefill")
    unpruned = ("llm_prefill_unpruned", "llm_prefill")

    backend_cls = LlavaBackend
    builder = staticmethod(save_tiny_llava)

    def __init__(self, tower: str) -> None:
        self.tower = tower
        self.name = f"llava-{tower}"
        self.default_intra = "cls" if tower == "clip" else "probe"
        self.intra_from_text_tower = tower == "siglip"  # llava-interleave's tower has no head: the probe is the tower's
        self.build_kwargs = (("tower", tower),)

    def language_model(self, backend):
        return backend.model.model.language_model

    def vision_tower(self, backend):
        return backend.tower

    def llm_image_tokens(self, backend, result, b):
        return result.consumer_tokens[b]  # the shortened <image> run: prefix + K

    def flop_cases(self, backend):
        cfg = backend.model.config
        k, text = 10, 23
        feats = torch.randn(1, k, cfg.vision_config.hidden_size)
        embeds = torch.randn(1, text + k, cfg.text_config.hidden_size)
        costs = llava_costs(cfg, [text], [k])
        assert costs["llm_tokens"] == text + k
        return {
            "projector": (lambda: backend.projector(feats), costs["projector"]),
            "llm_prefill": (lambda: self.language_model(backend)(inputs_embeds=embeds), costs["llm_prefill"]),
        }

    def check_loaded(self, backend):
        assert backend.joint.kind == self.tower


class Blip2Tester(FamilyTester):
    name = family = "blip-2"
    requires = ("open_clip",)

    backend_cls = Blip2Backend
    builder = staticmethod(save_tiny_blip2)

    def language_model(self, backend):
        return backend.model.language_model

    def vision_tower(self, backend):
        return backend.model.vision_model

    def llm_image_tokens(self, backend, result, b):
        return backend.model.config.num_query_tokens  # the Q-Former's queries, whatever K is

    def flop_cases(self, backend):
        model, cfg = backend.model, backend.model.config
        keys = torch.randn(1, 1 + 9, cfg.vision_config.hidden_size)
        embeds = torch.randn(1, 30, cfg.text_config.hidden_size)

        def qformer() -> None:
            out = model.qformer(query_embeds=model.query_tokens, encoder_hidden_states=keys).last_hidden_state
            model.language_projection(out)

        return {
            "projector": (qformer, qformer_flops(cfg, 1 + 9)),
            "llm_prefill": (
                lambda: model.language_model.model(inputs_embeds=embeds),
                decoder_prefill_flops(30, **lm_dims(cfg.text_config)),
            ),
        }

    def consumer_output(self, backend):
        return backend.model.qformer, lambda out: out.last_hidden_state

    def check_dtype(self, backend):
        if backend.dtype == torch.float16 or backend.device.type == "cuda":
            assert backend.model.qformer.layernorm.weight.dtype == torch.float32  # BLIP-2 keeps the Q-Former fp32


class IdeficsTester(FamilyTester):
    name = family = "idefics"

    backend_cls = IdeficsBackend
    builder = staticmethod(save_tiny_idefics)

    def language_model(self, backend):
        return backend.model.model

    def vision_tower(self, backend):
        return backend.model.model.vision_model

    def llm_image_tokens(self, backend, result, b):
        return 1  # one <image> token; the gated cross-attention reads the resampled latents

    def flop_cases(self, backend):
        cfg = backend.model.config
        context = torch.randn(1, 1 + 9, cfg.vision_config.embed_dim)
        return {"projector": (lambda: backend.model.model.perceiver_resampler(context), resampler_flops(cfg, 1 + 9))}

    def consumer_output(self, backend):
        return backend.model.model.perceiver_resampler.layer_norm, lambda out: out

    def check_loaded(self, backend):
        assert backend.joint.kind == "clip" and backend.model.config.use_resampler


class Qwen25VLTester(FamilyTester):
    """Qwen2.5-VL: a per-frame grid of LLM tokens (2x2 merge groups), M-RoPE, received attention, a given tower."""

    name = family = "qwen2_5_vl"
    positions_matter = True
    position_modes = ("original",)  # M-RoPE: original positions only
    default_intra = "received"  # no CLS, no pooling head
    shrinking = ("llm_prefill",)  # the merger runs in the tower on every patch: projector 0 either way
    unpruned = ("llm_prefill_unpruned", "llm_prefill")

    backend_cls = Qwen25VLBackend
    builder = staticmethod(save_tiny_qwen2_5_vl)

    def expected_grids(self, backend, images):
        # The stock processor's image_grid_thw (patches) over the 2x2 merge: 40x50 -> 5x6, 32x32 -> 4x4, 64x48 -> 8x6.
        from PIL import Image

        thw = backend.processor.image_processor(images=[Image.fromarray(i) for i in images])["image_grid_thw"]
        return [(int(h) // 2, int(w) // 2) for _, h, w in thw.tolist()]

    def check_grid(self, backend):
        assert backend.grid is None and backend.num_visual_tokens == 64  # at most 64 x 64 px: 8 x 8 tokens

    def language_model(self, backend):
        return backend.model.model.language_model

    def vision_tower(self, backend):
        return backend.visual

    def llm_image_tokens(self, backend, result, b):
        return result.consumer_tokens[b]  # the shortened <|image_pad|> run; vision start/end count as text

    def vision_flop_cases(self, backend):
        from PIL import Image

        frame = Image.fromarray(frames()[0])  # 40 x 50 -> 10 x 12 patches: windows of 2x2 merged tokens, one cut
        enc = backend.processor.image_processor(images=[frame], return_tensors="pt")
        thw = tuple(int(x) for x in enc["image_grid_thw"][0])
        run = lambda: backend.visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"])  # noqa: E731
        return {"vision": (run, qwen_vision_flops(backend.visual.config, thw))}

    def flop_cases(self, backend):
        cfg = backend.model.config
        k, text = 10, 23
        embeds = torch.randn(1, text + k, cfg.text_config.hidden_size)
        costs = qwen_costs(cfg, [text], [k], [40])
        assert costs["llm_tokens"] == text + k
        return {"llm_prefill": (lambda: self.language_model(backend)(inputs_embeds=embeds), costs["llm_prefill"])}

    def check_loaded(self, backend):
        assert backend.joint.kind == "siglip" and backend.score_layer == 3  # the last full-attention block
        assert any("an approximation" in note for note in backend.load_notes)


class SmolVLMTester(FamilyTester):
    """SmolVLM2: pixel-shuffled tile tokens (2x2 patches each, 16 per 32-px tile), up to 2x2 tiles + a global
    tile that always reaches the LLM, SigLIP probe and joint space from the given SigLIP tower, 1-D positions."""

    name = family = "smolvlm"
    requires = ("num2words",)  # SmolVLMProcessor needs it
    positions_matter = True
    default_intra = "probe"
    intra_from_text_tower = True  # SmolVLM's tower has no head: the probe comes with the SigLIP text tower
    shrinking = ("llm_prefill",)  # the connector projects every tile's tokens whatever K is
    unpruned = ("llm_prefill_unpruned", "llm_prefill")

    backend_cls = SmolVLMBackend
    builder = staticmethod(save_tiny_smolvlm)

    def expected_grids(self, backend, images):
        # The stock processor's tile layout: every contract frame is resized to a 64-px long side -> 2x2 tiles.
        from PIL import Image

        info = backend.processor.image_processor(
            images=[[Image.fromarray(i)] for i in images], return_row_col_info=True
        )
        return [(4 * r[0], 4 * c[0]) if r[0] else (4, 4) for r, c in zip(info["rows"], info["cols"], strict=True)]

    def always_fed(self, backend, result, b):
        return 16 if result.grid_of(b) != (4, 4) else 0  # the global tile, when the frame was split

    def check_grid(self, backend):
        assert backend.grid is None and backend.num_visual_tokens == 64  # at most 2x2 tiles of 4x4 tokens

    def language_model(self, backend):
        return backend.model.model.text_model

    def vision_tower(self, backend):
        return backend.tower

    def llm_image_tokens(self, backend, result, b):
        return result.consumer_tokens[b]  # kept local tokens + the global tile's

    def flop_cases(self, backend):
        cfg = backend.model.config
        states = torch.randn(1, 64, cfg.vision_config.hidden_size)  # one tile's patches
        embeds = torch.randn(1, 30, cfg.text_config.hidden_size)
        costs = smolvlm_costs(cfg, [14], [16], [1])  # one tile: 16 tokens
        assert costs["llm_tokens"] == 30
        return {
            "projector": (lambda: backend.connector(states), costs["projector"]),
            "llm_prefill": (lambda: self.language_model(backend)(inputs_embeds=embeds), costs["llm_prefill"]),
        }

    def check_loaded(self, backend):
        assert backend.joint.kind == "siglip" and backend.joint.has_probe
        assert any("an approximation" in note for note in backend.load_notes)


class LlavaOnevisionTester(FamilyTester):
    """LLaVA-OneVision: a base crop + an anyres grid (unpadded, pooled) with a newline per grid row; K counts the
    grid's tokens, the base crop and newlines always fed; SigLIP probe and joint space from the given tower."""

    name = family = "llava_onevision"
    positions_matter = True
    default_intra = "probe"
    intra_from_text_tower = True  # the tower is saved without SigLIP's head: the probe comes with the text tower
    shrinking = ("llm_prefill",)  # the projector runs on every crop's patches before packing
    unpruned = ("llm_prefill_unpruned", "llm_prefill")

    backend_cls = LlavaOnevisionBackend
    builder = staticmethod(save_tiny_llava_onevision)

    def expected_grids(self, backend, images):
        # The stock packed features: the rows equal to the model's newline embedding end each grid row.
        from PIL import Image

        enc = backend.processor.image_processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")
        cfg = backend.model.config
        packed = backend.model.model.get_image_features(
            enc["pixel_values"],
            enc["image_sizes"],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        ).pooler_output
        grids = []
        for x in packed:
            rows = int((x == backend.model.model.image_newline).all(dim=-1).sum())
            grids.append((rows, (len(x) - 64 - rows) // rows))
        return grids

    def always_fed(self, backend, result, b):
        return 64 + result.grid_of(b)[0]  # the base crop and one newline per grid row

    def check_grid(self, backend):
        assert backend.grid is None and backend.num_visual_tokens == 9 * 64

    def language_model(self, backend):
        return backend.model.model.language_model

    def vision_tower(self, backend):
        return backend.tower

    def llm_image_tokens(self, backend, result, b):
        return result.consumer_tokens[b]

    def flop_cases(self, backend):
        cfg = backend.model.config
        states = torch.randn(1, 64, cfg.vision_config.hidden_size)
        embeds = torch.randn(1, 30, cfg.text_config.hidden_size)
        costs = onevision_costs(cfg, [20], [10], [1], [64])
        assert costs["llm_tokens"] == 30
        return {
            "projector": (lambda: backend.model.model.multi_modal_projector(states), costs["projector"]),
            "llm_prefill": (lambda: self.language_model(backend)(inputs_embeds=embeds), costs["llm_prefill"]),
        }

    def check_loaded(self, backend):
        assert backend.joint.kind == "siglip" and backend.joint.has_probe


class LlavaNextTester(LlavaOnevisionTester):
    """LLaVA-NeXT: OneVision's layout with CLIP crops (a CLS each, dropped before the projector): per-crop CLS
    attention, the CLIP joint space the tower came from."""

    name = family = "llava_next"
    default_intra = "cls"
    intra_from_text_tower = False

    backend_cls = LlavaNextBackend
    builder = staticmethod(save_tiny_llava_next)

    def check_grid(self, backend):
        assert backend.grid is None and backend.num_visual_tokens == 4 * 64  # the 2x2-crop pinpoint

    def check_loaded(self, backend):
        assert backend.joint.kind == "clip" and backend.has_cls and backend.score_layer == 1  # feature layer -2


TESTERS: list[FamilyTester] = [
    LlavaTester("clip"),
    LlavaTester("siglip"),
    Blip2Tester(),
    IdeficsTester(),
    Qwen25VLTester(),
    SmolVLMTester(),
    LlavaOnevisionTester(),
    LlavaNextTester(),
]


def samples_accuracy(model: VlmBackend, samples: list, atp) -> float:
    """Share of ``(rgb, question)`` samples a trained model answers right (any of ``question.answers``)."""
    from atp_ros.evaluation import metrics

    res = model.answer([s[0] for s in samples], [s[1].question for s in samples], atp, max_new_tokens=3)
    right = [metrics.correct(a, q.answers or (q.answer,)) for a, (_, q) in zip(res.answers, samples, strict=True)]
    return float(np.mean(right))
