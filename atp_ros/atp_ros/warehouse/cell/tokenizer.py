"""The cell model's subword tokenizer: a byte-level BPE trained on the question grammar and English words.

Byte-level BPE maps any typed text (misspellings, unseen words, emoji) to known pieces, so no
input ever becomes ``<unk>``. Its training text is every phrasing of every kind (held-out
ones too: their words must tokenize as well as the training ones), the answers, and a general
English word list so unseen words split into meaningful pieces. Offline, that list is the
words of the CLIP BPE merges shipped with ``open_clip`` (a pinned runtime requirement), in
merge order, which is roughly frequency order. Text is NFKC-normalized and lower-cased.

Every answer of :data:`~atp_ros.warehouse.cell.questions.ANSWERS` is one token, so a model
answers with one token and ``</s>``: plain words through the training text, the hyphenated
``where`` answers (``top-two``), which byte-level pre-tokenization would split at the hyphen,
as whole-word added tokens. No bos/eos is added on encoding; callers append ``</s>`` where
they need it. Special tokens: ``<pad>``, ``<unk>``, ``<s>``, ``</s>`` and ``<image>``.
"""

from __future__ import annotations

import gzip
import importlib.util
import re
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from atp_ros.warehouse.cell.grammar import TEMPLATES, grammar_words, render_template
from atp_ros.warehouse.cell.questions import ANSWERS, KINDS, accepted_answers
from atp_ros.warehouse.cell.truth import COLORS, LEVELS, SLOTS

VOCAB_SIZE = 3072
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
ENGLISH_WORDS = 30_000
RENDERS_PER_TEMPLATE = 24  # enough repeats that every grammar word becomes a token of its own
ANSWER_REPEATS = 40
_CLIP_VOCAB = "bpe_simple_vocab_16e6.txt.gz"
# Words of the cell the grammar does not use yet, so future phrasings find them whole.
CELL_WORDS = (
    "conveyor belt pallet pallets cone cones forklift obstacle obstacles floor robot camera pick place "
    "grasp drop put move carry label letter labels letters colors colours yes no answer question"
)


def english_words(limit: int = ENGLISH_WORDS) -> list[str]:
    """Up to ``limit`` lower-case English words (and common word endings) from the CLIP BPE merges.

    Empty when ``open_clip`` is not installed: the tokenizer then still covers all text
    byte by byte, but splits unseen words into less meaningful pieces.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        return []
    path = Path(spec.origin).parent / _CLIP_VOCAB
    if not path.exists():
        return []
    words: dict[str, None] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        next(f)  # the "#version" header
        for line in f:
            left, _, right = line.rstrip("\n").partition(" ")
            merged = left + right
            # A merge ending in "</w>" closes a word: the words (and suffixes) CLIP saw most.
            if merged.endswith("</w>") and re.fullmatch(r"[a-z]{2,}", merged[:-4]):
                words[merged[:-4]] = None
                if len(words) >= limit:
                    break
    return list(words)


def training_text() -> list[str]:
    """The BPE training lines: grammar renderings, answers and English words (deterministic)."""
    rng = np.random.default_rng(0)
    lines: list[str] = []
    for kind in KINDS:
        for template in TEMPLATES[kind]:
            lines += [render_template(template, _example_slots(kind, rng), rng) for _ in range(RENDERS_PER_TEMPLATE)]
    for answer in ANSWERS:
        lines += [f"answer: {' '.join(accepted_answers(answer))}"] * ANSWER_REPEATS
    lines += [" ".join(grammar_words()), *[CELL_WORDS] * ANSWER_REPEATS]
    words = english_words()
    lines += [" ".join(words[i : i + 64]) for i in range(0, len(words), 64)]
    return lines


def _example_slots(kind: str, rng: np.random.Generator) -> dict:
    """Random slots for ``kind`` (only for training text; they need not match any frame)."""

    def pick(options):
        return options[int(rng.integers(len(options)))]

    def ref() -> dict:
        return {"color": pick(COLORS), "object_kind": pick(("box", "tote"))}

    slots = {"level": pick(LEVELS), "slot": pick(SLOTS), **ref()}
    if kind == "left_right":
        slots = {"a": ref(), "b": ref()}
    return slots


def _backend() -> Tokenizer:
    """An untrained byte-level BPE with normalization, decoding and special tokens set up."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # A prefix space makes a sentence's first word the same token as anywhere else ("Ġred").
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_backend() -> Tokenizer:
    """The trained ``tokenizers`` BPE, with every answer a single token."""
    tok = _backend()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_text(), trainer=trainer)
    # Answers the merges left in pieces (the hyphenated ones) become whole-word tokens; lstrip
    # lets " top-two" (after a space) match too.
    split = [a for a in ANSWERS if len(tok.encode(a).ids) != 1]
    tok.add_tokens([AddedToken(a, single_word=True, lstrip=True, normalized=True) for a in split])
    return tok


def build_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train the tokenizer, save it to ``out_dir`` (``tokenizer.json`` + ``tokenizer_config.json``), return it.

    Loadable with ``AutoTokenizer.from_pretrained(out_dir)``; the same files on every run.
    """
    tok = PreTrainedTokenizerFast(
        tokenizer_object=train_backend(),
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<image>"],
        model_max_length=1024,
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return tok
