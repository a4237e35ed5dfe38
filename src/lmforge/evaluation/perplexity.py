"""Perplexity: exp of the mean negative log-likelihood of the scored tokens.

Text records score every token after the first (a BOS is prepended when the tokenizer has one,
so the first real token is scored too). Chat and instruction records score only the assistant's
tokens, given everything before them through the chat template: the perplexity of the answers,
not of the prompts.

Sequences longer than the window are scored in sliding windows (the usual strided method): a
window of `window` tokens advances by `stride`; each window scores only the tokens no earlier
window scored, with up to `window - stride` tokens of context before them. stride == window
is the fast, context-poor extreme; a small stride gives every token nearly a full window of
context. Windows from all records are batched together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.progress import Progress
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmforge.data.formats import Example
from lmforge.data.templates import AnyTemplate
from lmforge.data.tokenize import IGNORE


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    records: int
    windows: int


def encode_for_perplexity(
    example: Example, tokenizer: PreTrainedTokenizerBase, template: AnyTemplate
) -> tuple[list[int], list[int]]:
    """(input ids, labels): labels are the ids to score, IGNORE elsewhere."""
    if example.images:
        raise ValueError(f"{example.where}: has images; perplexity scores text records only")
    if example.kind == "text":
        ids = tokenizer(example.text, add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]
        return ids, list(ids)
    if example.kind not in ("sft", "preference"):
        raise ValueError(
            f"{example.where}: perplexity needs text or an answer to score; this record is {example.kind}"
        )
    input_ids: list[int] = []
    labels: list[int] = []
    for prompt_ids, response_ids in template.encode(example.conversation(), tokenizer):
        input_ids += prompt_ids + response_ids
        labels += [IGNORE] * len(prompt_ids) + response_ids
    return input_ids, labels


def windows(
    input_ids: list[int], labels: list[int], window: int, stride: int
) -> list[tuple[list[int], list[int]]]:
    """Sliding windows over one sequence; each scores only tokens no earlier window scored.

    The label at position i is predicted from positions < i. The next window starts `stride`
    later but at most one token before the first unscored one, so every position after 0 is
    scored exactly once, with at least one token of context (position 0 has no prediction).
    """
    out: list[tuple[list[int], list[int]]] = []
    scored_until, begin = 1, 0  # positions < scored_until are scored already
    while True:
        end = min(begin + window, len(input_ids))
        window_labels = [
            label if begin + offset >= scored_until else IGNORE
            for offset, label in enumerate(labels[begin:end])
        ]
        if any(label != IGNORE for label in window_labels):
            out.append((input_ids[begin:end], window_labels))
        scored_until = end
        if end >= len(input_ids):
            return out
        begin = min(begin + stride, end - 1)


@torch.inference_mode()
def score_windows(
    model: PreTrainedModel,
    chunks: list[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int = 8,
    quiet: bool = True,
) -> tuple[float, int]:
    """(sum of NLL over the scored tokens, their count)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    order = sorted(range(len(chunks)), key=lambda i: len(chunks[i][0]))  # little padding per batch
    with Progress(disable=quiet, transient=True) as progress:
        task = progress.add_task("perplexity", total=len(chunks))
        for start in range(0, len(order), batch_size):
            batch = [chunks[i] for i in order[start : start + batch_size]]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([row + [pad_id] * (width - len(row)) for row, _ in batch], device=device)
            labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in batch], device=device)
            mask = torch.tensor(
                [[1] * len(row) + [0] * (width - len(row)) for row, _ in batch], device=device
            )
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            targets = labels[:, 1:]
            scored = targets != IGNORE  # only the scored positions go to float32
            nll = F.cross_entropy(logits[:, :-1][scored].float(), targets[scored], reduction="sum")
            total += float(nll)
            count += int(scored.sum())
            progress.update(task, advance=len(batch))
    return total, count


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: AnyTemplate,
    examples: list[Example],
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    quiet: bool = True,
) -> Perplexity:
    """Perplexity of `model` on `examples` (see the module docstring)."""
    window = window or context_length(model)
    stride = stride or max(window // 2, 1)
    if stride > window:
        raise ValueError(f"stride {stride} is larger than window {window}: tokens would be skipped")
    chunks: list[tuple[list[int], list[int]]] = []
    for example in examples:
        input_ids, labels = encode_for_perplexity(example, tokenizer, template)
        chunks += windows(input_ids, labels, window, stride)
    if not chunks:
        raise ValueError("no token to score: the records are empty")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = score_windows(model, chunks, pad_id, batch_size, quiet)
    mean = total / count
    return Perplexity(math.exp(mean), mean, count, len(examples), len(chunks))


def context_length(model: PreTrainedModel, cap: int | None = 4096) -> int:
    """The model's context (max_position_embeddings), capped (perplexity windows: to keep a
    batch of windows in memory); a model that does not say gets the cap, or 2048."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    context = int(getattr(config, "max_position_embeddings", 0) or cap or 2048)
    return min(context, cap) if cap else context
