"""`lmforge wizard`: the questions a run needs, asked one at a time, written as a pipeline YAML.

Every answer is checked at once by the config models `lmforge run` itself uses (ArchSpec, the
optimizer's options section, AdapterConfig, MethodConfig, RewardSpec, DataConfig, TrainConfig):
a bad answer prints the model's reason and the question comes again. The pipeline parser has
the last word: the whole file goes through `parse_pipeline` before anything is written, so what
the wizard writes always loads. Files are written atomically and never overwritten unasked.

The questions are plain functions of a `Prompter`; the command wires it to the terminal, the
tests to scripted stdin.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, get_args

import typer
import yaml
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape

from lmforge.artifacts import write_atomic
from lmforge.config.adapter import PRESETS, AdapterConfig
from lmforge.config.base import closest
from lmforge.config.data import DataConfig, DatasetSource, Format
from lmforge.config.loader import ConfigError
from lmforge.config.method import DEFAULT_BETA, ONLINE, PREFERENCE, MethodConfig
from lmforge.config.optim import CUDA_ONLY, OPTIMIZER_ARGS, optimizer_args
from lmforge.config.rl import BUILTIN_REWARDS, RewardSpec
from lmforge.config.train import TrainConfig
from lmforge.lab.spec import ACTIVATIONS, NORMS, POSITIONS, ArchSpec
from lmforge.pipeline.spec import PipelineSpec, parse_pipeline

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

OPTIMIZERS = ("adamw", "adafactor", "lion", "sophia", "muon", "sgd", *CUDA_ONLY)
SCHEDULERS = ("cosine", "linear", "polynomial", "none")
ALIGNMENTS = ("none", *(m for m in PREFERENCE if m != "reward"), *ONLINE)  # reward trains a scorer
ADAMW_FAMILY = ("adamw", "adamw_torch", "adamw_torch_fused")
# Peak AdamW learning rates that usually work for what a stage trains; the other optimizers'
# suggestions are scaled from these.
ADAMW_LR = {"pretrain": 1e-3, "lora": 3e-4, "full": 3e-5, "preference": 5e-5, "online": 1e-5}
# Lion's sign update is larger per coordinate (its paper: 3-10x smaller lr); Sophia clips each
# coordinate's step to lr; torch's Adafactor scales its step by each weight's RMS (~0.02 at init),
# so it needs a ~10x larger lr; SGD is only a starting point on transformers.
LR_SCALE = {"lion": 1 / 3, "sophia": 0.5, "adafactor": 10.0, "sgd": 10.0}
MUON_ORIGINAL_SCALE = 20.0  # adjust_lr_fn original: Muon's own lr, ~0.02 where AdamW's is 1e-3
# Lion wants a larger weight decay for its smaller lr (lr x wd about the same as AdamW's).
WEIGHT_DECAY_SCALE = {"lion": 3.0}
# What method.beta means for each method (MethodConfig's description, split per method).
BETA_MEANS = {
    "dpo": "strength of the pull to the reference",
    "kto": "strength of the pull to the reference",
    "orpo": "weight lambda of the odds-ratio term",
    "simpo": "reward scale",
}
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow")


class Prompter:
    """The wizard's terminal: questions through typer's prompts (the default in brackets, Enter
    takes it), messages through rich. Tests drive it with scripted stdin."""

    def __init__(self, console: Console | None = None) -> None:
        # soft_wrap: a reason is one line however narrow the terminal (and greppable in tests)
        self.console = console or Console(soft_wrap=True, highlight=False)

    def ask(self, question: str, default: str | None = None) -> str:
        return typer.prompt(question, default=default, show_default=bool(default))

    def confirm(self, question: str, default: bool) -> bool:
        return typer.confirm(question, default=default)

    def section(self, title: str) -> None:
        self.console.print(f"\n[bold]{escape(title)}[/]")

    def say(self, message: str) -> None:
        self.console.print(escape(message))

    def reject(self, reason: str) -> None:
        self.console.print(f"[red]invalid:[/] {escape(reason)}")


# --- answers: parsing and checking -------------------------------------------------------------


def ask(p: Prompter, question: str, default: Any, parse: Callable[[str], T]) -> T:
    """Ask until `parse` accepts the answer; a rejected answer prints parse's reason first."""
    while True:
        raw = p.ask(question, None if default is None else shown(default))
        try:
            return parse(raw.strip())
        except ValueError as exc:
            p.reject(str(exc))


def shown(value: Any) -> str:
    """A value as the user would type it back."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ", ".join(shown(v) for v in value)
    return "none" if value is None else str(value)


def number(value: float) -> int | float:
    """1.0 -> 1 (YAML reads `epochs: 1` better than `1.0`)."""
    return int(value) if float(value).is_integer() else value


def as_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"`{text}` is not a whole number") from None


def as_positive_int(text: str) -> int:
    value = as_int(text)
    if value <= 0:
        raise ValueError(f"{value} must be more than 0")
    return value


def as_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"`{text}` is not a number (e.g. 0.1 or 3e-4)") from None


def one_of(options: Sequence[str], shown_options: Sequence[str] | None = None) -> Callable[[str], str]:
    """A parser accepting one of `options` (case-insensitive), with a did-you-mean."""

    def parse(text: str) -> str:
        value = text.lower()
        if value in options:
            return value
        hint = closest(value, list(options))
        did_you_mean = f" — did you mean `{hint}`?" if hint else ""
        listed = ", ".join(shown_options or options)
        raise ValueError(f"`{text}` is not one of {listed}{did_you_mean}")

    return parse


def reason(exc: ValidationError, prefix: str = "") -> str:
    """pydantic's first error as one line naming the key: `train.lr: Input should be greater than 0`."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    key = ".".join(part for part in (prefix, where) if part)
    message = error["msg"].removeprefix("Value error, ")
    return f"{key}: {message}" if key else message


