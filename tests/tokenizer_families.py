"""Tokenizers of every family a user brings, built offline in seconds.

- `bpe`: byte-level BPE (GPT-2 / Llama-3 / Qwen style) — lmforge's own tiny tokenizer.
- `spm_legacy` / `spm`: SentencePiece-style BPE with a `▁` Metaspace pre-tokenizer and byte
  fallback (Llama-2 / Mistral style), as transformers' `LlamaTokenizer` builds it from a vocabulary
  and merges, with `legacy=True` (a `▁` before the text after every special token) and
  `legacy=False` (only at the very start).
- `unigram`: a SentencePiece Unigram model (T5 style) through `T5Tokenizer`, which also splits on
  whitespace (newlines are not tokens).

Each carries the special tokens of every chat template lmforge ships, as single tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaTokenizer, PreTrainedTokenizerBase, T5Tokenizer

from lmforge.models.tiny import (
    BOS,
    EOS,
    PAD,
    TEMPLATE_SPECIAL_TOKENS,
    THINK_TOKENS,
    UNK,
    build_tiny_tokenizer,
)

FAMILIES = ("bpe", "spm_legacy", "spm", "unigram")
BYTES = [f"<0x{i:02X}>" for i in range(256)]


def _sentencepiece_bpe(corpus: list[str], vocab_size: int, legacy: bool) -> LlamaTokenizer:
    trainer_model = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True))
    trainer_model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(BYTES), special_tokens=[UNK, BOS, EOS, *BYTES], show_progress=False
    )
    trainer_model.train_from_iterator(corpus, trainer=trainer)
    state = trainer_model.model
    vocab = trainer_model.get_vocab()
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _merges(trainer_model)]
    del state
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, legacy=legacy, add_prefix_space=True)
    tokenizer.add_special_tokens({"pad_token": PAD, "additional_special_tokens": TEMPLATE_SPECIAL_TOKENS})
    tokenizer.add_tokens(THINK_TOKENS)
    return tokenizer


def _merges(tokenizer: Tokenizer) -> list:
    import json

    return json.loads(tokenizer.to_str())["model"]["merges"]


def _unigram(corpus: list[str], vocab_size: int) -> T5Tokenizer:
    model = Tokenizer(models.Unigram())
    model.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK], unk_token=UNK, show_progress=False
    )
    model.train_from_iterator(corpus, trainer=trainer)
    import json

    vocab = [tuple(piece) for piece in json.loads(model.to_str())["model"]["vocab"]]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, eos_token=EOS, unk_token=UNK, pad_token=PAD)
    tokenizer.add_special_tokens({"bos_token": BOS, "additional_special_tokens": TEMPLATE_SPECIAL_TOKENS})
    tokenizer.add_tokens(THINK_TOKENS)
    return tokenizer


def build_family(family: str, corpus: Iterable[str], vocab_size: int = 400) -> PreTrainedTokenizerBase:
    lines = list(corpus)
    if family == "bpe":
        return build_tiny_tokenizer(lines, vocab_size=vocab_size)
    if family in ("spm_legacy", "spm"):
        return _sentencepiece_bpe(lines, vocab_size, legacy=family == "spm_legacy")
    if family == "unigram":
        return _unigram(lines, vocab_size)
    raise ValueError(f"unknown tokenizer family {family}")
