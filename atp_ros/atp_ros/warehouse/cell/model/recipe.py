"""What decides the cell model's weights: the recipe, the image geometry, the tokenizer and the pixels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from atp_ros.warehouse.train_data import CLIP_FIELDS, CLIP_MEAN, CLIP_STD

IMAGE_SIZE = 256  # a 640 x 480 frame is squeezed to this square, as the shipped processor does
PATCH = 16
GRID = IMAGE_SIZE // PATCH  # 16
NUM_PATCHES = GRID * GRID  # 256 visual tokens
# Training frames are rendered at these sizes (width, height) and squeezed like a camera frame:
# the camera's 4:3 most of the time, the stills' square default sometimes.
RENDER_SIZES = ((640, 480), (640, 480), (480, 360), (336, 336))
TEXT_POSITIONS = 48  # the CLIP text tower's context: the longest phrasing is well under it

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "GRID",
    "IMAGE_SIZE",
    "NUM_PATCHES",
    "PATCH",
    "Recipe",
    "clip_part",
    "llava_feature_layers",
    "pixels",
]


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights (seeded: the same recipe gives the same model)."""

    seed: int = 0
    train_images: int = 8_000
    val_images: int = 300
    test_images: int = 150  # rendered at 640 x 480 for the end-of-training report
    test_per_image: int = 4
    latency_repeats: int = 30
    chunk: int = 250  # frames rendered (and saved in --work) per chunk
    clip_steps: int = 1_200
    clip_batch: int = 40
    clip_lr: float = 1e-3
    # Phase 1b (ground_phase): the CLIP goes on with read-outs of each patch's place and letter.
    ground_steps: int = 800
    ground_lr: float = 1e-3
    ground_weight: float = 2.0
    llava_steps: int = 3_000
    llava_batch: int = 32
    # The question before the image in the prompt (one question per sequence); otherwise llava-1.5's
    # image-first order with ``llava_turns`` question/answer turns per image in one sequence.
    question_first: bool = False
    llava_turns: int = 1  # one question per image measured better per minute than six (0.46 vs 0.40 at 200 steps)
    llava_lr: float = 1e-3
    drop_share: float = 0.3  # sequences trained on a random 10-100% subset of image tokens
    # Curriculum: a sequence first keeps its questions' evidence patches and only ``distractors_start`` of
    # the others, a share that grows to all along a square ramp over the first ``distractor_ramp`` of the
    # steps. With every patch from the start the LLM learned little beyond the question's prior (attempts 1-5).
    distractors_start: float = 0.02
    distractor_ramp: float = 0.6
    # Attention supervision: in this LM layer, these heads of the answer-predicting position are
    # taught to look at the question's evidence patches.
    sup_layer: int = 2
    sup_heads: int = 2
    sup_weight: float = 1.0
    sup_turns: int = 1  # turns per sequence whose attention is supervised (the loss is a per-turn loop)
    sup_detach_keys: bool = True  # the supervision moves the question's query, not the image tokens
    # Phase 4: the LLaVA goes on from phase 3 with every patch and ``question_noise`` of its questions
    # reworded (greetings, tails, unknown words swapped in or inserted, filler words dropped), so a phrasing
    # it never saw is answered from the words that decide the question rather than the template's shape.
    tune_steps: int = 1_200
    tune_lr: float = 3e-4
    question_noise: float = 0.5
    extra_phrasings: float = 0.5  # share of phase 4's questions in noise.EXTRA_TEMPLATES' phrasings
    # Kinds phase 4 draws twice as often (the LLaVA phase's ``hard_kinds``, as the bundled seventh attempt
    # trained). The eighth attempt drew the worst-answered and the arm kinds instead and came out worse
    # (bench/results/cell_training.json, attempt_8).
    tune_hard_kinds: tuple[str, ...] = ("color_at", "label_at", "where", "left_right", "which_level")
    # Phase 5 (dialog): the LLaVA goes on from phase 4 with ``dialog_turns`` questions about one image in
    # each sequence (phase 4's rewording, every patch). Train and validation accuracy stayed level with each
    # other in every earlier phase (the model underfits), and with every patch kept the 256 image tokens
    # dominate a one-question sequence: six turns give six answers for about 1.5 times the compute.
    dialog_steps: int = 1_000
    dialog_turns: int = 6
    dialog_lr: float = 3e-4
    # Share of phase 5's sequences that see a pruned image: the evidence patches of all their turns plus a
    # random ``PRUNED_OTHERS`` share of the others, as a good pruner would leave it, so the answers that
    # need every instance (counts) or the whole frame hold under pruning. 0 draws nothing (older recipes).
    dialog_pruned: float = 0.0
    # Share of phase 5's turns, on frames with a same-color box and tote on the racking, replaced by a question
    # about one of them (``questions.contrast_questions``): answered from the color alone such questions go
    # wrong half the time, and in the random draw they are too rare to teach the object kind. 0 draws nothing.
    dialog_twins: float = 0.0
    # Weight of phase 5's object-kind read-out: each kept image token on a shelf box or tote is taught to name
    # its kind ("box" / "tote" through the final norm and lm_head) from its hidden state entering decoder layer
    # ``sup_layer``, where the supervised heads look the question's item up. 0 adds nothing.
    dialog_kind_weight: float = 0.0
    # Phase 5 supervises the attention of each sequence's first contrast turn as well as its first ``sup_turns``:
    # asked "where is the red box?" and "where is the red tote?" about one frame, the sixteenth and seventeenth
    # attempts gave the same slot for both, so the question's kind word had no part in the item's lookup.
    dialog_sup_contrast: bool = False
    # Phase 5's tower touch-up, before its LLaVA steps: the CLIP goes on with phase 1b's losses plus a read-out of
    # each shelf item's kind (box or tote) for this many steps at ``dialog_tower_lr``; phase 5 then reads the
    # touched tower's features. 0 keeps phase 1b's tower.
    dialog_tower_steps: int = 0
    dialog_tower_lr: float = 3e-4
    # The touch-up's letter read-out (phase 1b's ``label`` loss) counted this many times: at 1 the tower hardly
    # learns the box letters (docs/warehouse.md, the letter pilot).
    dialog_tower_letter_weight: float = 1.0
    # Kinds phase 5 draws twice as often; empty keeps phase 4's ``tune_hard_kinds`` (the earlier attempts).
    dialog_hard_kinds: tuple[str, ...] = ()
    # Share of phase 5's questions worded with ``noise.MORE_TEMPLATES`` (sentence shapes another kind's answers
    # fit). 0 draws nothing (the earlier attempts).
    dialog_more_phrasings: float = 0.0
    # Weight of phase 5's letter read-out: each kept image token on a shelf box with a readable letter is taught
    # to name that letter among the six letter answers ("a" .. "f" through the final norm and lm_head, the other
    # tokens left out so it shares layer ``sup_layer`` with the object-kind read-out). 0 adds nothing.
    dialog_letter_weight: float = 0.0
    feature_layer: int = -1  # the layer the region loss aligned with the questions' words
    # Tower layers the projector reads besides ``feature_layer`` (llava's list-valued ``vision_feature_layer``):
    # layer 0, the embeddings, carries each patch's absolute position, which the LLM needs to find "slot
    # two of the top level" and which the last layer keeps only weakly.
    position_layers: tuple[int, ...] = (0,)
    # Kinds drawn twice for the LLM: the slot- and object-bound lookups are the hard part.
    hard_kinds: tuple[str, ...] = ("color_at", "label_at", "where", "left_right", "which_level")
    # The towers' and the LM's matmuls in bfloat16 (weights, optimizer and losses stay float32) on a CPU that
    # computes bfloat16 natively (AVX512-BF16 or AMX; ``native_bf16``). Elsewhere (AVX2 only) oneDNN emulates
    # bfloat16 far slower than float32 (bench/results/cpu_bf16.json), so the run stays in float32 there.
    bf16: bool = True
    # The LLaVA phase in float32: measured no slower at the curriculum's short sequences, and the earlier
    # float32 run learned faster than the bfloat16 ones.
    llava_bf16: bool = False
    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 6
    text_hidden: int = 128
    text_layers: int = 2
    lm_hidden: int = 256
    lm_layers: int = 4
    lm_intermediate: int = 768


