"""LoRA SFT throughput on CPU: trl ``SFTTrainer`` defaults vs the fastest correct variant.

Every variant trains the same tiny Llama (built from a config, no downloads) with the same LoRA
adapter, the same pre-tokenized data (``input_ids`` + ``labels``, prompt masked with -100), the
same batch size and the same number of optimizer steps, each in its own subprocess so that peak
RSS is per variant. All runs are fp32 with gradient checkpointing off unless stated: trl's
``SFTConfig`` defaults (``bf16=True``, ``gradient_checkpointing=True``) are ~13x slower on CPUs
without native bf16.

Variants (see ``VARIANTS``):

* ``trl_defaults``: ``SFTTrainer`` as shipped: ``compute_loss`` runs trl's fused, chunked LM head
  (log-probs + entropy + top-1 in tiles; on CPU it scores every position, padding included).
* ``trl_defaults_gc``: same, with trl's ``gradient_checkpointing=True`` default kept.
* ``model_loss``: ``SFTTrainer`` subclass whose ``compute_loss`` is ``Trainer.compute_loss``, i.e.
  the model's own causal-LM loss (``labels`` + ``num_items_in_batch``); no fused head.
* ``model_loss_padding_free``: ``model_loss`` + ``SFTConfig(padding_free=True, max_length=None)``.
* ``model_loss_group_by_length``: ``model_loss`` +
  ``train_sampling_strategy="group_by_length"`` (the transformers 5 spelling of group_by_length).
* ``trl_padding_free``: ``trl_defaults`` + padding-free.
* ``masked_head_*``: like ``model_loss_*``, but the LM head only runs on label positions.
* ``hf_trainer``: plain ``transformers.Trainer`` + ``DataCollatorForSeq2Seq`` (reference).

* ``lmforge``: lmforge's own ``build_trainer`` with its defaults (model loss + padding-free);
  same batch order and per-step losses as trl's.
* ``lmforge_grouped``: ``lmforge`` with ``train.group_by_length: true``.

``best`` is an alias for ``BEST_VARIANT`` (``lmforge``). The default run compares trl's
defaults, the plain transformers Trainer and lmforge (both settings).

Timing: each step's wall time is taken between ``on_step_end`` callbacks, warm-up steps excluded;
with ``--repeats N`` each step's time is its minimum over N interleaved runs (the per-step minimum
filters out other processes on a small shared machine: an oversubscribed 2-core box can slow
2-thread torch by 10x). Tokens/s counts real (unpadded) tokens and padded tokens fed to the model.

Achieved FLOP/s: real tokens/s x the job's training FLOPs per token (``train_flops_per_token``:
counted as ``lmforge lab info`` counts a forward pass, with the frozen base's backward pass to
activations and LoRA's own gradients), and its share of an fp32 matmul peak measured in the same
run, in a child process with the variants' threads, at the model's own GEMM shapes (a batch's
tokens x hidden x intermediate): "% peak" is what is left to gain on this machine.

Usage::

    .venv/bin/python bench/sft_throughput.py --out bench/sft_throughput.json
    .venv/bin/python bench/sft_throughput.py --variants all --repeats 1 --check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    steps: int = 30
    warmup_steps: int = 3
    batch_size: int = 8
    max_length: int = 512
    min_length: int = 30
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 688
    vocab_size: int = 8000
    lora_r: int = 16
    learning_rate: float = 2e-4
    seed: int = 0
    workdir: str = ""

    @property
    def total_steps(self) -> int:
        return self.steps + self.warmup_steps

    @property
    def num_examples(self) -> int:
        return self.batch_size * self.total_steps + 64


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------------------------------
# Data and model (shared by every variant; prepared once in the parent process)
# --------------------------------------------------------------------------------------------------


def _synthetic_corpus(rng: random.Random, n_words: int) -> list[str]:
    """Zipf-distributed pseudo-words arranged in sentences, so that BPE learns real merges."""
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "ng", "qu"]
    lexicon = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(20000)]
    weights = [1.0 / (rank + 1) for rank in range(len(lexicon))]
    words = rng.choices(lexicon, weights=weights, k=n_words)
    lines, line = [], []
    for i, word in enumerate(words):
        line.append(word)
        if rng.random() < 0.08 or i == len(words) - 1:
            lines.append(" ".join(line).capitalize() + rng.choice([".", "?", "!"]))
            line = []
    return lines


def prepare_data(cfg: BenchConfig) -> None:
    """Train a byte-level BPE tokenizer and write a pre-tokenized dataset under ``cfg.workdir``."""
    from datasets import Dataset
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(cfg.seed)
    lines = _synthetic_corpus(rng, n_words=400_000)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(os.path.join(cfg.workdir, "tokenizer"))

    # One long token stream; each example is a window whose length is lognormal in
    # [min_length, max_length] (median ~120 tokens), with a masked prompt of 20-60% of it.
    stream: list[int] = []
    for enc in tokenizer(lines, add_special_tokens=False)["input_ids"]:
        stream.extend(enc)
    input_ids, labels = [], []
    for _ in range(cfg.num_examples):
        length = int(rng.lognormvariate(math.log(120), 0.8))
        length = max(cfg.min_length, min(cfg.max_length, length))
        start = rng.randrange(0, len(stream) - length)
        ids = [tokenizer.bos_token_id] + stream[start : start + length - 2]
        ids.append(tokenizer.eos_token_id)
        prompt_len = int(len(ids) * rng.uniform(0.2, 0.6))
        input_ids.append(ids)
        labels.append([-100] * prompt_len + ids[prompt_len:])
    Dataset.from_dict({"input_ids": input_ids, "labels": labels}).save_to_disk(
        os.path.join(cfg.workdir, "dataset")
    )


def load_data(cfg: BenchConfig):
    from datasets import load_from_disk
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(cfg.workdir, "tokenizer"))
    dataset = load_from_disk(os.path.join(cfg.workdir, "dataset"))
    return tokenizer, dataset


def build_model(cfg: BenchConfig, tokenizer):
    """Tiny Llama + LoRA (r=16 on all linear layers of the blocks), fp32, seeded."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=2 * cfg.max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        use_cache=False,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.config._attn_implementation = "sdpa"
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=2 * cfg.lora_r,
        lora_dropout=0.0,  # 0 so that per-step losses are comparable across variants
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


