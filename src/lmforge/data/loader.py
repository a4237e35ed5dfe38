"""From the `data:` config to examples: resolve, read, normalise, check, cap, mix, split.

Mixing is a small seeded generator over per-dataset iterators rather than
`datasets.interleave_datasets`, because one function then serves both eager lists and
streamed files with the same semantics (interleave_under stops when the first dataset runs
out; interleave_over restarts a finished dataset until every one has been seen in full).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from lmforge.config.data import DataConfig, DatasetSource
from lmforge.data.files import DataError, iter_hub, iter_records
from lmforge.data.formats import Example, detect_format, problems, prompt_as_text, to_example
from lmforge.data.registry import ResolvedSource, resolve
from lmforge.data.templates import THINK_BLOCK

STAGE_NEEDS = {
    "sft": "sft",
    "pretrain": "text",
    "dpo": "preference",
    "orpo": "preference",
    "simpo": "preference",
    "reward": "preference",
    "kto": "kto",
    "grpo": "prompt",
    "ppo": "prompt",
    "distill": "sft",
    "mlm": "text",
    "classify": "classify",
}


@dataclass
class LoadedData:
    train: list[Example]
    eval: list[Example] = field(default_factory=list)
    read: dict[str, int] = field(default_factory=dict)  # examples read per dataset name


def normalised(
    resolved: ResolvedSource, needs: str | None = None, keep_going: bool = False
) -> Iterator[tuple[str, Example | DataError]]:
    """(where, example) for one dataset, lazily, capped at its max_samples.

    `needs` is what the stage reads: for `text` (pre-training, masked LM) an alpaca record with a
    mapped `columns.prompt` is that column's text, as LLaMA-Factory's pre-training entries
    (`columns: {prompt: text}`) mean it; for any other stage the same record is a prompt.
    A record that cannot be parsed or normalised raises its DataError, or with `keep_going` is
    yielded in the example's place, so `lmforge data check` can count it and read on.
    """
    source = resolved.source
    if resolved.local is not None:
        records = iter_records(resolved.local, keep_going)
    else:
        assert resolved.hub is not None
        records = iter_hub(resolved.hub, source.split, source.subset)
    fmt = source.format
    for where, record in itertools.islice(records, source.max_samples):
        try:
            if isinstance(record, DataError):
                raise record
            if fmt == "auto":
                fmt = detect_format(record, where, source.columns)
            if needs == "text" and fmt == "alpaca" and source.columns.prompt is not None:
                yield where, prompt_as_text(record, source.columns, where)
            else:
                yield where, to_example(record, where, fmt, source.columns, source.tags, resolved.root)
        except DataError as exc:
            if not keep_going:
                raise
            yield where, exc


def read_source(resolved: ResolvedSource, needs: str | None = None) -> Iterator[Example]:
    """Normalised examples of one dataset as a stage reading `needs` sees them, lazily."""
    for _, example in normalised(resolved, needs):
        assert isinstance(example, Example)  # without keep_going, bad records raise
        yield example


def prepare(example: Example, data: DataConfig, rng: random.Random) -> Example:
    """Apply data.system, data.reasoning and data.prompt_templates to one example."""
    if example.kind == "text":
        return example
    turns = example.turns
    rejected = example.rejected
    if data.reasoning == "drop":
        turns = tuple((user, THINK_BLOCK.sub("", answer)) for user, answer in turns)
        rejected = THINK_BLOCK.sub("", rejected) if rejected is not None else None
    if data.prompt_templates:
        phrasing = rng.choice(data.prompt_templates)
        turns = tuple((phrasing.replace("{prompt}", user), answer) for user, answer in turns)
    system = example.system if example.system is not None else data.system
    return replace(example, turns=turns, rejected=rejected, system=system)


def mix(
    factories: list[Callable[[], Iterator[Example]]], weights: list[float], strategy: str, seed: int
) -> Iterator[Example]:
    """Examples drawn from several datasets by relative weight (see the module docstring)."""
    if len(factories) == 1:
        yield from factories[0]()
        return
    if strategy == "auto":
        strategy = "concat" if len(set(weights)) == 1 else "interleave_under"
    if strategy == "concat":
        for factory in factories:
            yield from factory()
        return
    rng = random.Random(seed)
    iterators = [factory() for factory in factories]
    finished = [False] * len(factories)
    choices = list(range(len(factories)))
    while True:
        i = rng.choices(choices, weights=weights)[0]
        try:
            yield next(iterators[i])
        except StopIteration:
            if strategy == "interleave_under":
                return
            finished[i] = True
            if all(finished):
                return
            iterators[i] = factories[i]()
            try:
                yield next(iterators[i])
            except StopIteration:
                raise DataError(f"dataset {i} of data.datasets is empty") from None


def _factories(
    data: DataConfig, needs: str | None
) -> tuple[list[Callable[[], Iterator[Example]]], list[str], list[float]]:
    resolved = [resolve(source, data.dataset_dir) for source in data.sources()]
    factories = [lambda r=r: read_source(r, needs) for r in resolved]
    return factories, [r.name for r in resolved], [r.source.weight for r in resolved]


def iter_examples(data: DataConfig, needs: str | None = None) -> Iterator[Example]:
    """The mixed, prepared training examples for a stage reading `needs`, lazily (for streaming)."""
    factories, _, weights = _factories(data, needs)
    rng = random.Random(data.seed)
    for example in mix(factories, weights, data.mix, data.seed):
        yield prepare(example, data, rng)


def check_examples(examples: list[Example], needs: str, what: str) -> None:
    """Refuse unusable examples with one message naming up to five of them."""
    bad = [(example.where, problem) for example in examples for _, problem in problems(example, needs)]
    if not bad:
        return
    shown = "\n".join(f"  {where} {problem}" for where, problem in bad[:5])
    more = f"\n  … and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise DataError(
        f"{len(bad)} problem(s) in the {what} data; fix or remove these records "
        f"(`lmforge data check` lists them all):\n{shown}{more}"
    )


def split_off(
    examples: list[Example], fraction: float, seed: int, name: str
) -> tuple[list[Example], list[Example]]:
    """(train, held out): a seeded random `fraction` of one dataset, at least one example each."""
    if len(examples) < 2:
        raise DataError(f"dataset `{name}` has {len(examples)} record(s); data.val_size needs at least 2")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[: min(len(order) - 1, max(1, round(len(order) * fraction)))])
    return (
        [e for i, e in enumerate(examples) if i not in held],
        [e for i, e in enumerate(examples) if i in held],
    )


def load_examples(data: DataConfig, needs: str) -> LoadedData:
    """Every training (and evaluation) example, checked for a stage that needs `needs` examples.

    `val_size` is held out of each dataset before mixing, so an example repeated by
    `interleave_over` never lands on both sides.
    """
    factories, names, weights = _factories(data, needs)
    read: dict[str, int] = {}
    lists: list[list[Example]] = []
    held_out: list[Example] = []
    for index, (name, factory) in enumerate(zip(names, factories, strict=True)):
        examples = list(factory())
        if not examples:
            raise DataError(f"dataset `{name}` has no records")
        read[name] = len(examples)
        if data.val_size > 0 and not data.eval_path:
            examples, held = split_off(examples, data.val_size, data.seed + index, name)
            held_out += held
        lists.append(examples)
    rng = random.Random(data.seed)
    train = [
        prepare(example, data, rng)
        for example in mix([lambda e=e: iter(e) for e in lists], weights, data.mix, data.seed)
    ]
    check_examples(train, needs, "training")
    if data.eval_path:
        evaluation = load_eval(data, needs)
    else:
        evaluation = [prepare(example, data, rng) for example in held_out]
        check_examples(evaluation, needs, "evaluation")
    return LoadedData(train=train, eval=evaluation, read=read)


def load_eval(data: DataConfig, needs: str) -> list[Example]:
    """The examples of data.eval_path (read like data.path, same preparation)."""
    assert data.eval_path
    source = DatasetSource(path=data.eval_path, format=data.format)
    rng = random.Random(data.seed + 1)
    evaluation = [prepare(e, data, rng) for e in read_source(resolve(source, data.dataset_dir), needs)]
    check_examples(evaluation, needs, "evaluation")
    return evaluation


def peek(data: DataConfig, needs: str, count: int = 200) -> None:
    """Check the first `count` examples of a streamed mix before any model is loaded."""
    first = list(itertools.islice(iter_examples(data, needs), count))
    if not first:
        raise DataError("the training data has no records")
    check_examples(first, needs, "training")
