"""Packing: no example is lost or cut, and packed rows train exactly like the examples unpacked."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from lmforge.data.formats import Example
from lmforge.data.templates import get_template
from lmforge.data.tokenize import PackedRowsCollator, PaddingFreeRowsCollator, pack, tokenize_examples


@pytest.fixture
def examples():
    words = "the cat sat on a mat and dog ran to hat".split()
    out = []
    for i in range(24):
        answer = " ".join(words[(i + j) % len(words)] for j in range(1 + (i * 7) % 23))
        out.append(Example(turns=((f"add {i % 10} and {i % 7}", answer),), where=f"r{i}"))
    return out


def test_pack_keeps_every_example_whole(tokenizer, examples):
    dataset, stats = tokenize_examples(examples, get_template("chatml"), tokenizer, max_length=64)
    packed = pack(dataset, 64)
    assert len(packed) < len(dataset)
    pieces = []
    for row in packed:
        assert len(row["input_ids"]) == sum(row["seq_lengths"]) <= 64
        start = 0
        for length in row["seq_lengths"]:
            pieces.append(
                (
                    tuple(row["input_ids"][start : start + length]),
                    tuple(row["labels"][start : start + length]),
                )
            )
            start += length
    original = [(tuple(r["input_ids"]), tuple(r["labels"])) for r in dataset]
    assert sorted(pieces) == sorted(original)
    assert sum(len(p[0]) for p in pieces) == stats.tokens


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("collation", ["flattened", "rows", "in_batch"])
def test_packed_loss_and_logits_equal_unpacked(tokenizer, base_dir, examples, attention, collation):
    """Every padding-free path: trl's flattened batch (used with flash-attn), lmforge's packed-row
    collator and its in-batch packing of unpacked examples (SDPA/eager). Loss and every example's
    logits equal those of the plain padded batch."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation=attention).eval()
    dataset, _ = tokenize_examples(examples, get_template("chatml"), tokenizer, max_length=64)
    rows = [dict(r) for r in dataset]
    packed = [dict(r) for r in pack(dataset, 64)]
    pad = tokenizer.pad_token_id
    spans = []  # (row of the batch, start, length) of every example
    if collation == "flattened":
        batch = DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)(packed)
        assert batch["input_ids"].shape[0] == 1  # one row, position ids restarting per example
        lengths = [length for row in packed for length in row["seq_lengths"]]
        starts = [sum(lengths[:k]) for k in range(len(lengths))]
        spans = [(0, start, length) for start, length in zip(starts, lengths, strict=True)]
    elif collation == "in_batch":
        batch = PaddingFreeRowsCollator(pad_token_id=pad)(rows)
        width = max(len(r["input_ids"]) for r in rows)
        assert batch["input_ids"].shape[1] == width and batch["input_ids"].shape[0] <= len(rows)
        for b, positions in enumerate(batch["position_ids"].tolist()):
            starts = [k for k, p in enumerate(positions) if p == 0] + [width]
            for start, end in zip(starts[:-1], starts[1:], strict=True):
                if batch["input_ids"][b, start] != pad:  # the padding tail is not an example
                    spans.append((b, start, end - start))
    else:
        batch = PackedRowsCollator(pad_token_id=pad)(packed)
        assert batch["input_ids"].shape == (len(packed), max(len(r["input_ids"]) for r in packed))
        for b, row in enumerate(packed):
            starts = [sum(row["seq_lengths"][:k]) for k in range(len(row["seq_lengths"]))]
            spans += [(b, start, length) for start, length in zip(starts, row["seq_lengths"], strict=True)]
    assert "attention_mask" not in batch and len(spans) == len(rows)
    padded = DataCollatorForLanguageModeling(pad_token_id=pad)(rows)
    with torch.no_grad():
        # use_cache=False as in training: with a KV cache transformers does not look for packed rows.
        unpacked_out = model(**padded, use_cache=False)
        packed_out = model(**batch, use_cache=False)
    torch.testing.assert_close(packed_out.loss, unpacked_out.loss, atol=1e-4, rtol=0)
    # Attention never crosses examples: each example's logits inside a packed row equal its own.
    by_ids = {tuple(r["input_ids"]): i for i, r in enumerate(rows)}
    for b, start, length in spans:
        i = by_ids[tuple(batch["input_ids"][b, start : start + length].tolist())]
        torch.testing.assert_close(
            packed_out.logits[b, start : start + length], unpacked_out.logits[i, :length], atol=1e-4, rtol=0
        )


def test_in_batch_packing_fills_rows_first_fit_decreasing():
    rows = [{"input_ids": [7] * n, "labels": [1] * n} for n in (3, 10, 4, 3, 6)]
    batch = PaddingFreeRowsCollator(pad_token_id=0)(rows)
    # width 10: [10] | [6, 4] | [3, 3] + 4 padding
    assert batch["input_ids"].shape == (3, 10)
    assert batch["position_ids"].tolist() == [
        list(range(10)),
        list(range(6)) + list(range(4)),
        list(range(3)) + list(range(3)) + list(range(4)),
    ]
    assert batch["input_ids"][2, 6:].tolist() == [0] * 4 and (batch["labels"][2, 6:] == -100).all()
    # each example's first label is masked: the previous example's last token must not predict it
    assert batch["labels"][1, [0, 6]].tolist() == [-100, -100] and batch["labels"][1, 1].item() == 1
