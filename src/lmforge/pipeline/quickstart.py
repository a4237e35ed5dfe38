"""`lmforge quickstart`: every stage of the foundation, offline, on a tiny model, in minutes.

1. write a synthetic task with checkable answers (train and held-out items disjoint), and
   preference pairs (the right answer chosen, a near miss rejected);
2. train a byte-level BPE tokenizer and build a tiny random Llama;
3. run the bundled pipeline (`pipeline.yaml` in the output folder, the same runner as
   `lmforge run`): pre-training on plain text that teaches the skill in another surface form ->
   LoRA SFT on the instruction form -> DPO continuing the SFT adapter -> merge -> eval (held-out
   exact match of every stage through the chat template, answer perplexity, the query suite);
4. answer one held-out prompt through the streaming chat engine.

Rerunning `lmforge run <output>/pipeline.yaml` skips every stage already done.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from lmforge.artifacts import write_atomic
from lmforge.data.synthetic import (
    QUICKSTART_SIZES,
    TaskExample,
    is_correct,
    make_task_split,
    preference_records,
    pretrain_corpus,
    to_alpaca_records,
    tokenizer_corpus,
)
from lmforge.data.templates import Conversation
from lmforge.inference.engine import Engine, SamplingParams
from lmforge.models.loading import quiet_library_bars
from lmforge.models.tiny import build_tiny_llama, build_tiny_tokenizer, save_tiny

console = Console()


@dataclass
class QuickstartResult:
    accuracy_before: float  # the pre-trained model, before SFT
    accuracy_after: float  # after LoRA SFT
    accuracy_dpo: float  # after DPO continuing the SFT adapter
    accuracy_merged: float  # the merged model
    heldout: int
    chat_prompt: str
    chat_answer: str
    expected_answer: str
    seconds: dict[str, float]
    output_dir: str


def _write_json(path: Path, data: object) -> None:
    write_atomic(path, json.dumps(data, indent=1, ensure_ascii=False))


def accuracy(engine: Engine, examples: list[TaskExample], max_new_tokens: int) -> float:
    """Exact match of greedy answers on held-out prompts, through the chat template."""
    conversations = [Conversation(turns=[(ex.prompt, "")]) for ex in examples]
    answers = engine.generate(conversations, SamplingParams(max_new_tokens=max_new_tokens), batch_size=64)
    return sum(is_correct(a, ex) for a, ex in zip(answers, examples, strict=True)) / len(examples)


def run_quickstart(output_dir: str | Path = "runs/quickstart", seed: int = 0) -> QuickstartResult:
    with quiet_library_bars():
        return _run(Path(output_dir), seed)


def _write_if_changed(path: Path, data: object) -> None:
    """Same content, same file (and modification time): a rerun's pipeline sees unchanged data."""
    text = json.dumps(data, indent=1, ensure_ascii=False)
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        _write_json(path, data)


def pipeline_config(out: Path, seed: int) -> dict:
    """The bundled quickstart pipeline (written to out/pipeline.yaml and run by `lmforge run`)."""
    sizes = QUICKSTART_SIZES
    data = out / "data"
    common_train = {"warmup_ratio": 0.05, "logging_steps": 25, "seed": seed, "tensorboard": False}
    generation = {"max_new_tokens": sizes["max_new_tokens"], "batch_size": 64}
    return {
        "name": "quickstart",
        "output_dir": str(out),
        "shared": {"model": {"name_or_path": str(out / "base")}, "data": {"template": "chatml"}},
        "stages": [
            {
                "name": "pretrain",
                "kind": "pretrain",
                # GPT-2 style blocks: the stage the preference and RL learning tests were calibrated
                # on (with document boundaries the base is stronger: see docs/lab.md).
                "method": {"document_boundaries": False},
                "adapter": {"method": "none"},
                "data": {"path": str(data / "pretrain.json"), "max_length": sizes["pretrain_seq_len"]},
                "train": {
                    **common_train,
                    "max_steps": sizes["pretrain_steps"],
                    "batch_size": sizes["pretrain_batch"],
                    "lr": sizes["pretrain_lr"],
                    "weight_decay": 0.01,
                },
            },
            {
                "name": "sft",
                "kind": "sft",
                "adapter": {
                    "r": sizes["lora_r"],
                    "alpha": sizes["lora_alpha"],
                    "dropout": 0.0,
                    "preset": "all",
                },
                "data": {"path": str(data / "sft_train.json"), "max_length": 64},
                "train": {
                    **common_train,
                    "max_steps": sizes["sft_steps"],
                    "batch_size": sizes["sft_batch"],
                    "lr": sizes["sft_lr"],
                },
            },
            {
                "name": "dpo",
                "kind": "dpo",
                "method": {"beta": 0.1},
                "adapter": {
                    "r": sizes["lora_r"],
                    "alpha": sizes["lora_alpha"],
                    "dropout": 0.0,
                    "preset": "all",
                },
                "data": {"path": str(data / "dpo_pairs.json"), "max_length": 64},
                "train": {**common_train, "max_steps": sizes["dpo_steps"], "batch_size": 16, "lr": 5e-4},
            },
            {"name": "merged", "kind": "merge", "from": "dpo"},
            {
                "name": "eval",
                "kind": "eval",
                "models": ["pretrain", "sft", "dpo", "merged"],
                "generation": generation,
                "tasks": [
                    {
                        "kind": "generation",
                        "name": "heldout",
                        "data": str(data / "heldout.json"),
                        "metrics": ["exact_match"],
                    },
                    {"kind": "perplexity", "data": str(data / "heldout.json")},
                    {"kind": "suite", "suite": "quickstart"},
                ],
            },
        ],
    }