QUICK = {
    "train_images": 24,
    "val_images": 6,
    "test_images": 2,
    "test_per_image": 2,
    "latency_repeats": 2,
    "chunk": 12,
    "clip_steps": 3,
    "clip_batch": 8,
    "ground_steps": 2,
    "llava_steps": 3,
    "tune_steps": 2,
    "dialog_steps": 2,
    "dialog_turns": 2,
    "llava_batch": 4,
    "llava_turns": 3,
    "vision_hidden": 64,
    "vision_layers": 2,
    "vision_heads": 2,
    "text_hidden": 64,
    "text_layers": 1,
    "lm_hidden": 64,
    "lm_layers": 3,  # the attention supervision reads layer 2
    "lm_intermediate": 128,
}

_CELL_CLIP_FIELDS = (*CLIP_FIELDS, "vision_heads", "chunk")
_GROUND_FIELDS = ("ground_steps", "ground_lr", "ground_weight", "feature_layer")
TUNE_FIELDS = ("tune_steps", "tune_lr", "question_noise", "extra_phrasings", "tune_hard_kinds")
DIALOG_FIELDS = (
    "dialog_steps",
    "dialog_turns",
    "dialog_lr",
    "dialog_pruned",
    "dialog_twins",
    "dialog_kind_weight",
    "dialog_sup_contrast",
    "dialog_tower_steps",
    "dialog_tower_lr",
    "dialog_tower_letter_weight",
    "dialog_hard_kinds",
    "dialog_more_phrasings",
    "dialog_letter_weight",
)


