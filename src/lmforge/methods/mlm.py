"""Masked-LM fine-tuning on plain text -> an adapter or a fine-tuned encoder (BERT family).

BERT's objective (Devlin et al., 2019): `method.mlm_probability` of the tokens (15%) are chosen, 80%
of those become the mask token, 10% a random token and 10% stay; the loss is the cross-entropy of
predicting the chosen tokens (over the whole accumulated batch: `evaluation.metrics.
summed_cross_entropy`). Departures from the paper, as RoBERTa (Liu et al., 2019): no
next-sentence objective, and masks are drawn afresh for every batch (transformers'
`DataCollatorForLanguageModeling`, from the global seeded RNG). A resumed run sees the same data
order but not bitwise the same masks: accelerate's data loader draws the next batch's masks before
a checkpoint saves the RNG state (seq2seq and classification resume exactly).

Texts come from the same sources as pre-training (txt/jsonl/parquet, folders, hub datasets, mixes,
streaming). Each text is cut into `data.max_length` pieces, each with the tokenizer's special tokens
([CLS] ... [SEP]); texts are never joined into one row, so attention stays within a document.

With an adapter: peft has no masked-LM task type, so the adapter is a plain `PeftModel` (task_type
None) on the encoder's layers; the MLM head (tied to the embeddings) stays frozen. Evaluation
reports `eval_accuracy`: the share of chosen tokens predicted right.

Top to bottom: config (checked against the model's config.json: it must have a masked-LM head) ->
tokenizer (it must have a mask token) -> texts -> model + adapter -> trainer -> train -> save.
"""

from __future__ import annotations

from datasets import IterableDataset
from rich.console import Console
from transformers import (
    DataCollatorForLanguageModeling,
)

from lmforge.config import RunConfig
from lmforge.data.loader import iter_examples, load_eval, load_examples, peek
from lmforge.data.templates import get_template
from lmforge.data.tokenize import TokenizeStats, text_chunks, tokenize_chunks
from lmforge.models.loading import (
    has_masked_lm_head,
    is_encoder_decoder,
    load_tokenizer,
    model_type,
)
from lmforge.training.stage import (
    StageResult,
    begin_stage,
    load_model_for_training,
    optimizer_steps,
    train_and_save,
)
from lmforge.training.trainer import labelled_trainer

console = Console(stderr=True)


def check(config: RunConfig) -> None:
    """The method's own combinations, then the model's kind (config.json only, no weights)."""
    if config.method.name != "mlm":
        raise ValueError(f"methods.mlm cannot run method.name={config.method.name}")
    formats = [config.data.format, *(s.format for s in config.data.datasets)]
    if any(f not in ("auto", "text") for f in formats):
        raise ValueError(
            f"data.format is {config.data.format}: masked-LM training reads plain `text` records"
        )
    if config.data.packing:
        raise ValueError("data.packing is for causal SFT; masked-LM rows are one text each: remove it")
    if config.data.streaming and config.train.max_steps <= 0:
        raise ValueError("data.streaming has no length to count epochs by: set train.max_steps")
    if config.model.arch:
        raise ValueError(
            "model.arch builds a causal lab model; masked-LM training needs an encoder: set "
            "model.name_or_path"
        )
    if config.adapter.method in ("moe_dora", "vision_lora"):
        raise ValueError(
            f"adapter.method {config.adapter.method} is for decoder-only models; use lora, dora, ia3, ... "
            "or none (full fine-tuning)"
        )
    if config.adapter.method == "none" and config.model.quantization != "none":
        raise ValueError("a quantized base needs an adapter: set adapter.method: lora")
    name = config.model.name_or_path
    if is_encoder_decoder(config.model):
        raise ValueError(
            f"model {name} is an encoder-decoder; method mlm trains encoders (BERT, RoBERTa, DeBERTa): "
            "fine-tune this model with method.name: sft on source/target pairs"
        )
    if not has_masked_lm_head(config.model):
        raise ValueError(
            f"model {name} (model_type {model_type(config.model)}) has no masked-LM head; method mlm trains "
            "encoders such as BERT, RoBERTa or DeBERTa. For a causal LM use method.name: pretrain"
        )


def run(config: RunConfig, quiet: bool = False) -> StageResult:
    begin_stage(config, check)

    tokenizer = load_tokenizer(config.model)
    if tokenizer.mask_token is None:
        raise ValueError(
            f"the tokenizer of {config.model.name_or_path} has no mask token; masked-LM training needs "
            "one (BERT's [MASK], RoBERTa's <mask>)"
        )
    max_length = min(config.data.max_length, tokenizer.model_max_length)

    def chunks(examples) -> tuple:
        return tokenize_chunks((e.text or "" for e in examples), tokenizer, max_length)

    eval_ds = None
    if config.data.streaming:
        peek(config.data, "text")

        def rows():
            yield from text_chunks(
                (e.text or "" for e in iter_examples(config.data, "text")), tokenizer, max_length
            )

        train_ds, stats = IterableDataset.from_generator(rows), TokenizeStats()
        if config.data.eval_path:
            eval_ds, _ = chunks(load_eval(config.data, "text"))
    else:
        data = load_examples(config.data, "text")
        train_ds, stats = chunks(data.train)
        eval_ds = chunks(data.eval)[0] if data.eval else None
        if stats.examples == 0:
            raise ValueError("the training texts are all empty: nothing to learn")
        if not quiet:
            console.print(
                f"[bold]mlm data[/]: {len(data.train)} texts, {stats.tokens:,} tokens in {stats.examples} "
                f"rows of at most {max_length}"
            )

    model, hardware = load_model_for_training(config, quiet, optimizer_steps(config, stats.examples), "mlm")

    collator = DataCollatorForLanguageModeling(
        tokenizer, mlm=True, mlm_probability=config.method.mlm_probability
    )
    # eval_accuracy: masked tokens predicted right
    trainer = labelled_trainer(config, model, tokenizer, hardware, train_ds, eval_ds, "mlm", quiet, collator)
    template = get_template("plain")  # recorded beside the model; an encoder has no chat format
    return train_and_save(trainer, config, tokenizer, template, stats, eval_ds is not None, quiet)
