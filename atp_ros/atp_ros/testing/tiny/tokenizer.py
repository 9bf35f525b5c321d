"""A word-level fast tokenizer built in-process (no hub, no files needed)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# A small warehouse vocabulary so tiny-model prompts tokenize to real words.
WORDS = (
    "user assistant question answer what where which how many is are the a an of on in at to "
    "there any box boxes pallet pallets shelf shelves forklift robot arm gripper label barcode "
    "red green blue yellow orange white black gray color left right top bottom front back near "
    "far empty full open closed damaged package packages cone cones person floor aisle rack "
    "bin tote crate count pick place grasp object objects scene image camera yes no one two "
    "three four five six seven eight nine ten describe this that it do does can see visible "
    "describe short long small large big"
).split()
PUNCT = list(".,?!:;'\"-()/")
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]


def make_tiny_tokenizer(
    extra_special_tokens: list[str] | None = None, vocab_size: int = 256, words: list[str] | tuple[str, ...] = WORDS
) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: specials, ``extra_special_tokens`` (e.g. ``<image>``), ``words``, filler.

    The vocabulary is padded with ``<w{i}>`` tokens to ``vocab_size`` so the LM head of a
    tiny model can emit any id and decoding still returns text (``vocab_size=0``: no filler).
    """
    extra = list(extra_special_tokens or [])
    tokens = SPECIAL + extra + list(words) + PUNCT
    tokens += [f"<w{i}>" for i in range(max(0, vocab_size - len(tokens)))]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    backend.decoder = decoders.WordPiece(prefix="##")  # joins with spaces, drops nothing
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=extra or None,
    )
    tok.model_max_length = 4096
    return tok