def validated(model: type[M], data: dict[str, Any], prefix: str) -> M:
    """`data` through the config section `model`; a ValueError with its reason when it fails."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValueError(reason(exc, prefix)) from None


def local_or_hub(what: str, data: bool = False) -> Callable[[str], str]:
    """A parser for a path that must exist, or a hub id (`owner/name`) taken as it is."""

    def parse(text: str) -> str:
        if not text:
            raise ValueError(f"give a {what} or a hub id")
        path = Path(text).expanduser()
        if path.exists():
            return str(path)
        # a name ending like a data file is a missing file, not a hub dataset
        file_like = data and text.lower().endswith(DATA_SUFFIXES)
        if HUB_ID.fullmatch(text) and not file_like and ".." not in text:
            return text
        raise ValueError(f"{text} does not exist: a local {what} must exist (a hub id looks like owner/name)")

    return parse


def note_hub(p: Prompter, value: str) -> None:
    if not Path(value).exists():
        p.say(f"  {value} is not a local path: taken as a hub id")


# --- step 1: the starting point ----------------------------------------------------------------


def ask_start(p: Prompter) -> bool:
    """True: a new model designed in the lab and pre-trained; False: fine-tune an existing one."""
    p.section("1. Starting point")
    p.say("  a) design and pre-train a new model in the lab")
    p.say("  b) fine-tune an existing model (local folder or hub id)")
    return ask(p, "Start from", "a", one_of(("a", "b"))) == "a"


def ask_base_model(p: Prompter) -> str:
    model = ask(p, "Base model (local folder or hub id)", None, local_or_hub("model folder"))
    note_hub(p, model)
    return model


# --- step 2: the architecture and the pre-training data ----------------------------------------

# Stand-ins for what is not asked yet, chosen so that no rule between fields fires on them: one
# head divides any d_model, alibi has no parity or YaRN rule, any original context fits below 2^30.
ARCH_NEUTRAL: dict[str, Any] = {
    "tokenizer": "-",
    "n_heads": 1,
    "position": "alibi",
    "max_position_embeddings": 1 << 30,
}


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"yarn.factor": 4} -> {"yarn": {"factor": 4}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if rest:
            out.setdefault(head, {})[rest] = value
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class ArchQuestion:
    key: str  # ArchSpec key, `yarn.factor` inside the yarn section
    question: str
    parse: Callable[[str], Any]


class ArchAnswers:
    """The architecture answers so far, checked by ArchSpec after each one.

    A rule between fields (d_model divisible by n_heads, ...) is checked with the answers given so
    far and neutral stand-ins for the rest; when it fails, every earlier answer its reason names is
    asked again (its answer the default) along with the one just given, so either can change.
    """

    def __init__(self, p: Prompter) -> None:
        self.p = p
        self.values: dict[str, Any] = {}
        self.questions: dict[str, ArchQuestion] = {}

    def ask(self, question: ArchQuestion, default: Any) -> Any:
        self.questions[question.key] = question
        self.values[question.key] = self._ask_one(question, default)
        self._settle(question.key)
        return self.values[question.key]

    def spec(self) -> dict[str, Any]:
        return nest(self.values)

    def _candidate(self, values: dict[str, Any]) -> dict[str, Any]:
        candidate = {**ARCH_NEUTRAL, **nest(values)}
        if candidate["position"] == "yarn":  # its section comes after the question
            candidate["yarn"] = {"original_max_position_embeddings": 1, **candidate.get("yarn", {})}
        return candidate

    def _ask_one(self, question: ArchQuestion, default: Any) -> Any:
        parts = question.key.split(".")

        def parse(text: str) -> Any:
            value = question.parse(text)
            try:  # the field's own constraints (gt=0, ...); rules between fields come after
                ArchSpec.model_validate(self._candidate({question.key: value}))
            except ValidationError as exc:
                for error in exc.errors():
                    if [str(x) for x in error["loc"][: len(parts)]] == parts:
                        raise ValueError(
                            f"{question.key}: {error['msg'].removeprefix('Value error, ')}"
                        ) from None
            return value

        return ask(self.p, question.question, default, parse)

    def problem(self) -> str | None:
        try:
            ArchSpec.model_validate(self._candidate(self.values))
        except ValidationError as exc:
            return reason(exc)
        return None

    def _settle(self, key: str) -> None:
        problem = self.problem()
        while problem:
            self.p.reject(problem)
            named = {k for k in self.values if re.search(rf"(?<![\w.]){re.escape(k)}(?!\w)", problem)}
            again = [k for k in self.values if (k in named or k == key) and k in self.questions]
            self.p.say(f"  asking again: {', '.join(again)}")
            for k in again:
                self.values[k] = self._ask_one(self.questions[k], self.values[k])
            problem = self.problem()


def ask_architecture(p: Prompter) -> dict[str, Any]:
    """A lab architecture (ArchSpec keys, without `name`), valid as a whole."""
    p.section("2. Architecture (a decoder built by lmforge lab)")
    arch = ArchAnswers(p)
    tokenizer = arch.ask(
        ArchQuestion("tokenizer", "Tokenizer (folder or hub id)", local_or_hub("tokenizer folder")), None
    )
    note_hub(p, tokenizer)
    arch.ask(ArchQuestion("d_model", "d_model (hidden size)", as_int), 256)
    arch.ask(ArchQuestion("n_layers", "n_layers (transformer blocks)", as_int), 4)
    n_heads = arch.ask(ArchQuestion("n_heads", "n_heads (query heads)", as_int), 4)
    kinds = ("multi-head", "grouped-query", "multi-query")
    kind = ask(p, f"Attention ({', '.join(kinds)})", "multi-head", one_of(kinds))
    if kind == "grouped-query":
        question = ArchQuestion("n_kv_heads", "n_kv_heads (key/value heads, a divisor of n_heads)", as_int)
        arch.ask(question, max(1, n_heads // 2))
    elif kind == "multi-query":
        arch.questions["n_kv_heads"] = ArchQuestion("n_kv_heads", "n_kv_heads", as_int)
        arch.values["n_kv_heads"] = 1
    position = arch.ask(
        ArchQuestion("position", f"Position encoding ({', '.join(POSITIONS)})", one_of(POSITIONS)), "rope"
    )
    default_context = 2048
    if position == "yarn":
        factor = arch.ask(ArchQuestion("yarn.factor", "YaRN factor (new context / original)", as_float), 4.0)
        original = arch.ask(
            ArchQuestion("yarn.original_max_position_embeddings", "YaRN original context (tokens)", as_int),
            512,
        )
        default_context = int(factor * original)
    arch.ask(ArchQuestion("norm", f"Norm ({', '.join(NORMS)})", one_of(NORMS)), "rmsnorm")
    arch.ask(
        ArchQuestion("activation", f"Activation ({', '.join(ACTIVATIONS)})", one_of(ACTIVATIONS)), "swiglu"
    )
    arch.values["tie_embeddings"] = p.confirm("Tie the input embedding and the output head?", default=True)
    arch.ask(ArchQuestion("dropout", "Dropout", as_float), 0.0)
    arch.ask(
        ArchQuestion("max_position_embeddings", "max_position_embeddings (longest context)", as_int),
        default_context,
    )
    raw = arch.spec()
    spec = ArchSpec.model_validate(raw)
    p.say(
        f"  {spec.d_model} wide, {spec.n_layers} layers, {spec.n_heads} heads of {spec.head_dim} "
        f"({spec.attention_kind}, {spec.kv_heads} key/value heads), feed-forward {spec.ff_width}, "
        f"{spec.position}, {spec.norm}, {spec.activation}"
    )
    return raw


@dataclass
class Pretraining:
    data: dict[str, Any]
    document_boundaries: bool
    steps: int
    batch_size: int


def ask_pretraining_data(p: Prompter, max_position: int) -> Pretraining:
    p.section("Pre-training data (plain text)")
    paths: list[str] = []
    while True:
        path = ask(
            p,
            f"Text dataset {len(paths) + 1} (file, folder or hub id)",
            None,
            local_or_hub("data file or folder", data=True),
        )
        note_hub(p, path)
        paths.append(path)
        if not p.confirm("Add another dataset to the mix?", default=False):
            break
    data: dict[str, Any]
    if len(paths) == 1:
        data = {"path": paths[0]}
    else:
        sources = []
        for index, path in enumerate(paths):
            weight = ask(
                p,
                f"Relative weight of {path}",
                1.0,
                lambda text, path=path, index=index: (
                    validated(
                        DatasetSource, {"path": path, "weight": as_float(text)}, f"data.datasets[{index}]"
                    ).weight
                ),
            )
            sources.append({"path": path, "weight": number(weight)})
        data = {"datasets": sources}

    def block(text: str) -> int:
        value = validated(DataConfig, {"max_length": as_int(text)}, "data").max_length
        if value > max_position:
            raise ValueError(
                f"data.max_length {value} is longer than the model's max_position_embeddings "
                f"{max_position}: use at most {max_position}"
            )
        return value

    data["max_length"] = ask(p, "Block size in tokens (data.max_length)", min(512, max_position), block)
    boundaries = p.confirm(
        "Keep documents apart inside a block (attention restarts at each document)?", default=True
    )
    steps = ask(p, "Pre-training steps", 1000, as_positive_int)
    batch = ask(p, "Batch size (blocks per step)", 16, as_positive_int)
    return Pretraining(data, boundaries, steps, batch)


# --- step 3: the optimizer -----------------------------------------------------------------------


@dataclass
class Optimizer:
    """How every training stage optimises (each stage asks its own learning rate)."""

    name: str
    args: dict[str, Any]
    weight_decay: float
    scheduler: str
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    scheduler_power: float = 1.0

    def train(self, lr: float, **length: Any) -> dict[str, Any]:
        """A stage's `train:` section."""
        section: dict[str, Any] = Block({**length, "lr": lr, "optimizer": self.name})
        if self.args:
            section["optimizer_args"] = self.args
        section["weight_decay"] = self.weight_decay
        section["scheduler"] = self.scheduler
        if self.scheduler_power != 1.0:
            section["scheduler_power"] = self.scheduler_power
        if self.min_lr_ratio:
            section["min_lr_ratio"] = self.min_lr_ratio
        if self.warmup_steps:
            section["warmup_steps"] = self.warmup_steps
        return section

    def for_stage(self, kind: str) -> tuple[Optimizer, str | None]:
        """The optimizer a stage can use, and why it differs when it must."""
        if self.name == "sophia" and kind not in ("sft", "pretrain"):
            why = f"sophia estimates its Hessian from the language-model loss: {kind} uses adamw"
        elif kind == "ppo" and self.name not in ADAMW_FAMILY:
            why = f"ppo's own loop steps policy and critic with AdamW: it uses adamw, not {self.name}"
        else:
            return self, None
        return replace(self, name="adamw", args={}), why


