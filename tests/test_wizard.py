"""`lmforge wizard`: scripted answers in, a pipeline the project's own parser loads out.

Nothing is trained: the tests feed stdin to the command (a few drive the question functions
with a scripted Prompter) and read back what was written with `load_pipeline` / `load_arch`.
Each answer list is commented with the question it answers.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.lab.spec import load_arch
from lmforge.pipeline.spec import load_pipeline, planned_output, training_config
from lmforge.wizard import Optimizer, Prompter, ask_architecture, run_wizard, suggest_lr


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Tiny input files, with tmp_path as the current folder (relative answers and runs/ go there)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tok").mkdir()  # the wizard only checks that a tokenizer folder exists
    (tmp_path / "notes.txt").write_text("A first document.\nA second one.\n")
    (tmp_path / "more.txt").write_text("More plain text.\n")
    records = [{"instruction": "add 1 and 2", "input": "", "output": "3"}]
    (tmp_path / "sft.json").write_text(json.dumps(records))
    pairs = [{"prompt": "add 1 and 2", "chosen": "3", "rejected": "4"}]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "add 1 and 2", "answer": "3"}) + "\n")
    return tmp_path


def wizard(answers: list[str], out: str = "wizard.yaml"):
    return CliRunner().invoke(app, ["wizard", "--out", out], input="\n".join(answers) + "\n")


LAB = [
    "a",  # 1. starting point: design and pre-train in the lab
    "tok",  # tokenizer folder
    "128",  # d_model
    "2",  # n_layers
    "4",  # n_heads
    "grouped-query",  # attention
    "2",  # n_kv_heads
    "rope",  # position
    "rmsnorm",  # norm
    "swiglu",  # activation
    "y",  # tie embeddings
    "0.1",  # dropout
    "256",  # max_position_embeddings
    "notes.txt",  # pre-training dataset 1
    "y",  # add another
    "more.txt",  # dataset 2
    "n",  # no more
    "3",  # weight of notes.txt
    "1",  # weight of more.txt
    "128",  # block size
    "y",  # document boundaries
    "200",  # steps
    "8",  # batch size
    "lion",  # 3. optimizer
    "0.9, 0.98",  # lion betas
    "",  # weight decay (suggested 0.3 for lion)
    "cosine",  # schedule
    "10",  # warmup steps
    "",  # min_lr_ratio (0.1)
    "",  # pre-training lr (suggested)
    "y",  # 4. SFT after pre-training
    "sft.json",  # SFT data
    "",  # format: auto
    "",  # template: chatml
    "128",  # max_length
    "y",  # LoRA
    "attention_only",  # preset
    "8",  # r
    "16",  # alpha
    "0.1",  # dropout
    "",  # SFT lr
    "2",  # epochs
    "",  # batch size (4)
    "dpo",  # 5. alignment
    "0",  # beta: rejected (must be > 0)
    "0.2",  # beta
    "ipo",  # loss type
    "pairs.json",  # DPO data
    "",  # DPO lr
    "",  # epochs
    "",  # batch size
    "y",  # merge stage
    "",  # 6. pipeline name (lab-model)
    "",  # output folder (runs/pipelines/lab-model)
    "",  # pipeline file (--out)
    "",  # architecture file (wizard_arch.yaml)
]


def test_lab_pipeline_end_to_end(workdir: Path):
    result = wizard(LAB)
    assert result.exit_code == 0, result.output
    assert "beta: Input should be greater than 0" in result.output
    assert "Run it: lmforge run wizard.yaml" in result.output

    arch = load_arch(workdir / "wizard_arch.yaml")
    assert (arch.name, arch.tokenizer, arch.d_model, arch.n_layers) == ("lab-model", "tok", 128, 2)
    assert (arch.n_heads, arch.n_kv_heads, arch.attention_kind) == (4, 2, "grouped-query")
    assert (arch.position, arch.norm, arch.activation, arch.tie_embeddings) == (
        "rope",
        "rmsnorm",
        "swiglu",
        True,
    )
    assert arch.dropout == pytest.approx(0.1) and arch.max_position_embeddings == 256

    text = (workdir / "wizard.yaml").read_text()
    assert text.startswith("# lmforge run wizard.yaml\n")
    spec = load_pipeline(workdir / "wizard.yaml")
    assert [(s.name, s.kind, s.source) for s in spec.stages] == [
        ("pretrain", "pretrain", None),
        ("sft", "sft", "pretrain"),
        ("dpo", "dpo", "sft"),
        ("merged", "merge", "dpo"),
    ]
    assert spec.output_dir == Path("runs/pipelines/lab-model")
    pretrain = spec.stage("pretrain").body
    assert pretrain["model"] == {"arch": "wizard_arch.yaml"}
    assert pretrain["adapter"] == {"method": "none"} and pretrain["method"] == {"document_boundaries": True}
    assert pretrain["data"]["datasets"] == [
        {"path": "notes.txt", "weight": 3},
        {"path": "more.txt", "weight": 1},
    ]
    assert pretrain["data"]["max_length"] == 128
    train = pretrain["train"]
    assert train["optimizer"] == "lion" and train["optimizer_args"] == {"betas": [0.9, 0.98]}
    assert train["lr"] == pytest.approx(3.3e-4)  # AdamW's 1e-3 pre-training lr, 3x smaller for Lion
    assert (train["max_steps"], train["batch_size"], train["warmup_steps"]) == (200, 8, 10)
    assert train["weight_decay"] == pytest.approx(0.3) and train["min_lr_ratio"] == pytest.approx(0.1)

    sft = spec.stage("sft").body
    assert sft["adapter"] == {
        "method": "lora",
        "preset": "attention_only",
        "r": 8,
        "alpha": 16,
        "dropout": 0.1,
    }
    assert sft["data"] == {"path": "sft.json", "template": "chatml", "max_length": 128}
    assert sft["train"]["epochs"] == 2 and sft["train"]["optimizer"] == "lion"

    dpo = spec.stage("dpo").body
    assert dpo["method"] == {"beta": 0.2, "loss_type": "ipo"}
    assert dpo["adapter"] == sft["adapter"]
    # the DPO stage continues the SFT adapter over the pre-trained model
    pretrained = planned_output(spec, spec.stage("pretrain"), None)
    sft_out = planned_output(spec, spec.stage("sft"), pretrained)
    config = training_config(spec, spec.stage("dpo"), sft_out)
    assert config.adapter.path == sft_out.path and config.model.name_or_path == pretrained.path


FINETUNE_GRPO = [
    "b",  # 1. starting point: fine-tune
    "Qwen/Qwen2.5-0.5B-Instruct",  # 2. a hub id, taken as it is
    "adamw",  # 3. optimizer
    "",  # betas
    "",  # eps
    "",  # weight decay (0)
    "",  # schedule (cosine)
    "",  # warmup (0)
    "",  # min_lr_ratio (0)
    "sft.json",  # 4. SFT data
    "",  # format
    "",  # template (auto)
    "",  # max_length (1024)
    "y",  # LoRA
    "",  # preset (all)
    "",  # r (16)
    "",  # alpha (32)
    "",  # dropout (0.05)
    "y",  # QLoRA
    "",  # SFT lr (3e-4)
    "",  # epochs
    "",  # batch size
    "grpo",  # 5. alignment
    "exact_answer, think_fromat",  # rejected: a typo
    "exact_answer, think_format",  # rewards
    "",  # exact_answer field (answer)
    "",  # its weight (1)
    "0.5",  # think_format weight
    "4",  # num_generations
    "",  # KL beta (0)
    "512",  # max completion length
    "prompts.jsonl",  # GRPO data
    "",  # lr
    "",  # epochs
    "6",  # batch size: rejected (not a multiple of 4)
    "8",  # batch size
    "y",  # merge
    "",  # 6. pipeline name
    "runs/qwen-grpo",  # output folder
    "",  # pipeline file
]


def test_finetune_qlora_grpo(workdir: Path):
    result = wizard(FINETUNE_GRPO)
    assert result.exit_code == 0, result.output
    assert "is not a local path: taken as a hub id" in result.output
    assert "`think_fromat` is not one of" in result.output and "did you mean `think_format`" in result.output
    assert "train.batch_size 6 is not a multiple of num_generations 4" in result.output

    spec = load_pipeline(workdir / "wizard.yaml")
    assert spec.name == "Qwen2.5-0.5B-Instruct" and spec.output_dir == Path("runs/qwen-grpo")
    assert spec.shared == {"model": {"name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "quantization": "4bit"}}
    assert [(s.name, s.kind, s.source) for s in spec.stages] == [
        ("sft", "sft", None),
        ("grpo", "grpo", "sft"),
        ("merged", "merge", "grpo"),
    ]
    grpo = spec.stage("grpo").body
    assert grpo["method"]["rewards"] == [
        {"builtin": "exact_answer", "field": "answer", "weight": 1},
        {"builtin": "think_format", "weight": 0.5},
    ]
    assert grpo["method"]["sampling"] == {"num_generations": 4, "max_completion_length": 512}
    assert grpo["train"]["batch_size"] == 8 and grpo["train"]["lr"] == pytest.approx(1e-5)
    # QLoRA carries over: the GRPO stage loads the same 4-bit base and continues the SFT adapter
    sft_out = planned_output(spec, spec.stage("sft"), None)
    config = training_config(spec, spec.stage("grpo"), sft_out)
    assert config.model.quantization == "4bit" and config.adapter.path == sft_out.path
    assert config.method.rewards[1].weight == 0.5


BAD_THEN_GOOD = [
    "a",  # starting point
    "tok",  # tokenizer
    "30",  # d_model
    "2",  # n_layers
    "4",  # n_heads -> 30 is not divisible by 4: d_model and n_heads asked again
    "32",  # d_model, again
    "",  # n_heads, again (4)
    "multi-head",  # attention
    "",  # position (rope)
    "",  # norm
    "",  # activation
    "",  # tie
    "",  # dropout
    "",  # max_position_embeddings (2048)
    "missing.txt",  # rejected: does not exist
    "notes.txt",  # dataset
    "n",  # no more
    "",  # block size
    "",  # document boundaries
    "",  # steps
    "",  # batch size
    "adamx",  # rejected: unknown optimizer
    "lion",  # optimizer
    "1.2, 0.9",  # rejected: a beta outside [0, 1)
    "0.9, 0.98",  # betas
    "",  # weight decay
    "",  # schedule
    "",  # warmup
    "",  # min_lr_ratio
    "",  # lr
    "n",  # no SFT: pre-training only
    "",  # pipeline name
    "",  # output folder
    "",  # pipeline file
    "",  # architecture file
]


def test_bad_answers_are_rejected_with_the_reason_and_asked_again(workdir: Path):
    result = wizard(BAD_THEN_GOOD)
    assert result.exit_code == 0, result.output
    for reason in (
        "d_model 30 is not divisible by n_heads 4",
        "asking again: d_model, n_heads",
        "missing.txt does not exist",
        "`adamx` is not one of",
        "did you mean `adamw`",
        "betas [1.2, 0.9] must each be in [0, 1)",
    ):
        assert reason in result.output, result.output
    assert load_arch(workdir / "wizard_arch.yaml").d_model == 32
    spec = load_pipeline(workdir / "wizard.yaml")
    assert [s.name for s in spec.stages] == ["pretrain"]
    train = spec.stage("pretrain").body["train"]
    assert train["optimizer"] == "lion" and train["optimizer_args"] == {"betas": [0.9, 0.98]}
    assert spec.stage("pretrain").body["data"] == {"path": "notes.txt", "max_length": 512}


FULL_SFT = [
    "b",  # fine-tune
    "base",  # an existing local folder
    "",  # optimizer (adamw)
    "",  # betas
    "",  # eps
    "",  # weight decay
    "none",  # schedule: constant (no min_lr_ratio question)
    "",  # warmup
    "sft.json",  # SFT data
    "alpaca",  # format
    "",  # template
    "256",  # max_length
    "n",  # no LoRA: every weight trains (no QLoRA, no merge question)
    "",  # lr (3e-5 for full fine-tuning)
    "",  # epochs
    "",  # batch size
    "none",  # no alignment
    "",  # pipeline name
    "",  # output folder
]


@pytest.mark.parametrize("overwrite", [False, True])
def test_existing_file_is_kept_unless_the_user_says_overwrite(workdir: Path, overwrite: bool):
    (workdir / "base").mkdir()
    (workdir / "wizard.yaml").write_text("keep: me\n")
    answers = [*FULL_SFT, "", "y" if overwrite else "n"]  # pipeline file (exists) -> overwrite?
    if not overwrite:
        answers.append("")  # the path again: a free name is offered (wizard-2.yaml)
    result = wizard(answers)
    assert result.exit_code == 0, result.output
    assert "wizard.yaml exists: overwrite it?" in result.output
    written = workdir / ("wizard.yaml" if overwrite else "wizard-2.yaml")
    kept = (workdir / "wizard.yaml").read_text() == "keep: me\n"
    assert kept is not overwrite
    spec = load_pipeline(written)
    assert [s.name for s in spec.stages] == ["sft"]
    sft = spec.stage("sft").body
    assert spec.shared == {"model": {"name_or_path": "base"}}
    assert sft["adapter"] == {"method": "none"} and sft["train"]["scheduler"] == "none"
    assert sft["train"]["lr"] == pytest.approx(3e-5) and "min_lr_ratio" not in sft["train"]
    assert sft["data"] == {"path": "sft.json", "format": "alpaca", "template": "auto", "max_length": 256}
    assert not list(workdir.glob(".*.tmp"))  # the atomic write left no temporary file


def test_stopping_early_writes_nothing(workdir: Path):
    result = wizard(LAB[:20])  # stdin ends in the middle of the questions
    assert result.exit_code != 0
    assert not (workdir / "wizard.yaml").exists() and not (workdir / "wizard_arch.yaml").exists()


class Scripted(Prompter):
    """Answers from a list; an empty answer takes the default."""

    def __init__(self, answers: list[str]) -> None:
        self.out = io.StringIO()
        super().__init__(Console(file=self.out, soft_wrap=True))
        self.answers = list(answers)

    def ask(self, question: str, default: str | None = None) -> str:
        return self.answers.pop(0) or (default or "")

    def confirm(self, question: str, default: bool) -> bool:
        answer = self.answers.pop(0)
        return default if not answer else answer == "y"


def test_yarn_context_rule_asks_both_numbers_again(workdir: Path):
    p = Scripted(
        [
            "tok",  # tokenizer
            "64",  # d_model
            "2",  # n_layers
            "4",  # n_heads
            "multi-query",  # attention
            "yarn",  # position
            "4",  # YaRN factor
            "4096",  # YaRN original context
            "",  # norm
            "",  # activation
            "",  # tie
            "",  # dropout
            "2048",  # max_position_embeddings: not above the original 4096 -> both asked again
            "256",  # YaRN original context, again
            "",  # max_position_embeddings, again (its answer, 2048, is the default)
        ]
    )
    arch = ask_architecture(p)
    assert "yarn.original_max_position_embeddings 4096 must be below max_position_embeddings 2048" in (
        p.out.getvalue()
    )
    assert arch["yarn"] == {"factor": 4.0, "original_max_position_embeddings": 256}
    assert arch["n_kv_heads"] == 1 and arch["max_position_embeddings"] == 2048
    assert not p.answers


def test_suggested_learning_rates_follow_the_optimizer():
    def lr(name: str, what: str, **args) -> float:
        return suggest_lr(Optimizer(name, args, 0.0, "cosine"), what)

    assert lr("adamw", "pretrain") == pytest.approx(1e-3) and lr("adamw", "lora") == pytest.approx(3e-4)
    assert lr("lion", "pretrain") == pytest.approx(3.3e-4)
    assert lr("muon", "pretrain", adjust_lr_fn="original") == pytest.approx(0.02)
    assert lr("muon", "pretrain", adjust_lr_fn="match_rms_adamw") == pytest.approx(1e-3)


def test_a_stage_that_cannot_use_the_optimizer_gets_adamw_with_the_reason():
    sophia = Optimizer("sophia", {"rho": 0.05}, 0.1, "cosine")
    assert sophia.for_stage("sft") == (sophia, None)
    dpo, why = sophia.for_stage("dpo")
    assert (dpo.name, dpo.args, dpo.weight_decay) == ("adamw", {}, 0.1) and "Hessian" in (why or "")
    lion = Optimizer("lion", {"betas": [0.9, 0.98]}, 0.3, "cosine")
    assert lion.for_stage("dpo") == (lion, None)
    assert lion.for_stage("ppo")[0].name == "adamw"


def test_muon_original_scaling_asks_each_stage_for_the_adamw_part_lr(workdir: Path):
    answers = [
        "b",  # fine-tune
        "org/model",  # hub id
        "muon",  # optimizer
        "",  # momentum
        "",  # nesterov
        "",  # ns_steps
        "original",  # adjust_lr_fn (adamw_lr is then asked per stage)
        "",  # adamw_betas
        "",  # adamw_eps
        "",  # weight decay
        "",  # schedule
        "",  # warmup
        "",  # min_lr_ratio
        "sft.json",  # SFT data
        "",  # format
        "",  # template
        "",  # max_length
        "",  # LoRA (yes)
        "",  # preset
        "",  # r
        "",  # alpha
        "",  # dropout
        "",  # QLoRA (no)
        "",  # SFT lr: Muon's own (0.006 = 20 x AdamW's 3e-4)
        "",  # lr of the AdamW part (3e-4)
        "",  # epochs
        "",  # batch size
        "",  # alignment: none
        "n",  # no merge
        "",  # pipeline name
        "",  # output folder
        "",  # pipeline file
    ]
    p = Scripted(answers)
    written = run_wizard(p, workdir / "muon.yaml")
    assert not p.answers
    train = load_pipeline(written.pipeline).stage("sft").body["train"]
    assert train["lr"] == pytest.approx(6e-3)
    assert train["optimizer_args"]["adjust_lr_fn"] == "original"
    assert train["optimizer_args"]["adamw_lr"] == pytest.approx(3e-4)