# --------------------------------------------------------------------------------------------------
# Variants: each builds a ready-to-train Trainer from (model, tokenizer, dataset, cfg)
# --------------------------------------------------------------------------------------------------


def common_args(cfg: BenchConfig) -> dict[str, Any]:
    """TrainingArguments fields shared by every variant."""
    return {
        "output_dir": os.path.join(cfg.workdir, "out"),
        "per_device_train_batch_size": cfg.batch_size,
        "max_steps": cfg.total_steps,
        "learning_rate": cfg.learning_rate,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": cfg.seed,
        "bf16": False,  # fp32 (SFTConfig would default to bf16 autocast, slow on CPUs w/o bf16)
        "gradient_checkpointing": False,  # SFTConfig defaults to True; Trainer to False
        "dataloader_num_workers": 0,
        "use_cpu": True,
    }


def _sft_config(cfg: BenchConfig, **overrides):
    from trl import SFTConfig

    return SFTConfig(**{**common_args(cfg), "max_length": cfg.max_length, **overrides})


def _model_loss_sft_trainer_cls():
    """SFTTrainer whose loss is the model's own (``Trainer.compute_loss``), not the fused LM head.

    trl installs a fused, chunked LM head and its ``compute_loss`` always calls
    ``model(**inputs, fused_lm_head=True)``; on CPU (no Triton) that head scores every position,
    padding included, and also computes entropy and top-1 in tiles. ``Trainer.compute_loss`` calls
    ``model(**inputs, num_items_in_batch=...)``; the patched forward then falls through to the
    original forward (``fused_lm_head=False``), whose ``ForCausalLMLoss`` is the same
    token-summed NLL divided by ``num_items_in_batch``.
    The fused-head metrics (``entropy``, ``mean_token_accuracy``) are not logged; ``num_tokens`` is.
    """
    from transformers import Trainer
    from trl import SFTTrainer

    class ModelLossSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            if self.model.training:
                if "attention_mask" in inputs:
                    n = int(inputs["attention_mask"].sum())
                else:  # padding-free: one row holding every sequence
                    n = int(inputs["position_ids"].size(1))
                self._total_train_tokens += n
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return Trainer.compute_loss(
                self,
                model,
                inputs,
                return_outputs=return_outputs,
                num_items_in_batch=num_items_in_batch,
            )

    return ModelLossSFTTrainer


def _masked_head_sft_trainer_cls():
    """SFTTrainer whose loss projects through the LM head only the positions that have a label.

    Same math as the model's own loss (sum of token NLLs / ``num_items_in_batch``), but the
    ``[tokens, vocab]`` logits are built only for label positions (prompt and padding skipped).
    """
    import torch
    import torch.nn.functional as F
    from trl import SFTTrainer

    class MaskedHeadSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            if self.model.training:
                if "attention_mask" in inputs:
                    n = int(inputs["attention_mask"].sum())
                else:
                    n = int(inputs["position_ids"].size(1))
                self._total_train_tokens += n
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            hidden = base.model(**inputs, use_cache=False).last_hidden_state[:, :-1]
            targets = labels[:, 1:]
            mask = targets != -100
            logits = base.lm_head(hidden[mask]).float()
            nll = F.cross_entropy(logits, targets[mask], reduction="sum")
            denom = mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = nll / torch.as_tensor(denom).clamp(min=1)
            return (loss, {"loss": loss}) if return_outputs else loss

    return MaskedHeadSFTTrainer


def build_trl_defaults(model, tokenizer, dataset, cfg: BenchConfig):
    """A. trl SFTTrainer as shipped (fp32, no gradient checkpointing)."""
    from trl import SFTTrainer

    args = _sft_config(cfg)
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def build_trl_defaults_gc(model, tokenizer, dataset, cfg: BenchConfig):
    """A'. As A, but with trl's default ``gradient_checkpointing=True``."""
    from trl import SFTTrainer

    args = _sft_config(cfg, gradient_checkpointing=True)
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def build_model_loss(model, tokenizer, dataset, cfg: BenchConfig):
    """B. SFTTrainer with the model's own loss (no fused LM head)."""
    args = _sft_config(cfg)
    cls = _model_loss_sft_trainer_cls()
    return cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def build_model_loss_padding_free(model, tokenizer, dataset, cfg: BenchConfig):
    """C. B + padding-free batches (one row, position_ids restart per sequence).

    SFTTrainer refuses ``padding_free=True`` with ``max_length`` set and no packing (it would not be
    enforced), so the dataset must already be truncated and ``max_length=None``.
    """
    args = _sft_config(cfg, padding_free=True, max_length=None)
    cls = _model_loss_sft_trainer_cls()
    return cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def build_model_loss_group_by_length(model, tokenizer, dataset, cfg: BenchConfig):
    """D. B + length-grouped sampling (transformers 5: ``train_sampling_strategy``)."""
    args = _sft_config(cfg, train_sampling_strategy="group_by_length")
    cls = _model_loss_sft_trainer_cls()
    return cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def build_trl_padding_free(model, tokenizer, dataset, cfg: BenchConfig):
    """A + padding_free=True (fused LM head kept)."""
    from trl import SFTTrainer

    args = _sft_config(cfg, padding_free=True, max_length=None)
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def build_masked_head_padding_free(model, tokenizer, dataset, cfg: BenchConfig):
    """F. C, but the LM head and cross-entropy only run on label positions."""
    args = _sft_config(cfg, padding_free=True, max_length=None)
    cls = _masked_head_sft_trainer_cls()
    return cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def build_masked_head_group_by_length(model, tokenizer, dataset, cfg: BenchConfig):
    """G. D, but the LM head and cross-entropy only run on label positions."""
    args = _sft_config(cfg, train_sampling_strategy="group_by_length")
    cls = _masked_head_sft_trainer_cls()
    return cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def build_hf_trainer(model, tokenizer, dataset, cfg: BenchConfig):
    """E. Plain transformers Trainer + DataCollatorForSeq2Seq (reference)."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    args = TrainingArguments(**common_args(cfg))
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    return Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
    )


def build_lmforge(model, tokenizer, dataset, cfg: BenchConfig, data: dict | None = None, **train: Any):
    """lmforge's own SFT trainer (``lmforge.training.trainer.build_trainer``), default settings.

    Same schedule as the peers (linear, no warmup); lmforge's defaults otherwise: the model's own
    loss, padding-free batches, uniformly random batch order.
    """
    from lmforge.config import validate_config
    from lmforge.models.hardware import choose_hardware
    from lmforge.training.trainer import build_trainer

    config = validate_config(
        {
            "model": {"name_or_path": "bench-tiny-llama", "dtype": "float32"},
            "adapter": {"r": cfg.lora_r, "alpha": 2 * cfg.lora_r, "dropout": 0.0},
            "data": {"path": "bench", "max_length": cfg.max_length, **(data or {})},
            "train": {
                "output_dir": os.path.join(cfg.workdir, "out"),
                "max_steps": cfg.total_steps,
                "batch_size": cfg.batch_size,
                "lr": cfg.learning_rate,
                "scheduler": "linear",
                "warmup_ratio": 0.0,
                "logging_steps": 1,
                "seed": cfg.seed,
                "tensorboard": False,
                "progress": False,
                **train,
            },
        },
        source="bench",
    )
    hardware = choose_hardware(config.model)
    return build_trainer(config, model, tokenizer, hardware, dataset, None, "sft", quiet=True)


def build_lmforge_grouped(model, tokenizer, dataset, cfg: BenchConfig):
    """lmforge with ``train.group_by_length: true`` (length-grouped batches)."""
    return build_lmforge(model, tokenizer, dataset, cfg, group_by_length=True)


def build_lmforge_padded(model, tokenizer, dataset, cfg: BenchConfig):
    """lmforge with ``train.padding_free: false``: classic right-padded batches."""
    return build_lmforge(model, tokenizer, dataset, cfg, padding_free=False)


def build_lmforge_packed(model, tokenizer, dataset, cfg: BenchConfig):
    """lmforge with ``data.packing: true``: examples packed best-fit into max_length rows."""
    from lmforge.data.tokenize import pack

    return build_lmforge(model, tokenizer, pack(dataset, cfg.max_length), cfg, data={"packing": True})


def build_trl_packed(model, tokenizer, dataset, cfg: BenchConfig):
    """trl ``SFTTrainer`` defaults with its own ``packing=True`` (BFD, padding-free)."""
    from trl import SFTTrainer

    args = _sft_config(cfg, packing=True)
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


BEST_VARIANT = "lmforge"


def build_best_trainer(model, tokenizer, dataset, cfg: BenchConfig):
    """lmforge's default SFT trainer."""
    return VARIANTS[BEST_VARIANT](model, tokenizer, dataset, cfg)


VARIANTS = {
    "trl_defaults": build_trl_defaults,
    "trl_defaults_gc": build_trl_defaults_gc,
    "model_loss": build_model_loss,
    "model_loss_padding_free": build_model_loss_padding_free,
    "model_loss_group_by_length": build_model_loss_group_by_length,
    "trl_padding_free": build_trl_padding_free,
    "masked_head_padding_free": build_masked_head_padding_free,
    "masked_head_group_by_length": build_masked_head_group_by_length,
    "hf_trainer": build_hf_trainer,
    "lmforge": build_lmforge,
    "lmforge_grouped": build_lmforge_grouped,
    "lmforge_padded": build_lmforge_padded,
    "lmforge_packed": build_lmforge_packed,
    "trl_packed": build_trl_packed,
}


def resolve_builder(name: str):
    return build_best_trainer if name == "best" else VARIANTS[name]


# --------------------------------------------------------------------------------------------------
# Measurement (runs inside the child process)
# --------------------------------------------------------------------------------------------------


class _CountingCollator:
    """Wraps a collator to record real (unpadded) and padded token counts of every batch."""

    def __init__(self, collator):
        self.collator = collator
        self.batches: list[tuple[int, int]] = []

    def __call__(self, examples):
        batch = self.collator(examples)
        real = sum(len(ex["input_ids"]) for ex in examples)
        self.batches.append((real, int(batch["input_ids"].numel())))
        return batch


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_variant(name: str, cfg: BenchConfig) -> dict[str, Any]:
    import torch
    from transformers import TrainerCallback

    tokenizer, dataset = load_data(cfg)
    model = build_model(cfg, tokenizer)
    trainer = resolve_builder(name)(model, tokenizer, dataset, cfg)
    counter = _CountingCollator(trainer.data_collator)
    trainer.data_collator = counter

    stamps: dict[int, float] = {}
    losses: dict[int, float] = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            stamps[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            stamps[state.global_step] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses[state.global_step] = float(logs["loss"])

    trainer.add_callback(Timer())
    rss_before = _rss_mib()
    load_before = os.getloadavg()[0]
    trainer.train()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    w, n = cfg.warmup_steps, cfg.total_steps
    step_seconds = [stamps[s] - stamps[s - 1] for s in range(w + 1, n + 1)]
    seconds = sum(step_seconds)
    timed = counter.batches[w:n]  # batch i feeds step i + 1 (no gradient accumulation)
    real = sum(b[0] for b in timed)
    padded = sum(b[1] for b in timed)
    step_losses = [losses[s] for s in sorted(losses)]
    return {
        "variant": name,
        "resolved": BEST_VARIANT if name == "best" else name,
        "trainer_class": type(trainer).__name__,
        "torch_threads": torch.get_num_threads(),
        "timed_steps": n - w,
        "seconds": seconds,
        "sec_per_step": seconds / (n - w),
        "real_tokens": real,
        "padded_tokens": padded,
        "rows": cfg.batch_size * (n - w),
        "vocab": len(tokenizer),
        "real_tok_s": real / seconds,
        "padded_tok_s": padded / seconds,
        "rss_before_train_mib": rss_before,
        "peak_rss_mib": peak_rss,
        "final_loss": sum(step_losses[-5:]) / len(step_losses[-5:]),
        "step_losses": step_losses,
        "step_seconds": step_seconds,
        "loadavg_1m": [load_before, os.getloadavg()[0]],
    }


def train_flops_per_token(
    hidden: int, intermediate: int, layers: int, vocab: int, kv_dim: int, context: float, r: int
) -> float:
    """Training FLOPs per real token of a LoRA job on a Llama, counted as `lmforge lab info`
    counts a forward pass (2 per weight of every matrix multiply, the output head included;
    attention's scores and weighted values, 2 x 2 x context x hidden per layer), with the base
    frozen: its matrices cost the forward pass and the backward pass to their inputs (2 x
    forward), attention 3 x (gradients to q, k and v), and LoRA's factors (rank `r` on q, k, v, o,
    gate, up, down) 3 x (their weight gradients too). `kv_dim`: the k and v projections' width.
    bench/gpu.py counts with it too."""
    d, inter = hidden, intermediate
    linear = layers * (2 * d * d + 2 * d * kv_dim + 3 * d * inter) + d * vocab
    lora = layers * r * (2 * 2 * d + 2 * (d + kv_dim) + 3 * (d + inter))
    attention = layers * 2 * 2 * context * d
    return 2 * (2 * linear) + 3 * attention + 3 * (2 * lora)


def matmul_peak(cfg: BenchConfig) -> dict[str, Any]:
    """fp32 matrix-multiply GFLOP/s at this model's own GEMM shapes (a step's tokens x hidden x
    intermediate, and hidden x hidden), with the threads a variant gets: the limit the "% of peak"
    column is measured against."""
    import torch

    tokens = cfg.batch_size * (cfg.max_length + cfg.min_length) // 2  # a padding-free batch, roughly
    shapes = {
        "tokens x hidden x intermediate": (tokens, cfg.hidden, cfg.intermediate),
        "tokens x intermediate x hidden": (tokens, cfg.intermediate, cfg.hidden),
        "tokens x hidden x hidden": (tokens, cfg.hidden, cfg.hidden),
    }
    measured = {}
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        best = float("inf")
        for _ in range(20):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        measured[name] = 2 * m * k * n / best / 1e9
    return {
        "variant": "peak",
        "gflops": measured,
        "peak_gflops": max(measured.values()),
        "threads": torch.get_num_threads(),
    }


def with_flops(result: dict[str, Any], cfg: BenchConfig, peak: float | None) -> dict[str, Any]:
    if "error" in result:
        return result
    context = result["real_tokens"] / result["rows"]
    per_token = train_flops_per_token(
        cfg.hidden, cfg.intermediate, cfg.layers, result["vocab"], cfg.hidden, context, cfg.lora_r
    )
    gflops = result["real_tok_s"] * per_token / 1e9
    return {
        **result,
        "mean_length": context,
        "gflops": gflops,
        "share_of_peak": gflops / peak if peak else None,
    }


def check_equivalence(cfg: BenchConfig) -> dict[str, Any]:
    """Loss and LoRA gradients of every variant on the same batch, compared with trl defaults."""
    import torch

    tokenizer, dataset = load_data(cfg)
    raw = [dataset[i] for i in range(cfg.batch_size)]
    n_items = sum(sum(1 for t in ex["labels"][1:] if t != -100) for ex in raw)
    report: dict[str, Any] = {"num_items_in_batch": n_items}
    ref_loss, ref_grads = None, None
    names = ["trl_defaults", "model_loss", "model_loss_padding_free"]
    names += ["trl_padding_free", "masked_head_padding_free", "hf_trainer", "lmforge"]
    for name in names:
        model = build_model(cfg, tokenizer)
        trainer = VARIANTS[name](model, tokenizer, dataset, cfg)
        prepared = trainer.train_dataset
        same_data = all(
            prepared[i]["input_ids"] == raw[i]["input_ids"] and prepared[i]["labels"] == raw[i]["labels"]
            for i in range(len(raw))
        )
        batch = trainer.data_collator([{k: ex[k] for k in ("input_ids", "labels")} for ex in raw])
        model.train()
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(n_items))
        loss.backward()
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
        entry = {"loss": float(loss), "prepared_dataset_unchanged": same_data}
        entry["batch_keys"] = sorted(batch.keys())
        if ref_loss is None:
            ref_loss, ref_grads = float(loss), grads
        else:
            entry["abs_loss_diff_vs_trl"] = abs(float(loss) - ref_loss)
            entry["max_abs_grad_diff_vs_trl"] = max(
                float((grads[k] - ref_grads[k]).abs().max()) for k in grads
            )
            entry["max_abs_grad"] = max(float(g.abs().max()) for g in ref_grads.values())
        report[name] = entry
    return report


# --------------------------------------------------------------------------------------------------
# Parent process: prepare data once, one subprocess per variant, print a table
# --------------------------------------------------------------------------------------------------


def _spawn(cfg: BenchConfig, mode: str, result: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_child",
        mode,
        "--_config",
        json.dumps(asdict(cfg)),
        "--_result",
        str(result),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        return {"variant": mode, "error": f"exit code {proc.returncode}"}
    return json.loads(result.read_text())


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine repeats of one variant: each step's time is its minimum over the repeats.

    Repeats of a variant see identical batches (same seed), so the per-step minimum filters out
    interference from other processes on a small shared machine.
    """
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    first = ok[0]
    step_min = [min(r["step_seconds"][i] for r in ok) for i in range(len(first["step_seconds"]))]
    seconds = sum(step_min)
    return {
        **{k: v for k, v in first.items() if k not in ("step_seconds", "seconds")},
        "repeats": len(ok),
        "seconds": seconds,
        "seconds_per_repeat": [r["seconds"] for r in ok],
        "sec_per_step": seconds / len(step_min),
        "real_tok_s": first["real_tokens"] / seconds,
        "padded_tok_s": first["padded_tokens"] / seconds,
        "peak_rss_mib": max(r["peak_rss_mib"] for r in ok),
        "step_seconds_min": step_min,
    }


def _print_table(results: list[dict[str, Any]], baseline: str) -> None:
    base = next((r for r in results if r.get("variant") == baseline and "error" not in r), None)
    header = (
        f"{'variant':<34} {'s/step':>7} {'real tok/s':>11} {'padded tok/s':>13} "
        f"{'GFLOP/s':>8} {'% peak':>7} {'peak RSS MiB':>13} {'final loss':>11} {'vs trl':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<34} ERROR: {r['error']}")
            continue
        label = r["variant"] if r["variant"] == r["resolved"] else f"best={r['resolved']}"
        ratio = r["real_tok_s"] / base["real_tok_s"] if base else float("nan")
        print(
            f"{label:<34} {r['sec_per_step']:>7.3f} {r['real_tok_s']:>11.0f} "
            f"{r['padded_tok_s']:>13.0f} {r['gflops']:>8.1f} {100 * (r['share_of_peak'] or 0):>6.1f}% "
            f"{r['peak_rss_mib']:>13.0f} {r['final_loss']:>11.4f} {ratio:>6.2f}x"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps before them")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="runs per variant (interleaved)")
    p.add_argument(
        "--variants",
        default="trl_defaults,hf_trainer,lmforge,lmforge_grouped",
        help=f"comma-separated, or 'all'; choices: best, {', '.join(VARIANTS)}",
    )
    p.add_argument("--check", action="store_true", help="also compare losses/grads on one batch")
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_config", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a._child:
        cfg = BenchConfig(**json.loads(a._config))
        if a._child == "check":
            out = check_equivalence(cfg)
        elif a._child == "peak":
            out = matmul_peak(cfg)
        else:
            out = run_variant(a._child, cfg)
        Path(a._result).write_text(json.dumps(out, indent=2))
        return

    names = list(VARIANTS) if a.variants == "all" else a.variants.split(",")
    for name in names:
        if name != "best" and name not in VARIANTS:
            p.error(f"unknown variant {name!r}")
    with tempfile.TemporaryDirectory(prefix="sft_bench_") as workdir:
        cfg = BenchConfig(
            steps=a.steps,
            warmup_steps=a.warmup_steps,
            batch_size=a.batch_size,
            max_length=a.max_length,
            hidden=a.hidden,
            layers=a.layers,
            heads=max(1, a.hidden // 64),
            intermediate=int(a.hidden * 8 / 3 / 8 + 1) * 8,
            seed=a.seed,
            workdir=workdir,
        )
        t0 = time.perf_counter()
        prepare_data(cfg)
        print(f"data + tokenizer ready in {time.perf_counter() - t0:.1f}s", flush=True)
        report: dict[str, Any] = {"config": asdict(cfg), "results": []}
        if a.check:
            report["check"] = _spawn(cfg, "check", Path(workdir) / "check.json")
            print(json.dumps(report["check"], indent=2), flush=True)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for rep in range(a.repeats):
            for name in names:
                t0 = time.perf_counter()
                res = _spawn(cfg, name, Path(workdir) / f"{name}.json")
                took = time.perf_counter() - t0
                print(f"[{rep + 1}/{a.repeats}] {name}: {took:.1f}s", flush=True)
                runs[name].append(res)
        peak = _spawn(cfg, "peak", Path(workdir) / "peak.json")
        report["matmul_peak"] = peak
        limit = peak.get("peak_gflops")
        print(
            f"fp32 matmul peak at the model's shapes: {limit:.1f} GFLOP/s ({peak.get('gflops')})", flush=True
        )
        report["results"] = [with_flops(aggregate(runs[name]), cfg, limit) for name in names]
    print()
    _print_table(report["results"], baseline="trl_defaults")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