def suggest_lr(optimizer: Optimizer, what: str) -> float:
    """A starting learning rate for `optimizer` on a stage that trains `what` (see ADAMW_LR)."""
    lr = ADAMW_LR[what]
    if optimizer.name == "muon" and optimizer.args.get("adjust_lr_fn") == "original":
        lr *= MUON_ORIGINAL_SCALE
    else:
        lr *= LR_SCALE.get(optimizer.name, 1.0)
    return float(f"{lr:.2g}")


def parse_option(text: str, default: Any) -> Any:
    """An optimizer option typed as the user would: `0.9, 0.98` (or [0.9, 0.98]), 1e-8, none."""
    if text.lower() in ("none", "null"):
        return None
    if isinstance(default, tuple):
        return [part for part in re.split(r"[\s,]+", text.strip("[]() ")) if part]
    value = yaml.safe_load(text)
    return text if isinstance(value, dict | list) else value


def with_stand_in(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """`args` checkable before the stages exist: Muon's original scaling needs the AdamW part's lr,
    which is asked with each stage's lr, so a stand-in fills it for the check."""
    if name == "muon" and args.get("adjust_lr_fn") == "original" and args.get("adamw_lr") is None:
        return {**args, "adamw_lr": 1e-3}
    return args


def ask_optimizer(p: Prompter, first: str) -> Optimizer:
    """The optimizer, its own options (checked by `optimizer_args`) and the schedule. `first` is
    what the first training stage trains (pretrain or lora), for the defaults."""
    p.section("3. Optimizer")
    listed = [f"{name} (CUDA only)" if name in CUDA_ONLY else name for name in OPTIMIZERS]
    name = ask(p, f"Optimizer ({', '.join(listed)})", "adamw", one_of(list(OPTIMIZER_ARGS), listed))
    if name in CUDA_ONLY:
        p.say(f"  {name} keeps bitsandbytes 8-bit states: it needs a CUDA GPU")
    options = OPTIMIZER_ARGS[name]
    if options.__doc__:
        p.say("  " + " ".join(options.__doc__.split()))
    args: dict[str, Any] = {}
    for key, info in options.model_fields.items():
        default = info.get_default(call_default_factory=True)
        if name == "muon" and key == "adamw_lr" and args.get("adjust_lr_fn") == "original":
            p.say("  adamw_lr: asked with each stage's learning rate")
            continue
        question = f"  {key}: {info.description}"

        def parse(text: str, key: str = key, default: Any = default) -> Any:
            candidate = {**args, key: parse_option(text, default)}
            return getattr(optimizer_args(name, with_stand_in(name, candidate)), key)

        if isinstance(default, bool):
            value = confirm_option(p, question, default, lambda value, key=key: {**args, key: value}, name)
        else:
            value = ask(p, question, default, _clean(parse))
        if value is not None:
            args[key] = list(value) if isinstance(value, tuple) else value
    optimizer_args(name, with_stand_in(name, args))  # the whole set (e.g. nesterov needs momentum > 0)

    pretraining = first == "pretrain"
    weight_decay = ask(
        p,
        "Weight decay (every training stage)",
        (0.1 if pretraining else 0.0) * WEIGHT_DECAY_SCALE.get(name, 1.0),
        lambda text: validated(TrainConfig, {"weight_decay": as_float(text)}, "train").weight_decay,
    )
    scheduler = ask(p, f"Learning-rate schedule ({', '.join(SCHEDULERS)})", "cosine", one_of(SCHEDULERS))
    optimizer = Optimizer(name, args, weight_decay, scheduler)
    optimizer.warmup_steps = ask(
        p,
        "Warmup steps (0: 3% of each stage's steps)",
        0,
        lambda text: validated(TrainConfig, {"warmup_steps": as_int(text)}, "train").warmup_steps,
    )
    if scheduler == "polynomial":
        optimizer.scheduler_power = ask(
            p,
            "Polynomial decay power (1 = linear)",
            1.0,
            lambda text: (
                validated(
                    TrainConfig, {"scheduler": scheduler, "scheduler_power": as_float(text)}, "train"
                ).scheduler_power
            ),
        )
    if scheduler in ("cosine", "polynomial"):
        optimizer.min_lr_ratio = ask(
            p,
            "Decay to lr x this at the end (min_lr_ratio)",
            0.1 if pretraining else 0.0,
            lambda text: (
                validated(
                    TrainConfig, {"scheduler": scheduler, "min_lr_ratio": as_float(text)}, "train"
                ).min_lr_ratio
            ),
        )
    return optimizer


def confirm_option(
    p: Prompter, question: str, default: bool, options: Callable[[bool], dict[str, Any]], name: str
) -> bool:
    """A yes/no optimizer option, asked until optimizer_args accepts it (sgd: nesterov needs momentum)."""
    while True:
        value = p.confirm(question, default=default)
        try:
            optimizer_args(name, with_stand_in(name, options(value)))
            return value
        except ValueError as exc:
            p.reject(str(exc).replace("Value error, ", ""))


def _clean(parse: Callable[[str], T]) -> Callable[[str], T]:
    """optimizer_args' reasons without pydantic's `Value error, ` prefix."""

    def wrapped(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise ValueError(str(exc).replace("Value error, ", "")) from None

    return wrapped


def ask_lr(p: Prompter, optimizer: Optimizer, what: str, stage: str) -> tuple[float, Optimizer]:
    """A stage's learning rate (suggested for the optimizer and what the stage trains), and the
    optimizer as this stage uses it (Muon's original scaling: the AdamW part's lr per stage)."""

    def check(text: str) -> float:
        return validated(TrainConfig, {"lr": as_float(text)}, "train").lr

    original = optimizer.name == "muon" and optimizer.args.get("adjust_lr_fn") == "original"
    note = " (Muon's own, ~0.02-scale with adjust_lr_fn original)" if original else ""
    lr = ask(p, f"{stage} learning rate{note}", suggest_lr(optimizer, what), check)
    if not original:
        return lr, optimizer
    # original scaling puts Muon's lr near 0.02: far too high for embeddings, head and norms
    adamw_lr = ask(p, f"{stage} lr of the AdamW part (embeddings, head, norms)", ADAMW_LR[what], check)
    return lr, replace(optimizer, args={**optimizer.args, "adamw_lr": adamw_lr})


# --- step 4: supervised fine-tuning --------------------------------------------------------------


def ask_lora(p: Prompter, stage: str) -> dict[str, Any]:
    """A LoRA `adapter:` section, each answer checked by AdapterConfig."""
    adapter: dict[str, Any] = {"method": "lora"}

    def check(key: str, value: Any) -> Any:
        return getattr(validated(AdapterConfig, {**adapter, key: value}, "adapter"), key)

    # the preset alone (custom's module list is the next question, checked with it)
    adapter["preset"] = ask(
        p, f"{stage} LoRA preset: which modules ({', '.join(PRESETS)})", "all", one_of(PRESETS)
    )
    if adapter["preset"] == "custom":
        adapter["target_modules"] = ask(
            p,
            "Module names (comma-separated, e.g. q_proj, v_proj)",
            None,
            lambda text: check("target_modules", [m for m in re.split(r"[\s,]+", text) if m]),
        )
    adapter["r"] = ask(p, f"{stage} LoRA r (rank)", 16, lambda text: check("r", as_int(text)))
    alpha = ask(
        p, f"{stage} LoRA alpha (scale = alpha / r)", 2 * adapter["r"], lambda t: check("alpha", as_float(t))
    )
    adapter["alpha"] = number(alpha)
    adapter["dropout"] = ask(p, f"{stage} LoRA dropout", 0.05, lambda text: check("dropout", as_float(text)))
    return adapter


def template_names() -> tuple[list[str], list[str]]:
    """(every accepted template name, the ones to show): the project's registered chat templates."""
    from lmforge.data.templates import TEMPLATES  # imports transformers: only when asked

    canonical = sorted({t.name for t in TEMPLATES.values()})
    return ["auto", "tokenizer", *TEMPLATES], ["auto", "tokenizer", *canonical]


@dataclass
class Sft:
    body: dict[str, Any]  # the stage's sections
    adapter: dict[str, Any] | None
    quantized: bool
    template: str
    max_length: int
    description: str


def ask_data_path(p: Prompter, stage: str, what: str) -> str:
    path = ask(
        p, f"{stage} data: {what} (file, folder or hub id)", None, local_or_hub("data file or folder", True)
    )
    note_hub(p, path)
    return path


def ask_sft(p: Prompter, optimizer: Optimizer, lab: bool, max_position: int | None) -> Sft:
    p.section("4. Supervised fine-tuning (SFT)")
    path = ask_data_path(p, "SFT", "instruction or chat records")
    formats = [f for f in get_args(Format) if f != "text"]  # SFT refuses plain text
    data_format = ask(p, f"Record format ({', '.join(formats)})", "auto", one_of(formats))
    accepted, listed = template_names()
    template = ask(
        p,
        f"Chat template ({', '.join(listed)})",
        "chatml" if lab else "auto",  # a new model has no chat template of its own to find
        one_of(accepted, listed),
    )

    def length(text: str) -> int:
        value = validated(DataConfig, {"max_length": as_int(text)}, "data").max_length
        if max_position is not None and value > max_position:
            raise ValueError(
                f"data.max_length {value} is longer than the model's max_position_embeddings {max_position}"
            )
        return value

    max_length = ask(p, "Tokens per example (data.max_length)", min(1024, max_position or 1024), length)
    adapter = (
        ask_lora(p, "SFT") if p.confirm("Train a LoRA adapter (no: every weight trains)?", True) else None
    )
    quantized = False
    if adapter is not None and not lab:
        quantized = p.confirm("QLoRA: load the base in 4-bit (bitsandbytes, CUDA)?", default=False)
    lr, stage_optimizer = ask_lr(p, optimizer, "lora" if adapter else "full", "SFT")
    epochs = ask(
        p, "SFT epochs", 1.0, lambda text: validated(TrainConfig, {"epochs": as_float(text)}, "train").epochs
    )
    batch = ask(p, "SFT batch size", 4, as_positive_int)
    data: dict[str, Any] = {"path": path}
    if data_format != "auto":
        data["format"] = data_format
    data.update(template=template, max_length=max_length)
    body: dict[str, Any] = {"adapter": adapter or {"method": "none"}, "data": data}
    body["train"] = stage_optimizer.train(lr, epochs=number(epochs), batch_size=batch)
    kind = ("QLoRA" if quantized else "LoRA") if adapter else "full"
    what = f"preset {adapter['preset']}, r {adapter['r']}" if adapter else "every weight"
    description = f"{kind} SFT ({what}) on {path}, template {template}, lr {lr:g}"
    return Sft(body, adapter, quantized, template, max_length, description)


# --- step 5: alignment ---------------------------------------------------------------------------


def ask_rewards(p: Prompter) -> list[dict[str, Any]]:
    """Built-in rewards, each with its own options, checked by RewardSpec."""

    def names(text: str) -> list[str]:
        chosen = [n for n in re.split(r"[\s,]+", text) if n]
        if not chosen:
            raise ValueError(f"name at least one reward ({', '.join(BUILTIN_REWARDS)})")
        for name in chosen:
            one_of(BUILTIN_REWARDS)(name)
        if len(set(chosen)) != len(chosen):
            raise ValueError("a reward is named twice; give each once")
        return chosen

    chosen = ask(
        p, f"Rewards, comma-separated ({', '.join(BUILTIN_REWARDS)})", "exact_answer, think_format", names
    )
    rewards = []
    for index, name in enumerate(chosen):
        spec: dict[str, Any] = {"builtin": name}
        where = f"method.rewards[{index}]"

        def check(key: str, value: Any, spec: dict[str, Any] = spec, where: str = where) -> Any:
            return getattr(validated(RewardSpec, {**spec, key: value}, where), key)

        if name == "exact_answer":
            spec["field"] = ask(
                p,
                "  exact_answer: record field with the reference answer",
                "answer",
                lambda text: check("field", text),
            )
        elif name == "regex":
            spec["pattern"] = ask(
                p, "  regex: pattern to find in the completion", None, lambda text: check("pattern", text)
            )
        elif name == "length":
            spec["target_tokens"] = ask(
                p,
                "  length: tokens before the penalty starts",
                256,
                lambda text: check("target_tokens", as_int(text)),
            )
        weight = ask(p, f"  weight of {name}", 1.0, lambda text: check("weight", as_float(text)))
        spec["weight"] = number(weight)
        validated(RewardSpec, spec, where)
        rewards.append(spec)
    return rewards


def ask_method_options(p: Prompter, kind: str) -> dict[str, Any]:
    """The alignment method's main options, each checked by MethodConfig."""
    options: dict[str, Any] = {}

    def with_option(key: str, value: Any) -> dict[str, Any]:
        head, _, rest = key.partition(".")
        return {**options, head: {**options.get(head, {}), rest: value} if rest else value}

    def option(key: str, question: str, default: Any, parse: Callable[[str], Any]) -> None:
        def check(text: str) -> Any:
            parsed: Any = validated(MethodConfig, {"name": kind, **with_option(key, parse(text))}, "method")
            for part in key.split("."):
                parsed = getattr(parsed, part)
            return parsed

        options.update(with_option(key, ask(p, question, default, check)))

    if kind in DEFAULT_BETA:
        option("beta", f"{kind} beta ({BETA_MEANS[kind]})", DEFAULT_BETA[kind], as_float)
    if kind == "dpo":
        losses = get_args(MethodConfig.model_fields["loss_type"].annotation)
        option("loss_type", f"DPO loss ({', '.join(losses)})", "sigmoid", one_of(losses))
    if kind == "simpo":
        option("gamma", "SimPO target reward margin (gamma)", 0.5, as_float)
    if kind in ONLINE:
        options["rewards"] = ask_rewards(p)
        if kind == "grpo":

            def group(text: str) -> int:
                value = as_int(text)
                if value < 2:  # methods/grpo.py refuses it before loading anything
                    raise ValueError("grpo compares completions within a group: num_generations >= 2")
                return value

            option("sampling.num_generations", "Completions per prompt (the GRPO group)", 8, group)
            option("grpo.beta", "KL penalty to the reference (0: no reference model)", 0.0, as_float)
        else:
            option("ppo.kl_coef", "Per-token KL penalty (ppo.kl_coef)", 0.05, as_float)
        option("sampling.max_completion_length", "Most new tokens per completion", 256, as_int)
    validated(MethodConfig, {"name": kind, **options}, "method")
    return options


def ask_alignment(p: Prompter, optimizer: Optimizer, sft: Sft) -> tuple[str, dict[str, Any], str] | None:
    """The alignment stage after SFT (kind, body, description), or None."""
    p.section("5. Alignment")
    kind = ask(p, f"Alignment after SFT ({', '.join(ALIGNMENTS)})", "none", one_of(ALIGNMENTS))
    if kind == "none":
        return None
    method = ask_method_options(p, kind)
    records = (
        "prompts (with the reference answer)"
        if kind in ONLINE
        else (
            "good/bad answers (prompt, completion, label)"
            if kind == "kto"
            else "preference pairs (prompt, chosen, rejected)"
        )
    )
    path = ask_data_path(p, kind.upper(), records)
    if sft.adapter is not None:
        adapter = dict(sft.adapter)  # the same method: the pipeline continues the SFT adapter
        p.say(f"  {kind} continues the SFT LoRA adapter")
    else:
        p.say(f"  {kind} trains an adapter (post-training never trains every weight): its LoRA settings")
        adapter = ask_lora(p, kind.upper())
    stage_optimizer, why = optimizer.for_stage(kind)
    if why:
        p.say(f"  {why}")
    lr, stage_optimizer = ask_lr(
        p, stage_optimizer, "online" if kind in ONLINE else "preference", kind.upper()
    )
    epochs = ask(
        p,
        f"{kind.upper()} epochs",
        1.0,
        lambda text: validated(TrainConfig, {"epochs": as_float(text)}, "train").epochs,
    )
    group = method.get("sampling", {}).get("num_generations", 8) if kind == "grpo" else 1

    def batch_size(text: str) -> int:
        value = as_positive_int(text)
        if kind == "grpo" and value % group:  # methods/grpo.py: a prompt's group fits in one step
            raise ValueError(
                f"train.batch_size {value} is not a multiple of num_generations {group}: each prompt's "
                "group of completions must fit in one step"
            )
        if kind == "kto" and value < 2:  # methods/kto.py: its KL estimate pairs examples in a batch
            raise ValueError(
                "kto needs train.batch_size >= 2: its KL estimate pairs each example with another"
            )
        return value

    batch = ask(p, f"{kind.upper()} batch size", group if kind == "grpo" else 4, batch_size)
    body = {
        "method": method,
        "adapter": adapter,
        "data": {"path": path, "template": sft.template, "max_length": sft.max_length},
        "train": stage_optimizer.train(lr, epochs=number(epochs), batch_size=batch),
    }
    how = "continuing the SFT adapter" if sft.adapter is not None else "a new LoRA adapter"
    return kind, body, f"{kind.upper()} on {path}, {how}, lr {lr:g}"


# --- step 6: output --------------------------------------------------------------------------------


def _probe(name: str, output_dir: str) -> tuple[str, str]:
    """Check a pipeline name and output folder with the parser itself (it owns the rules: a plain
    folder name; never the current folder, home or above)."""
    stage = {"name": "probe", "kind": "sft", "model": {"name_or_path": "probe"}, "data": {"path": "probe"}}
    try:
        parse_pipeline({"name": name, "output_dir": output_dir, "stages": [stage]}, "pipeline")
    except ConfigError as exc:
        raise ValueError(str(exc).removeprefix("pipeline: ")) from None
    return name, output_dir


def ask_yaml_path(p: Prompter, question: str, default: Path, taken: Path | None = None) -> Path:
    """A .yaml path to write; an existing file only when the user says to overwrite it."""

    def parse(text: str) -> Path:
        path = Path(text).expanduser()
        if path.suffix not in (".yaml", ".yml"):
            raise ValueError(f"{text}: give a .yaml file name")
        if path.is_dir():
            raise ValueError(f"{text} is a folder: give a .yaml file name")
        if taken is not None and path.resolve() == taken.resolve():
            raise ValueError(f"{text} is the pipeline file: give the architecture its own file")
        return path

    while True:
        path = ask(p, question, str(default), parse)
        if not path.exists() or p.confirm(f"{path} exists: overwrite it?", default=False):
            return path
        default = free_name(path)


def free_name(path: Path) -> Path:
    """`name-2.yaml`, `name-3.yaml`, ...: the first that does not exist."""
    stem = re.sub(r"-\d+$", "", path.stem)
    index = 2
    while (candidate := path.with_name(f"{stem}-{index}{path.suffix}")).exists():
        index += 1
    return candidate


def default_name(model: str | None) -> str:
    """The pipeline name offered: the model's folder or hub name, when the parser accepts it."""
    if model is None:
        return "lab-model"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model).name).strip("-.")
    try:
        return _probe(name, f"runs/pipelines/{name}")[0]
    except ValueError:
        return "finetune"