def _run(out: Path, seed: int) -> QuickstartResult:
    from lmforge.pipeline.runner import run_pipeline
    from lmforge.pipeline.spec import parse_pipeline

    sizes = QUICKSTART_SIZES
    seconds: dict[str, float] = {}
    start = time.perf_counter()

    console.rule("[bold]1. synthetic task")
    train, heldout = make_task_split(seed, sizes["n_train"], sizes["n_heldout"])
    exclude = {ex.prompt for ex in heldout} | {ex.answer for ex in heldout}
    _write_if_changed(out / "data" / "sft_train.json", to_alpaca_records(train))
    _write_if_changed(out / "data" / "heldout.json", to_alpaca_records(heldout))
    pairs = preference_records(train[: sizes["dpo_pairs"]], [""] * sizes["dpo_pairs"], seed)
    _write_if_changed(out / "data" / "dpo_pairs.json", pairs)
    corpus = pretrain_corpus(seed, sizes["pretrain_lines"], exclude)
    _write_if_changed(out / "data" / "pretrain.json", [{"text": line} for line in corpus])
    console.print(
        f"{len(train)} training and {len(heldout)} held-out instructions (disjoint); {len(pairs)} "
        f"preference pairs; {len(corpus)} pre-training lines; "
        f"e.g. [cyan]{train[0].prompt}[/] -> [green]{train[0].answer}[/]"
    )

    console.rule("[bold]2. tokenizer and tiny model")
    base_dir = out / "base"
    stamp = base_dir / "quickstart.json"  # what the base was built from: rebuilt when that changes
    built_from = json.dumps({"seed": seed, "sizes": dict(sizes)}, sort_keys=True)
    if not (
        stamp.is_file() and stamp.read_text() == built_from and (base_dir / "model.safetensors").is_file()
    ):
        tokenizer = build_tiny_tokenizer(tokenizer_corpus(), vocab_size=sizes["vocab_size"])
        model = build_tiny_llama(
            tokenizer,
            hidden_size=sizes["hidden_size"],
            num_layers=sizes["num_layers"],
            num_heads=sizes["num_heads"],
            max_positions=sizes["max_positions"],
            seed=seed,
        )
        save_tiny(model, tokenizer, base_dir)
        stamp.write_text(built_from)
    console.print(
        f"Llama {sizes['num_layers']}x{sizes['hidden_size']}, vocab {sizes['vocab_size']} (byte-level BPE), "
        f"in {base_dir}"
    )
    seconds["setup"] = time.perf_counter() - start

    console.rule("[bold]3. pipeline: pretrain -> LoRA SFT -> DPO -> merge -> eval")
    raw = pipeline_config(out, seed)
    (out / "pipeline.yaml").write_text(
        "# lmforge run " + str(out / "pipeline.yaml") + "\n" + yaml.safe_dump(raw, sort_keys=False),
        encoding="utf-8",
    )
    manifest = run_pipeline(parse_pipeline(raw, str(out / "pipeline.yaml")), quiet=False)
    stages = manifest["stages"]
    for name in ("pretrain", "sft", "dpo", "merged", "eval"):
        seconds[name] = stages[name].get("seconds", 0.0)
    scores = stages["eval"]["metrics"]
    accuracy = {name: scores[name]["heldout"]["exact_match"] for name in ("pretrain", "sft", "dpo", "merged")}

    console.rule("[bold]4. chat")
    merged_dir = out / "merged"
    max_new = sizes["max_new_tokens"]
    example = heldout[0]
    console.print(f"[bold green]you[/]: {example.prompt}")
    console.print("[bold cyan]assistant[/]: ", end="")
    pieces = []
    engine = Engine.load(str(merged_dir))
    for piece in engine.stream(Conversation(turns=[(example.prompt, "")]), SamplingParams(max_new)):
        pieces.append(piece)
        console.print(piece, end="", markup=False, highlight=False)
    console.print()
    seconds["total"] = time.perf_counter() - start

    result = QuickstartResult(
        accuracy_before=accuracy["pretrain"],
        accuracy_after=accuracy["sft"],
        accuracy_dpo=accuracy["dpo"],
        accuracy_merged=accuracy["merged"],
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
    table.add_column("answer perplexity", justify="right")
    table.add_column("time", justify="right")
    rows = [
        ("pretrain", "pre-trained, before SFT"),
        ("sft", "LoRA SFT (adapter)"),
        ("dpo", "DPO (continued adapter)"),
        ("merged", "merged model"),
    ]
    for name, label in rows:
        ppl = scores[name]["perplexity"]["perplexity"]
        table.add_row(label, f"{accuracy[name]:.1%}", f"{ppl:.2f}", f"{seconds[name]:.0f}s")
    console.print(table)
    console.print(
        f"{len(heldout)} held-out prompts never seen in training; total {seconds['total']:.0f}s. "
        f"Everything is in [bold]{out}/[/] (pipeline.yaml, manifest.json, report.html, eval/report.html, "
        "base/, pretrain/, sft/, dpo/, merged/, data/)."
    )
    console.print(
        f"Next: [bold]lmforge chat --model {merged_dir}[/]; rerun with "
        f"[bold]lmforge run {out / 'pipeline.yaml'}[/] (done stages are skipped)"
    )
    return result
