"""Turn conversations into token ids and labels.

Only response tokens carry labels; every prompt token is -100. Each response ends with
the template's stop token, which is labelled, so the model learns to stop. Padding is
added later by the collator and is always -100, so a tokenizer whose pad id equals its
EOS id still trains EOS.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from lmforge.data.files import DataError
from lmforge.data.formats import Example, class_label
from lmforge.data.templates import AnyTemplate, Conversation

IGNORE = -100


@dataclass
class TokenizeStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # prompt alone filled max_length: nothing left to learn
    tokens: int = 0
    label_tokens: int = 0
    image_cut: int = 0  # dropped: truncation would have cut an image's tokens
    truncated_where: list[str] = field(default_factory=list)  # the first few, for messages
    dropped_where: list[str] = field(default_factory=list)

    def note(self, kind: str, where: str) -> None:
        bucket = self.truncated_where if kind == "truncated" else self.dropped_where
        if len(bucket) < 5:
            bucket.append(where)

    def absorb(self, other: TokenizeStats) -> None:
        """Add the counts of `other` (the next part of the same examples) to these."""
        for name in ("examples", "truncated", "dropped", "tokens", "label_tokens", "image_cut"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.truncated_where = (self.truncated_where + other.truncated_where)[:5]
        self.dropped_where = (self.dropped_where + other.dropped_where)[:5]


def encode_conversation(
    conversation: Conversation,
    template: AnyTemplate,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    train_on: str = "all_turns",
) -> tuple[dict[str, list[int]] | None, bool]:
    """(input_ids + labels, was_truncated); None when no response token fits in max_length.

    `train_on="last_turn"` masks every assistant turn but the last.
    """
    return fit_segments(template.encode(conversation, tokenizer), max_length, train_on)


def fit_segments(
    segments: list[tuple[list[int], list[int]]], max_length: int, train_on: str = "all_turns"
) -> tuple[dict[str, list[int]] | None, bool]:
    """`encode_conversation` of a conversation's encoded (prompt, response) segments."""
    input_ids: list[int] = []
    labels: list[int] = []
    truncated = False
    for index, (prompt_ids, response_ids) in enumerate(segments):
        learn = train_on == "all_turns" or index == len(segments) - 1
        room = max_length - len(input_ids)
        if room <= 0:
            truncated = True
            break
        prompt_part = prompt_ids[:room]
        response_part = response_ids[: room - len(prompt_part)]
        truncated = truncated or len(prompt_part) < len(prompt_ids) or len(response_part) < len(response_ids)
        input_ids += prompt_part + response_part
        labels += [IGNORE] * len(prompt_part) + (response_part if learn else [IGNORE] * len(response_part))
    if not any(label != IGNORE for label in labels):
        return None, truncated
    return {"input_ids": input_ids, "labels": labels}, truncated


def encode_example(
    example: Example,
    template: AnyTemplate,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    train_on: str = "all_turns",
) -> tuple[dict[str, list[int]] | None, bool]:
    """(input_ids + labels, was_truncated); None also when truncation would cut an image's tokens."""
    encoded, truncated = encode_conversation(
        example.conversation(), template, tokenizer, max_length, train_on
    )
    return (None if truncated and example.images else encoded), truncated


PARALLEL_FROM = 2000  # fewer examples tokenize sooner in this process than in workers


def workers(num_proc: int | None) -> int:
    """Processes for data preparation: `num_proc` (data.num_proc), or the cores this process may use."""
    if num_proc is not None:
        return num_proc
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def tokenize_examples(
    examples: list[Example],
    template: AnyTemplate,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    train_on: str = "all_turns",
    num_proc: int = 1,
) -> tuple[Dataset, TokenizeStats]:
    """SFT rows (input_ids + labels). Examples whose answer or image would be cut off are dropped
    and counted, never trained on silently. With `num_proc` > 1 a large set is tokenized in that
    many worker processes, in order: the rows are those of one process."""
    job = (template, tokenizer, max_length, train_on)
    if num_proc > 1 and len(examples) >= PARALLEL_FROM:
        parts = _in_workers(examples, job, num_proc)
    else:
        parts = [_rows(examples, *job)]
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    stats = TokenizeStats()
    for part_rows, part_stats in parts:
        rows["input_ids"] += part_rows["input_ids"]
        rows["labels"] += part_rows["labels"]
        stats.absorb(part_stats)
    return Dataset.from_dict(rows), stats