# --- the whole wizard ----------------------------------------------------------------------------


@dataclass
class Written:
    pipeline: Path
    arch: Path | None
    spec: PipelineSpec
    descriptions: list[tuple[str, str]] = field(default_factory=list)


def run_wizard(p: Prompter, out: Path) -> Written:
    """Ask everything, check the pipeline with the project's parser, write the file(s)."""
    p.say("Answer each question; Enter takes the value in [brackets]. Ctrl-C stops, writing nothing.")
    lab = ask_start(p)
    stages: list[dict[str, Any]] = []
    descriptions: list[tuple[str, str]] = []
    shared: dict[str, Any] = {}
    arch: dict[str, Any] | None = None
    model = None
    max_position = None
    if lab:
        arch = ask_architecture(p)
        max_position = arch["max_position_embeddings"]
        pretraining = ask_pretraining_data(p, max_position)
    else:
        p.section("2. The model to fine-tune")
        model = ask_base_model(p)
    optimizer = ask_optimizer(p, "pretrain" if lab else "lora")
    arch_placeholder = "<arch>"  # the architecture file's path, known after step 6
    if lab:
        lr, stage_optimizer = ask_lr(p, optimizer, "pretrain", "Pre-training")
        stages.append(
            {
                "name": "pretrain",
                "kind": "pretrain",
                "method": {"document_boundaries": pretraining.document_boundaries},
                "model": {"arch": arch_placeholder},
                "adapter": {"method": "none"},
                "data": pretraining.data,
                "train": stage_optimizer.train(
                    lr, max_steps=pretraining.steps, batch_size=pretraining.batch_size
                ),
            }
        )
        descriptions.append(
            ("pretrain", f"pre-train the lab model ({optimizer.name}, lr {lr:g}, {pretraining.steps} steps)")
        )
    sft = None
    if not lab or p.confirm("Fine-tune it with SFT after pre-training?", default=True):
        sft = ask_sft(p, optimizer, lab, max_position)
        if lab:
            stages.append({"name": "sft", "kind": "sft", "from": "pretrain", **sft.body})
        else:
            stages.append({"name": "sft", "kind": "sft", **sft.body})
            shared["model"] = {"name_or_path": model}
            if sft.quantized:  # shared: a stage continuing the adapter loads the base the same way
                shared["model"]["quantization"] = "4bit"
        descriptions.append(("sft", sft.description))
    last_adapter = "sft" if sft is not None and sft.adapter is not None else None
    if sft is not None:
        alignment = ask_alignment(p, optimizer, sft)
        if alignment is not None:
            kind, body, description = alignment
            stages.append({"name": kind, "kind": kind, "from": "sft", **body})
            descriptions.append((kind, description))
            last_adapter = kind
    if last_adapter is not None and p.confirm(
        f"Merge the {last_adapter} adapter into its 16-bit base at the end (a merge stage)?", default=True
    ):
        stages.append({"name": "merged", "kind": "merge", "from": last_adapter})
        descriptions.append(("merged", f"the {last_adapter} adapter merged into its 16-bit base"))

    p.section("6. Output")
    name = ask(
        p, "Pipeline name", default_name(model), lambda text: _probe(text, f"runs/pipelines/{text}")[0]
    )
    output_dir = ask(
        p, "Output folder for the runs", f"runs/pipelines/{name}", lambda text: _probe(name, text)[1]
    )
    pipeline_path = ask_yaml_path(p, "Write the pipeline to", out)
    arch_path = None
    if lab:
        arch_path = ask_yaml_path(
            p,
            "Write the architecture to",
            pipeline_path.with_name(f"{pipeline_path.stem}_arch.yaml"),
            pipeline_path,
        )
        stages[0]["model"]["arch"] = str(arch_path)
        descriptions[0] = (
            "pretrain",
            descriptions[0][1].replace("the lab model", f"the lab model of {arch_path}"),
        )

    raw: dict[str, Any] = {"name": name, "output_dir": output_dir}
    if shared:
        raw["shared"] = shared
    raw["stages"] = stages
    text = render(raw, pipeline_header(pipeline_path, output_dir, descriptions, optimizer, sft))
    # what is written is exactly what was checked: the rendered text, read back
    spec = parse_pipeline(yaml.safe_load(text), str(pipeline_path))
    files = [(pipeline_path, text)]
    if arch is not None and arch_path is not None:
        arch_text = render({"name": name, **arch}, arch_header(arch_path, pipeline_path), inline_leaves=False)
        try:
            ArchSpec.model_validate(yaml.safe_load(arch_text))
        except ValidationError as exc:
            raise ConfigError(f"{arch_path}: {reason(exc)}") from None
        files.insert(0, (arch_path, arch_text))  # first: the pipeline refers to it
    for path, content in files:
        write_atomic(path, content)
    written = Written(pipeline_path, arch_path, spec, descriptions)
    summary(p, written)
    return written


