"""Knowledge distillation: a student learns a frozen teacher's token distributions.

Logit distillation (default): on the SFT data, tokenized and masked as SFT does (response tokens
only for chat data), the loss at every labelled position is alpha x D(teacher, student) +
(1 - alpha) x cross-entropy on the hard label, with D forward KL (Hinton et al. 2015), reverse KL
or generalized JSD (GKD, Agarwal et al. 2024) at temperature T (losses/kd.py). Teacher and student
must share a vocabulary, which is checked. The teacher runs in no-grad eval mode on the same
packed rows; optionally quantized or with an adapter. The student trains fully or with an adapter.

Sequence-level distillation (`method.distill.sequence_level`, Kim & Rush 2016): the teacher
answers every training prompt (greedy) and the student is fine-tuned on those answers: no shared
vocabulary needed. The answers are kept in `teacher_answers.jsonl` beside the run.

Why not trl's distillation trainers: they live in `trl.experimental` (unstable between releases)
and add on-policy sampling; this driver reuses SFT's data path and the fast ForgeTrainer loop,
with the loss as a pure, tested function.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from lmforge import distributed
from lmforge.artifacts import write_resolved_config
from lmforge.config import RunConfig
from lmforge.config.model import ModelConfig
from lmforge.data.cache import sft_rows
from lmforge.data.loader import load_examples
from lmforge.data.templates import Conversation
from lmforge.models.loading import load_tokenizer
from lmforge.models.location import model_location
from lmforge.training.checkpoints import start_run
from lmforge.training.distill import DistillTrainer, load_teacher, shared_vocabulary
from lmforge.training.stage import (
    StageResult,
    begin_stage,
    load_model_for_training,
    optimizer_steps,
    resolve_template,
    train_and_save,
)
from lmforge.training.trainer import build_trainer

console = Console(stderr=True)
ANSWERS_FILE = "teacher_answers.jsonl"


def check(config: RunConfig) -> None:
    """Distillation's own combinations, checked before any model is loaded."""
    if config.method.name != "distill":
        raise ValueError(f"methods.distill cannot run method.name={config.method.name}")
    options = config.method.distill
    assert options is not None  # MethodConfig requires it for distill
    model_location(options.teacher)  # a missing local teacher folder is one clear error
    if options.teacher_adapter and not Path(options.teacher_adapter).is_dir():
        raise ValueError(f"method.distill.teacher_adapter {options.teacher_adapter} is not a folder")
    if config.data.format == "text":
        raise ValueError("distillation reads instruction or chat records (the student learns the answers)")
    if config.data.streaming:
        raise ValueError("distillation reads the whole data set; turn off data.streaming")
    if options.sequence_level and config.data.packing:
        raise ValueError("sequence-level distillation writes new answers first: turn off data.packing")


def on_teacher_answers(config: RunConfig, quiet: bool) -> StageResult:
    """Sequence-level KD: SFT on the teacher's answers, generated first (a rerun reuses them). The
    run is that SFT run; method.distill stays in its config, so its identity (what a rerun resumes,
    `training.checkpoints.run_id`) names the teacher. config.yaml is the distillation config."""
    from lmforge.config.data import DatasetSource
    from lmforge.methods import sft

    check(config)
    output_dir = Path(config.train.output_dir)
    answers = output_dir / ANSWERS_FILE
    source = DatasetSource(path=str(answers.resolve()), format="messages")
    on_answers = config.model_copy(
        update={
            "method": config.method.model_copy(update={"name": "sft"}),
            "data": config.data.model_copy(update={"path": "", "datasets": [source], "eval_path": None}),
        }
    )
    with distributed.main_first() as main:  # the main process asks the teacher; the others read
        if main:
            start_run(on_answers)  # refused before the teacher runs when the folder holds another run
            if config.train.resume in ("fresh", "none"):  # starting over asks the teacher again
                answers.unlink(missing_ok=True)
            teacher_answers(config, output_dir, quiet)
    result = sft.run(on_answers, quiet)
    if main:
        write_resolved_config(config, output_dir)
    return result


def teacher_answers(config: RunConfig, out: Path, quiet: bool) -> Path:
    """Sequence-level KD: the teacher's greedy answers to every training prompt, as a messages
    file (written atomically); reused when it is already complete."""
    from lmforge.artifacts import write_atomic
    from lmforge.inference.engine import Engine, SamplingParams

    path = out / ANSWERS_FILE
    examples = load_examples(config.data, "sft").train
    if path.is_file() and len(path.read_text(encoding="utf-8").splitlines()) == len(examples):
        return path
    options = config.method.distill
    # The teacher is prompted in its own chat format (saved with it, or guessed from its name);
    # the student then learns the answers in the data's template.
    engine = Engine.load(options.teacher, adapter=options.teacher_adapter)
    conversations = []
    for example in examples:
        conversation = example.conversation()
        *history, (last_user, _) = conversation.turns
        conversations.append(Conversation(turns=[*history, (last_user, "")], system=conversation.system))
    params = SamplingParams(max_new_tokens=options.max_new_tokens)
    answers = engine.generate(conversations, params, batch_size=16)
    lines = []
    for conversation, answer in zip(conversations, answers, strict=True):
        messages = [{"role": "system", "content": conversation.system}] if conversation.system else []
        for user, assistant in conversation.turns[:-1]:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages += [
            {"role": "user", "content": conversation.turns[-1][0]},
            {"role": "assistant", "content": answer.strip()},
        ]
        lines.append(json.dumps({"messages": messages}, ensure_ascii=False))
    write_atomic(path, "\n".join(lines) + "\n")
    if not quiet:
        console.print(f"[bold]teacher answers[/]: {len(lines)} written to {path}")
    return path


def run(config: RunConfig, quiet: bool = False) -> StageResult:
    options = config.method.distill
    assert options is not None
    if options.sequence_level:
        return on_teacher_answers(config, quiet)
    begin_stage(config, check)

    tokenizer = load_tokenizer(config.model)
    vocab = shared_vocabulary(tokenizer, load_tokenizer(ModelConfig(name_or_path=options.teacher)), options)
    template = resolve_template(config, tokenizer)

    (train_ds, eval_ds, stats), _ = sft_rows(config.data, template, tokenizer)
    if stats.examples == 0:
        raise ValueError("no training example has a response token within data.max_length")

    model, hardware = load_model_for_training(config, quiet, optimizer_steps(config, len(train_ds)))
    teacher = load_teacher(config, hardware)
    if not quiet:
        console.print(
            f"[bold]distill[/]: {options.loss} at T={options.temperature}, alpha {options.alpha} "
            f"(1 - alpha on hard labels) from {options.teacher}; {stats.examples} examples"
        )
    trainer = build_trainer(
        config,
        model,
        tokenizer,
        hardware,
        train_ds,
        eval_ds,
        "distill",
        quiet,
        trainer_class=DistillTrainer,
        teacher=teacher,
        options=options,
        vocab=vocab,
    )
    return train_and_save(trainer, config, tokenizer, template, stats, eval_ds is not None, quiet)