def _rows(
    examples: list[Example],
    template: AnyTemplate,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    train_on: str,
) -> tuple[dict[str, list[list[int]]], TokenizeStats]:
    stats = TokenizeStats()
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for example in examples:
        try:
            encoded, truncated = encode_example(example, template, tokenizer, max_length, train_on)
        except DataError:
            raise
        except ValueError as exc:  # the template cannot write this record (docs/tools.md)
            raise DataError(f"{example.where}: {exc} (`lmforge data check` lists all such records)") from None
        if truncated:
            stats.truncated += 1
            stats.note("truncated", example.where)
            stats.image_cut += int(bool(example.images))
        if encoded is None:
            stats.dropped += 1
            stats.note("dropped", example.where)
            continue
        stats.examples += 1
        stats.tokens += len(encoded["input_ids"])
        stats.label_tokens += sum(label != IGNORE for label in encoded["labels"])
        rows["input_ids"].append(encoded["input_ids"])
        rows["labels"].append(encoded["labels"])
    return rows, stats


_JOB: tuple = ()  # a worker's (template, tokenizer, max_length, train_on)


def _begin_worker(*job: Any) -> None:
    global _JOB
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    _JOB = job


def _worker_rows(examples: list[Example]) -> tuple[dict[str, list[list[int]]], TokenizeStats]:
    return _rows(examples, *_JOB)


def _in_workers(examples: list[Example], job: tuple, num_proc: int) -> list:
    """`_rows` of consecutive chunks in `num_proc` processes (forked where the OS can: nothing is
    pickled but the chunks), results in order; a worker's DataError is raised here."""
    size = math.ceil(len(examples) / (num_proc * 4))
    chunks = [examples[i : i + size] for i in range(0, len(examples), size)]
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(num_proc, mp_context=context, initializer=_begin_worker, initargs=job) as pool:
        return list(pool.map(_worker_rows, chunks))


def text_blocks(
    documents: Iterable[list[int]], max_length: int, boundaries: bool = True
) -> Iterator[dict[str, list[int]]]:
    """Pre-training rows: documents (token ids, each ending in EOS) concatenated and cut into
    `max_length` blocks, every token labelled.

    With `boundaries`, each block records the lengths of the document pieces it holds
    (`seq_lengths`): the packed-rows collator restarts position ids at each piece, so attention
    never crosses from one document into the next, and masks each piece's first label (the
    previous document's last token never learns to predict it). A document longer than a block
    continues in the next one as a new piece. Without `boundaries`, GPT-2 style: one stream.
    """
    block: list[int] = []
    pieces: list[int] = []
    for document in documents:
        while document:
            take = document[: max_length - len(block)]
            block += take
            pieces.append(len(take))
            document = document[len(take) :]
            if len(block) == max_length:
                yield _block(block, pieces, boundaries)
                block, pieces = [], []
    if len(block) > 1:
        yield _block(block, pieces, boundaries)


def _block(block: list[int], pieces: list[int], boundaries: bool) -> dict[str, list[int]]:
    row = {"input_ids": list(block), "labels": list(block)}
    if boundaries:
        row["seq_lengths"] = list(pieces)
    return row


def text_documents(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase) -> Iterator[list[int]]:
    """Each text's token ids followed by EOS (empty texts skipped)."""
    for text in texts:
        if text:
            yield tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def tokenize_texts(
    texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, max_length: int, boundaries: bool = True
) -> tuple[Dataset, TokenizeStats]:
    """Pre-training rows of every text (see `text_blocks`), with token counts."""
    rows = list(text_blocks(text_documents(texts, tokenizer), max_length, boundaries))
    tokens = sum(len(row["input_ids"]) for row in rows)
    stats = TokenizeStats(examples=len(rows), tokens=tokens, label_tokens=tokens)
    columns = {
        key: [row[key] for row in rows] for key in (rows[0] if rows else {"input_ids": [], "labels": []})
    }
    return Dataset.from_dict(columns), stats


