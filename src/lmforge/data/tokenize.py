"""Turn conversations into token ids and labels.

Only response tokens carry labels; every prompt token is -100. Each response ends with
the template's stop token, which is labelled, so the model learns to stop. Padding is
added later by the collator and is always -100, so a tokenizer whose pad id equals its
EOS id still trains EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from lmforge.data.templates import ChatTemplate, Conversation

IGNORE = -100


@dataclass
class TokenizeStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # prompt alone filled max_length: nothing left to learn
    tokens: int = 0
    label_tokens: int = 0


def encode_conversation(
    conversation: Conversation,
    template: ChatTemplate,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
) -> tuple[dict[str, list[int]] | None, bool]:
    """(input_ids + labels, was_truncated); None when no response token fits in max_length."""
    input_ids: list[int] = []
    labels: list[int] = []
    truncated = False
    for prompt_ids, response_ids in template.encode(conversation, tokenizer):
        room = max_length - len(input_ids)
        if room <= 0:
            truncated = True
            break
        prompt_part = prompt_ids[:room]
        response_part = response_ids[: room - len(prompt_part)]
        truncated = truncated or len(prompt_part) < len(prompt_ids) or len(response_part) < len(response_ids)
        input_ids += prompt_part + response_part
        labels += [IGNORE] * len(prompt_part) + response_part
    if not any(label != IGNORE for label in labels):
        return None, truncated
    return {"input_ids": input_ids, "labels": labels}, truncated


def tokenize_conversations(
    conversations: list[Conversation],
    template: ChatTemplate,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
) -> tuple[Dataset, TokenizeStats]:
    stats = TokenizeStats()
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for conversation in conversations:
        encoded, truncated = encode_conversation(conversation, template, tokenizer, max_length)
        stats.truncated += int(truncated)
        if encoded is None:
            stats.dropped += 1
            continue
        stats.examples += 1
        stats.tokens += len(encoded["input_ids"])
        stats.label_tokens += sum(label != IGNORE for label in encoded["labels"])
        rows["input_ids"].append(encoded["input_ids"])
        rows["labels"].append(encoded["labels"])
    return Dataset.from_dict(rows), stats


def tokenize_texts(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[Dataset, TokenizeStats]:
    """Pre-training rows: texts joined with EOS and cut into max_length blocks (all labelled)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    blocks = [stream[i : i + max_length] for i in range(0, len(stream), max_length)]
    blocks = [b for b in blocks if len(b) > 1]
    stats = TokenizeStats(examples=len(blocks), tokens=len(stream), label_tokens=len(stream))
    return Dataset.from_dict({"input_ids": blocks, "labels": [list(b) for b in blocks]}), stats
