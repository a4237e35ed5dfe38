"""Seq2seq SFT: source/target pairs -> a LoRA (or QLoRA) adapter or a fine-tuned encoder-decoder.

`method.name: sft` runs this instead of `methods/sft.py` when the model's config says
`is_encoder_decoder` (T5, Flan-T5, MarianMT, BART). The source (the record's prompt: `source`, or an
alpaca instruction + input) is the encoder input as plain text, with no chat template; `data.system`
(or the record's `system`) goes before it, which is where T5's task prefix ("summarize:") belongs.
The target + EOS are the decoder labels; the decoder reads them shifted right behind its decoder
start token (the model's own `prepare_decoder_input_ids_from_labels`). Loss: cross-entropy over the
target tokens of the whole accumulated batch (`losses.ce.summed_cross_entropy`: exact
under gradient accumulation, which the models' own mean is not).

Why transformers' Seq2SeqTrainer and not lmforge's ForgeTrainer: that one is trl's SFTTrainer, made
for decoder-only rows (its token accuracy shifts labels by one; its padding-free and packing
collators join examples into one row). Here every pair is its own padded row
(`DataCollatorForSeq2Seq` pads labels with -100), so `train.padding_free` does not apply and
`data.packing` is refused. lmforge's callbacks, optimizers, checkpoints and artifacts are the same.

Top to bottom: config -> tokenizer -> pairs -> model + adapter -> trainer -> train (resuming from
the latest complete checkpoint when asked) -> save (adapter or model, tokenizer, card).
"""

from __future__ import annotations

from rich.console import Console
from transformers import (
    DataCollatorForSeq2Seq,
)

from lmforge.config import RunConfig
from lmforge.data.files import DataError
from lmforge.data.formats import Example
from lmforge.data.loader import load_examples
from lmforge.data.templates import get_template
from lmforge.data.tokenize import IGNORE, tokenize_seq2seq
from lmforge.methods import sft
from lmforge.models.loading import load_tokenizer
from lmforge.training.stage import (
    StageResult,
    begin_stage,
    load_model_for_training,
    optimizer_steps,
    train_and_save,
)
from lmforge.training.trainer import labelled_trainer

console = Console(stderr=True)

CARD_NOTE = (
    "Encoder-decoder model: the encoder reads the source as plain text (no chat template), "
    "after the system text when one was given; `lmforge predict`/`eval` do the same."
)


def check(config: RunConfig) -> None:
    """Seq2seq SFT's own combinations (on top of sft.check), before anything is loaded."""
    sft.check(config)
    if config.data.packing:
        raise ValueError(
            "data.packing joins examples into one decoder-only row; an encoder-decoder model reads each "
            "source/target pair on its own: set data.packing: false"
        )
    if config.data.streaming:
        raise ValueError("seq2seq SFT reads the whole data set: turn off data.streaming")
    if config.adapter.method in ("moe_dora", "vision_lora"):
        raise ValueError(
            f"adapter.method {config.adapter.method} is for decoder-only models; an encoder-decoder "
            "trains lora, dora, adalora, ia3, vera, oft or fourierft (or none: full fine-tuning)"
        )


def check_pairs(examples: list[Example]) -> None:
    """One source and one target per record: no chat history, no images."""
    for example in examples:
        if len(example.turns) > 1:
            raise DataError(
                f"{example.where}: has {len(example.turns)} turns; an encoder-decoder model reads one "
                "source and one target: use single-turn records (source/target or instruction/output)"
            )
        if example.images:
            raise DataError(f"{example.where}: has images; seq2seq SFT reads text only")


def run(config: RunConfig, quiet: bool = False) -> StageResult:
    begin_stage(config, check)

    tokenizer = load_tokenizer(config.model)
    data = load_examples(config.data, "sft")
    check_pairs(data.train + data.eval)
    train_ds, stats = tokenize_seq2seq(data.train, tokenizer, config.data.max_length)
    eval_ds = tokenize_seq2seq(data.eval, tokenizer, config.data.max_length)[0] if data.eval else None
    if not quiet:
        console.print(
            f"[bold]seq2seq data[/]: {stats.examples} pairs, {stats.tokens:,} tokens "
            f"({stats.label_tokens:,} target tokens trained)"
        )
        if stats.truncated:
            console.print(
                f"[yellow]warning[/]: {stats.truncated} pairs were longer than data.max_length="
                f"{config.data.max_length} and were cut (e.g. {', '.join(stats.truncated_where[:2])}); "
                "raise data.max_length to keep them whole"
            )

    steps = optimizer_steps(config, len(train_ds))
    model, hardware = load_model_for_training(config, quiet, steps, "seq2seq")

    # With the model: decoder inputs made from the labels (the loss function takes the labels).
    collator = DataCollatorForSeq2Seq(tokenizer, model, label_pad_token_id=IGNORE)
    # eval_accuracy: target tokens right, teacher-forced
    trainer = labelled_trainer(
        config, model, tokenizer, hardware, train_ds, eval_ds, "sft", quiet, collator, seq2seq=True
    )
    template = get_template("plain")  # recorded beside the model; the encoder reads plain text
    return train_and_save(trainer, config, tokenizer, template, stats, eval_ds is not None, quiet, CARD_NOTE)