class Block(dict):
    """A mapping always written one key per line (a stage's `train:`, however short)."""


class _Dumper(yaml.SafeDumper):
    """Writes a value shared by several stages (the optimizer's args) in full each time: an
    `&id001` anchor would be correct YAML but unreadable to whoever edits the file."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(
    Block, lambda dumper, data: dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=False)
)


def render(raw: dict[str, Any], header: list[str], inline_leaves: bool = True) -> str:
    """YAML with a header comment; with `inline_leaves`, mappings and lists of plain values are
    written inline (`adapter: {method: lora, r: 8}`), as in the shipped examples."""
    body = yaml.dump(
        raw,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=None if inline_leaves else False,
        allow_unicode=True,
        width=110,
    )
    return "".join(f"# {line}".rstrip() + "\n" for line in header) + body


def pipeline_header(
    path: Path, output_dir: str, descriptions: list[tuple[str, str]], optimizer: Optimizer, sft: Sft | None
) -> list[str]:
    width = max(len(name) for name, _ in descriptions)
    lines = [f"lmforge run {path}", "", "Written by `lmforge wizard`; `--dry-run` prints the plan first."]
    lines += [f"  {name.ljust(width)}  {what}" for name, what in descriptions]
    if optimizer.name in CUDA_ONLY or (sft is not None and sft.quantized):
        lines.append("Needs a CUDA GPU (bitsandbytes: 8-bit optimizer states or a 4-bit base).")
    lines.append(
        f"Paths are relative to the folder this is run from; every stage writes to {output_dir}/STAGE."
    )
    return lines


def arch_header(path: Path, pipeline: Path) -> list[str]:
    return [
        f"lmforge lab info {path}",
        "",
        f"Written by `lmforge wizard`; pre-trained by {pipeline} (`lmforge run {pipeline}`).",
    ]


def summary(p: Prompter, written: Written) -> None:
    p.section("Summary")
    files = f"{written.pipeline}" + (f" and {written.arch}" if written.arch else "")
    p.say(f"Wrote {files}. Stages of {written.spec.name} (runs in {written.spec.output_dir}):")
    width = max(len(name) for name, _ in written.descriptions)
    for name, what in written.descriptions:
        p.say(f"  {name.ljust(width)}  {what}")
    p.say(f"Run it: lmforge run {written.pipeline}   (add --dry-run to see the plan first)")
