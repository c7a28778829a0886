"""A word-level tokenizer built entirely in code, for tiny test and testbed backbones."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]

# Words every tiny backbone knows even without a data vocabulary: the prompt template
# and a handful of generic words, so ad-hoc prompts in tests tokenize sensibly.
BASE_WORDS = [
    "user", "assistant", ":", "?", ".", ",", "\n", "what", "is", "the", "a", "in", "image",
    "describe", "this", "yes", "no", "of", "color", "shape", "how", "many", "are", "there",
]


def word_tokenizer(words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Build a lowercase word-level tokenizer whose vocabulary is ``SPECIAL_TOKENS + BASE_WORDS + words``.

    Text is split on whitespace and punctuation, so ``"triangle?"`` becomes ``["triangle", "?"]``.
    Unknown words map to ``<unk>``. Padding is on the left, as batched generation needs.
    """
    vocab: dict[str, int] = {}
    for w in [*SPECIAL_TOKENS, *BASE_WORDS, *words]:
        w = w if w in SPECIAL_TOKENS else w.lower()
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
        model_max_length=4096,
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast
