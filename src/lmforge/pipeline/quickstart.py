"""`lmforge quickstart`: every stage of the foundation, offline, on a tiny model, in minutes.

1. write a synthetic task with checkable answers (train and held-out items disjoint);
2. train a byte-level BPE tokenizer and build a tiny random Llama;
3. pre-train it on plain text that teaches the skill in another surface form;
4. measure held-out exact match through the chat template (before SFT);
5. LoRA SFT on the instruction form; measure again (after SFT);
6. merge the adapter into the base, check the merged model answers the same;
7. answer one held-out prompt through the streaming chat engine.

Each stage is the same driver `lmforge train` runs, fed a config built here.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lmforge.config import RunConfig, validate_config
from lmforge.data.synthetic import (
    QUICKSTART_SIZES,
    TaskExample,
    is_correct,
    make_task_split,
    pretrain_corpus,
    to_alpaca_records,
    tokenizer_corpus,
)
from lmforge.data.templates import Conversation
from lmforge.export.merge import merge_adapter
from lmforge.inference.engine import Engine, SamplingParams
from lmforge.methods import pretrain, sft
from lmforge.models.loading import quiet_library_bars
from lmforge.models.tiny import build_tiny_llama, build_tiny_tokenizer, save_tiny

console = Console()


@dataclass
class QuickstartResult:
    accuracy_before: float
    accuracy_after: float
    accuracy_merged: float
    heldout: int
    chat_prompt: str
    chat_answer: str
    expected_answer: str
    seconds: dict[str, float]
    output_dir: str


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def accuracy(engine: Engine, examples: list[TaskExample], max_new_tokens: int) -> float:
    """Exact match of greedy answers on held-out prompts, through the chat template."""
    conversations = [Conversation(turns=[(ex.prompt, "")]) for ex in examples]
    answers = engine.generate(conversations, SamplingParams(max_new_tokens=max_new_tokens), batch_size=64)
    return sum(is_correct(a, ex) for a, ex in zip(answers, examples, strict=True)) / len(examples)


def _stage_config(base: dict, **sections: dict) -> RunConfig:
    merged = {key: {**base.get(key, {}), **sections.get(key, {})} for key in {*base, *sections}}
    return validate_config(merged, source="quickstart")


def run_quickstart(output_dir: str | Path = "runs/quickstart", seed: int = 0) -> QuickstartResult:
    with quiet_library_bars():
        return _run(Path(output_dir), seed)


def _run(out: Path, seed: int) -> QuickstartResult:
    sizes = QUICKSTART_SIZES
    seconds: dict[str, float] = {}
    start = time.perf_counter()

    console.rule("[bold]1. synthetic task")
    train, heldout = make_task_split(seed, sizes["n_train"], sizes["n_heldout"])
    exclude = {ex.prompt for ex in heldout} | {ex.answer for ex in heldout}
    _write_json(out / "data" / "sft_train.json", to_alpaca_records(train))
    _write_json(out / "data" / "heldout.json", to_alpaca_records(heldout))
    corpus = pretrain_corpus(seed, sizes["pretrain_lines"], exclude)
    _write_json(out / "data" / "pretrain.json", [{"text": line} for line in corpus])
    console.print(
        f"{len(train)} training and {len(heldout)} held-out instructions (disjoint); "
        f"{len(corpus)} pre-training lines; e.g. [cyan]{train[0].prompt}[/] -> [green]{train[0].answer}[/]"
    )

    console.rule("[bold]2. tokenizer and tiny model")
    tokenizer = build_tiny_tokenizer(tokenizer_corpus(), vocab_size=sizes["vocab_size"])
    model = build_tiny_llama(
        tokenizer,
        hidden_size=sizes["hidden_size"],
        num_layers=sizes["num_layers"],
        num_heads=sizes["num_heads"],
        max_positions=sizes["max_positions"],
        seed=seed,
    )
    base_dir = save_tiny(model, tokenizer, out / "base")
    n_params = sum(p.numel() for p in model.parameters())
    console.print(
        f"vocab {len(tokenizer)}, Llama {sizes['num_layers']}x{sizes['hidden_size']}, {n_params:,} params"
    )
    seconds["setup"] = time.perf_counter() - start

    console.rule("[bold]3. pre-training (full parameters)")
    t = time.perf_counter()
    common = {"model": {"name_or_path": str(base_dir)}}
    pre = pretrain.run(
        _stage_config(
            common,
            method={"name": "pretrain"},
            adapter={"method": "none"},
            data={"path": str(out / "data" / "pretrain.json"), "max_length": sizes["pretrain_seq_len"]},
            train={
                "output_dir": str(out / "pretrain"),
                "max_steps": sizes["pretrain_steps"],
                "batch_size": sizes["pretrain_batch"],
                "lr": sizes["pretrain_lr"],
                "warmup_ratio": 0.05,
                "weight_decay": 0.01,
                "logging_steps": 25,
                "seed": seed,
                "tensorboard": False,
            },
        )
    )
    seconds["pretrain"] = time.perf_counter() - t
    pretrained = str(pre.artifact)

    console.rule("[bold]4. held-out accuracy before SFT")
    max_new = sizes["max_new_tokens"]
    before = accuracy(Engine.load(pretrained, template="chatml"), heldout, max_new)
    console.print(f"exact match before SFT: [bold]{before:.1%}[/]")

    console.rule("[bold]5. LoRA SFT")
    t = time.perf_counter()
    tuned = sft.run(
        _stage_config(
            {"model": {"name_or_path": pretrained}},
            adapter={"r": sizes["lora_r"], "alpha": sizes["lora_alpha"], "dropout": 0.0, "preset": "all"},
            data={"path": str(out / "data" / "sft_train.json"), "template": "chatml", "max_length": 64},
            train={
                "output_dir": str(out / "sft"),
                "max_steps": sizes["sft_steps"],
                "batch_size": sizes["sft_batch"],
                "lr": sizes["sft_lr"],
                "warmup_ratio": 0.05,
                "logging_steps": 25,
                "seed": seed,
                "tensorboard": False,
            },
        )
    )
    seconds["sft"] = time.perf_counter() - t
    after = accuracy(Engine.load(pretrained, adapter=str(tuned.artifact)), heldout, max_new)
    console.print(f"exact match after SFT: [bold]{after:.1%}[/]")

    console.rule("[bold]6. merge")
    t = time.perf_counter()
    merged_dir = merge_adapter(pretrained, tuned.artifact, out / "merged")
    merged_engine = Engine.load(str(merged_dir))
    merged = accuracy(merged_engine, heldout, max_new)
    seconds["merge"] = time.perf_counter() - t

    console.rule("[bold]7. chat")
    example = heldout[0]
    console.print(f"[bold green]you[/]: {example.prompt}")
    console.print("[bold cyan]assistant[/]: ", end="")
    pieces = []
    for piece in merged_engine.stream(Conversation(turns=[(example.prompt, "")]), SamplingParams(max_new)):
        pieces.append(piece)
        console.print(piece, end="", markup=False, highlight=False)
    console.print()
    seconds["total"] = time.perf_counter() - start

    result = QuickstartResult(
        accuracy_before=before,
        accuracy_after=after,
        accuracy_merged=merged,
        heldout=len(heldout),
        chat_prompt=example.prompt,
        chat_answer="".join(pieces).strip(),
        expected_answer=example.answer,
        seconds={k: round(v, 1) for k, v in seconds.items()},
        output_dir=str(out),
    )
    _write_json(out / "results.json", asdict(result))

    table = Table(title="lmforge quickstart", show_header=True)
    table.add_column("stage")
    table.add_column("held-out exact match", justify="right")
    table.add_column("time", justify="right")
    table.add_row("pre-trained, before SFT", f"{before:.1%}", f"{seconds['pretrain']:.0f}s")
    table.add_row("LoRA SFT (adapter)", f"{after:.1%}", f"{seconds['sft']:.0f}s")
    table.add_row("merged model", f"{merged:.1%}", f"{seconds['merge']:.0f}s")
    console.print(table)
    console.print(
        f"{len(heldout)} held-out prompts never seen in training; total {seconds['total']:.0f}s. "
        f"Everything is in [bold]{out}/[/] (results.json, base/, pretrain/, sft/, merged/, data/)."
    )
    console.print(
        f"Next: [bold]lmforge chat --model {merged_dir}[/], or compare the stages: "
        "[bold]lmforge eval examples/quickstart/eval.yaml[/]"
    )
    return result
