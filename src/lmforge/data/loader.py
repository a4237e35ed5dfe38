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
from lmforge.data.formats import Example, detect_format, problems, to_example
from lmforge.data.registry import ResolvedSource, resolve
from lmforge.data.templates import THINK_BLOCK

STAGE_NEEDS = {"sft": "sft", "pretrain": "text", "dpo": "preference", "kto": "kto", "grpo": "prompt"}


@dataclass
class LoadedData:
    train: list[Example]
    eval: list[Example] = field(default_factory=list)
    read: dict[str, int] = field(default_factory=dict)  # examples read per dataset name


def read_source(resolved: ResolvedSource) -> Iterator[Example]:
    """Normalised examples of one dataset, lazily, capped at its max_samples."""
    source = resolved.source
    if resolved.local is not None:
        records = iter_records(resolved.local)
    else:
        assert resolved.hub is not None
        records = iter_hub(resolved.hub, source.split, source.subset)
    fmt = source.format
    for index, (where, record) in enumerate(records):
        if source.max_samples is not None and index >= source.max_samples:
            return
        if fmt == "auto":
            fmt = detect_format(record, where, source.columns)
        yield to_example(record, where, fmt, source.columns, source.tags, resolved.root)


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


def _factories(data: DataConfig) -> tuple[list[Callable[[], Iterator[Example]]], list[str], list[float]]:
    resolved = [resolve(source, data.dataset_dir) for source in data.sources()]
    factories = [lambda r=r: read_source(r) for r in resolved]
    return factories, [r.name for r in resolved], [r.source.weight for r in resolved]


def iter_examples(data: DataConfig) -> Iterator[Example]:
    """The mixed, prepared training examples, lazily (for streaming)."""
    factories, _, weights = _factories(data)
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


def load_examples(data: DataConfig, needs: str) -> LoadedData:
    """Every training (and evaluation) example, checked for a stage that needs `needs` examples."""
    factories, names, weights = _factories(data)
    read: dict[str, int] = {}
    lists: list[list[Example]] = []
    for name, factory in zip(names, factories, strict=True):
        examples = list(factory())
        if not examples:
            raise DataError(f"dataset `{name}` has no records")
        read[name] = len(examples)
        lists.append(examples)
    rng = random.Random(data.seed)
    train = [
        prepare(example, data, rng)
        for example in mix([lambda e=e: iter(e) for e in lists], weights, data.mix, data.seed)
    ]
    check_examples(train, needs, "training")
    evaluation: list[Example] = []
    if data.eval_path:
        evaluation = load_eval(data, needs)
    elif data.val_size > 0:
        order = list(range(len(train)))
        random.Random(data.seed).shuffle(order)
        n_eval = max(1, round(len(order) * data.val_size))
        held = set(order[:n_eval])
        evaluation = [train[i] for i in sorted(held)]
        train = [e for i, e in enumerate(train) if i not in held]
    return LoadedData(train=train, eval=evaluation, read=read)


def load_eval(data: DataConfig, needs: str) -> list[Example]:
    """The examples of data.eval_path (read like data.path, same preparation)."""
    assert data.eval_path
    source = DatasetSource(path=data.eval_path, format=data.format)
    rng = random.Random(data.seed + 1)
    evaluation = [prepare(e, data, rng) for e in read_source(resolve(source, data.dataset_dir))]
    check_examples(evaluation, needs, "evaluation")
    return evaluation


def peek(data: DataConfig, needs: str, count: int = 200) -> None:
    """Check the first `count` examples of a streamed mix before any model is loaded."""
    check_examples(list(itertools.islice(iter_examples(data), count)), needs, "training")