def pack(dataset: Dataset, max_length: int) -> Dataset:
    """Examples packed best-fit-decreasing into rows of at most `max_length` tokens.

    trl's `pack_dataset` does the binning and records each row's `seq_lengths`; the padding-free
    collator turns those into position ids that restart per example, and attention (flash-attn
    varlen, or a block-diagonal mask with SDPA/eager) never crosses examples. Every example was
    already cut to `max_length`, so nothing is truncated here.
    """
    from trl import pack_dataset

    return pack_dataset(dataset, seq_length=max_length, strategy="bfd")


def iter_tokenized(
    examples: Iterator[Example],
    template: AnyTemplate,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    train_on: str = "all_turns",
) -> Iterator[dict[str, list[int]]]:
    """Rows for streaming: like `tokenize_examples`, lazily, skipping what it would drop."""
    for example in examples:
        encoded, _ = encode_example(example, template, tokenizer, max_length, train_on)
        if encoded is not None:
            yield encoded


@dataclass
class PackedRowsCollator:
    """Batches of packed rows kept as rows, for attention without varlen kernels (SDPA, eager).

    trl's padding-free collator flattens a whole batch into one sequence. With flash-attn that
    is ideal (varlen kernels see each example alone); with SDPA or eager attention it builds one
    dense mask over the flattened batch, quadratic in batch_size x max_length tokens (measured
    4x slower than unpacked on CPU). Here each row stays a row: position ids restart at every
    example (transformers derives the block-diagonal mask from them), the padding tail of a
    short row is one more "example" nobody attends to, and the first label of each example is
    masked so the previous example's last token never learns to predict it.
    """

    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(row["input_ids"]) for row in rows)
        input_ids, labels, positions = [], [], []
        for row in rows:
            pad = width - len(row["input_ids"])
            row_labels = list(row["labels"])
            row_positions: list[int] = []
            for length in row.get("seq_lengths") or [len(row["input_ids"])]:
                row_labels[len(row_positions)] = IGNORE
                row_positions.extend(range(length))
            input_ids.append(list(row["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(row_labels + [IGNORE] * pad)
            positions.append(row_positions + list(range(pad)))
        return {
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            "position_ids": torch.tensor(positions),
        }


@dataclass
class PaddingFreeRowsCollator(PackedRowsCollator):
    """`train.padding_free` without varlen kernels: pack each batch into rows as wide as its
    longest example.

    Flattening a whole batch into one row (trl's padding-free collator) is right for flash-attn,
    whose varlen kernels attend within each example. SDPA and eager attention instead get one
    dense mask over the flattened batch, quadratic in its total length: on CPU that made a
    quickstart LoRA step 1.7x slower than plain padding. Here the batch's examples are packed
    first-fit-decreasing into rows of the longest example's length, so attention per row is never
    wider than padding would make it, and most of the padding is gone. Losses are unchanged.
    """

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(row["input_ids"]) for row in rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
        bins: list[list[int]] = []
        free: list[int] = []
        for i in order:
            length = len(rows[i]["input_ids"])
            slot = next((b for b, room in enumerate(free) if room >= length), None)
            if slot is None:
                bins.append([i])
                free.append(width - length)
            else:
                bins[slot].append(i)
                free[slot] -= length
        packed = [
            {
                "input_ids": [t for i in members for t in rows[i]["input_ids"]],
                "labels": [t for i in members for t in rows[i]["labels"]],
                "seq_lengths": [len(rows[i]["input_ids"]) for i in members],
            }
            for members in bins
        ]
        return super().__call__(packed)


# --------------------------------------------------------------------------------------------------
# encoder-decoder (seq2seq), masked-LM and classification rows
# --------------------------------------------------------------------------------------------------


def seq2seq_source(prompt: str, system: str | None = None) -> str:
    """An encoder-decoder model's input: the prompt as plain text (no chat template), after the
    system text when there is one (e.g. T5's task prefix "summarize:")."""
    return f"{system.rstrip()} {prompt}" if system and system.strip() else prompt


def _with_eos(ids: list[int], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """`ids` ending in EOS: T5 and Marian tokenizers append it themselves, a plain BPE does not."""
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def encode_source(text: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> tuple[list[int], bool]:
    """(encoder input ids ending in EOS, was_truncated); a long source keeps its first tokens + EOS."""
    ids = _with_eos(tokenizer(text)["input_ids"], tokenizer)
    if len(ids) <= max_length:
        return ids, False
    return ids[: max_length - 1] + ids[-1:], True


def encode_seq2seq(
    source: str, target: str, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[dict[str, list[int]], bool]:
    """Encoder input ids + decoder labels (the target + EOS; the model shifts them right itself).

    Each side is cut to `max_length`. A cut target loses its EOS: the model is never taught to stop
    in the middle of an answer. `text_target` uses the target-side tokenizer where there is one
    (MarianMT's target-language vocabulary)."""
    input_ids, cut_source = encode_source(source, tokenizer, max_length)
    labels = _with_eos(tokenizer(text_target=target)["input_ids"], tokenizer)
    cut_target = len(labels) > max_length
    row = {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels[:max_length]}
    return row, cut_source or cut_target


def tokenize_seq2seq(
    examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[Dataset, TokenizeStats]:
    """Seq2seq rows: each example's prompt (after its system text) is the source, its response the
    target."""
    stats = TokenizeStats()
    rows: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for example in examples:
        source = seq2seq_source(example.prompt, example.system)
        row, truncated = encode_seq2seq(source, example.response, tokenizer, max_length)
        if truncated:
            stats.truncated += 1
            stats.note("truncated", example.where)
        stats.examples += 1
        stats.tokens += len(row["input_ids"]) + len(row["labels"])
        stats.label_tokens += len(row["labels"])
        for key in rows:
            rows[key].append(row[key])
    return Dataset.from_dict(rows), stats


def text_chunks(
    texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> Iterator[dict[str, list[int]]]:
    """Masked-LM rows: each text cut into `max_length` pieces, each with the tokenizer's special
    tokens ([CLS] … [SEP]) and a mask of them (never masked for prediction). Texts are not joined:
    an encoder sees one document per row, as in BERT's fine-tuning."""
    for text in texts:
        if not text:
            continue
        encoded = tokenizer(
            [text],
            truncation=True,
            max_length=max_length,
            return_overflowing_tokens=True,
            return_special_tokens_mask=True,
        )
        for ids, special in zip(encoded["input_ids"], encoded["special_tokens_mask"], strict=True):
            yield {"input_ids": ids, "special_tokens_mask": special}


def tokenize_chunks(
    texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[Dataset, TokenizeStats]:
    """Masked-LM rows of every text (see `text_chunks`), with token counts."""
    rows = list(text_chunks(texts, tokenizer, max_length))
    tokens = sum(len(row["input_ids"]) for row in rows)
    columns = {key: [row[key] for row in rows] for key in ("input_ids", "special_tokens_mask")}
    return Dataset.from_dict(columns), TokenizeStats(examples=len(rows), tokens=tokens)


def tokenize_classification(
    examples: list[Example],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    label_ids: dict[int | str, int],
) -> tuple[Dataset, TokenizeStats]:
    """Classifier rows: the text (and its pair) with the tokenizer's special tokens, cut to
    `max_length` (the longer text of a pair first), and the class id of its label (`label_ids`
    maps each `class_label` value to one) in `labels`."""
    texts = [e.text or "" for e in examples]
    pairs = [e.text_pair or "" for e in examples] if any(e.text_pair for e in examples) else None
    full = tokenizer(texts, pairs)["input_ids"]
    encoded = dict(tokenizer(texts, pairs, truncation=True, max_length=max_length))
    stats = TokenizeStats(examples=len(examples), tokens=sum(len(ids) for ids in encoded["input_ids"]))
    for example, ids in zip(examples, full, strict=True):
        if len(ids) > max_length:
            stats.truncated += 1
            stats.note("truncated", example.where)
    encoded["labels"] = [label_ids[class_label(e.class_label)] for e in examples]
    return Dataset.from_dict(encoded), stats