def clip_part(recipe: dict) -> dict:
    """The recipe fields that decide the frames and the CLIP phase (kept while they are unchanged)."""
    return {k: recipe.get(k) for k in _CELL_CLIP_FIELDS}


def ground_part(recipe: dict) -> dict:
    """The recipe fields that decide the grounding phase (1b)."""
    return {k: recipe.get(k) for k in _GROUND_FIELDS}


def llava_part(recipe: dict) -> dict:
    """The recipe fields that decide everything up to the end of the LLaVA phase (3), phase 4's left out."""
    return {k: v for k, v in recipe.items() if k not in (*TUNE_FIELDS, *DIALOG_FIELDS)}


def tune_part(recipe: dict) -> dict:
    """The recipe fields that decide everything up to the end of phase 4, phase 5's left out."""
    return {k: v for k, v in recipe.items() if k not in DIALOG_FIELDS}


def llava_feature_layers(r: Recipe) -> list[int] | int:
    """The LLaVA's ``vision_feature_layer``: ``position_layers`` then ``feature_layer`` (an int when alone)."""
    layers = [*r.position_layers, r.feature_layer]
    return layers if len(layers) > 1 else r.feature_layer


def pixels(rgb: np.ndarray) -> np.ndarray:
    """The frame squeezed to ``IMAGE_SIZE`` x ``IMAGE_SIZE`` (bicubic, as the shipped processor), uint8 HWC."""
    img = Image.fromarray(rgb)
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matmuls natively (AVX512-BF16 or AMX tiles)."""
    import torch

    # torch exposes the probes only as private helpers; a torch without them counts as "not native".
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe() for probe in probes if probe is not None)


def tower_precision(r: Recipe) -> str:
    """The precision the towers' matmuls train in under ``r`` on this CPU: ``bfloat16`` or ``float32``."""
    return "bfloat16" if r.bf16 and native_bf16() else "float32"


def bf16_forward(module, r: Recipe) -> None:
    """Run ``module``'s forward under CPU bfloat16 autocast (when ``r.bf16`` and the CPU does bfloat16
    natively), its floating outputs returned as float32: the towers' matmuls go fast while the losses'
    cosines, logsumexps and soft-maxes stay in float32. ``plain_forward`` undoes it."""
    import torch

    if tower_precision(r) != "bfloat16":
        return
    inner = module.forward

    def forward(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _to_float(inner(*args, **kwargs))

    module.forward = forward


def plain_forward(module) -> None:
    """Undo :func:`bf16_forward` (the class's forward again)."""
    vars(module).pop("forward", None)


def _to_float(value):
    import torch

    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_to_float(v) for v in value)
    if isinstance(value, dict):  # a transformers ModelOutput
        for key in list(value.keys()):
            value[key] = _to_float(value[key])
    return value


def normalize(rgb: np.ndarray):
    """uint8 ``(B, H, W, 3)`` -> the CLIP pixel tensor ``(B, 3, H, W)`` (rescaled, normalized)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(rgb)).float().div_(255.0)
    x = (x - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    return x.permute(0, 3, 1, 2).contiguous()


def make_tokenizer(work: Path):
    """The cell's byte-level BPE (``cell.tokenizer``), built into ``work/tokenizer`` (deterministic)."""
    from atp_ros.warehouse.cell.tokenizer import build_tokenizer

    tok = build_tokenizer(work / "tokenizer")
    tok.padding_side = "left"
    return tok
