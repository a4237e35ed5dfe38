"""Tokenized training data kept on disk (`data.cache`), so a rerun of the same config starts
training in seconds instead of reading and tokenizing every record again.

The key covers everything that decides the rows: the whole `data:` section, each local data
file's path, size and modification time, the tokenizer (its full serialised form, special
tokens and chat template), the chat template lmforge writes with, and the source of lmforge's
data package (a change to how records are read or tokenized is a new key). Data read from a
hub id is not cached here (the hub's own cache holds the files; their revision is not known
here). An entry is written to a temporary folder and renamed into place, so a half-written
entry is never read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from functools import cache
from pathlib import Path

from datasets import Dataset, load_from_disk
from transformers import PreTrainedTokenizerBase

from lmforge.config.data import DataConfig, DatasetSource
from lmforge.data.loader import load_examples
from lmforge.data.registry import resolve
from lmforge.data.templates import AnyTemplate
from lmforge.data.tokenize import TokenizeStats, tokenize_examples, workers

CACHE_ENV = "LMFORGE_CACHE_DIR"
Prepared = tuple[Dataset, Dataset | None, TokenizeStats]


def cache_root(data: DataConfig) -> Path:
    """data.cache_dir, else $LMFORGE_CACHE_DIR, else ~/.cache/lmforge; entries go in `tokenized/`."""
    root = data.cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lmforge"
    return Path(root) / "tokenized"


def _files(data: DataConfig) -> list[list] | None:
    """(path, size, mtime) of every local file the data reads; None when a source is on the hub."""
    sources = data.sources() + ([DatasetSource(path=data.eval_path)] if data.eval_path else [])
    listed = []
    for source in sources:
        resolved = resolve(source, data.dataset_dir)
        if resolved.local is None:
            return None
        local = resolved.local
        paths = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
        for path in paths:
            status = path.stat()
            listed.append([str(path.resolve()), status.st_size, status.st_mtime_ns])
    return listed


@cache
def _code() -> str:
    """A digest of lmforge's data package source: how records are read, rendered and tokenized."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _tokenizer(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    template = getattr(tokenizer, "chat_template", None)
    extra = [type(tokenizer).__name__, tokenizer.special_tokens_map, template]
    return hashlib.sha256((body + json.dumps(extra, sort_keys=True, default=str)).encode()).hexdigest()


def cache_key(
    data: DataConfig, stage: str, tokenizer: PreTrainedTokenizerBase, template: AnyTemplate
) -> str | None:
    """The entry name for this data, or None when it cannot be cached (a hub source, data.cache off)."""
    if not data.cache or data.streaming:
        return None
    files = _files(data)
    if files is None:
        return None
    settings = data.model_dump(mode="json", exclude={"num_proc", "cache", "cache_dir"})
    try:
        jinja = template.jinja(tokenizer)
    except ValueError:
        jinja = ""
    described = [stage, settings, files, _tokenizer(tokenizer), template.name, jinja, _code()]
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:24]


def load(root: Path, key: str) -> Prepared | None:
    entry = root / key
    if not (entry / "stats.json").is_file():
        return None
    stats = TokenizeStats(**json.loads((entry / "stats.json").read_text()))
    evaluation = load_from_disk(str(entry / "eval")) if (entry / "eval").is_dir() else None
    return load_from_disk(str(entry / "train")), evaluation, stats


def save(root: Path, key: str, prepared: Prepared) -> None:
    """Write an entry beside its place and rename it in; an entry another process wrote first wins."""
    train, evaluation, stats = prepared
    entry = root / key
    temporary = root / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    train.save_to_disk(str(temporary / "train"))
    if evaluation is not None:
        evaluation.save_to_disk(str(temporary / "eval"))
    (temporary / "stats.json").write_text(json.dumps(dataclasses.asdict(stats)))  # last: marks it whole
    try:
        temporary.rename(entry)
    except OSError:  # written meanwhile by another process of the same run
        shutil.rmtree(temporary, ignore_errors=True)


def prepared_data(
    data: DataConfig,
    stage: str,
    tokenizer: PreTrainedTokenizerBase,
    template: AnyTemplate,
    build: Callable[[], Prepared],
) -> tuple[Prepared, Path | None]:
    """(train rows, eval rows, stats) from the cache, or built by `build` and cached; and the
    entry's folder when it came from the cache."""
    key = cache_key(data, stage, tokenizer, template)
    if key is None:
        return build(), None
    root = cache_root(data)
    found = load(root, key)
    if found is not None:
        return found, root / key
    prepared = build()
    root.mkdir(parents=True, exist_ok=True)
    save(root, key, prepared)
    return prepared, None


def sft_rows(
    data: DataConfig, template: AnyTemplate, tokenizer: PreTrainedTokenizerBase
) -> tuple[Prepared, Path | None]:
    """SFT's training and evaluation rows (SFT and distillation), tokenized over data.num_proc
    workers, from the cache when it holds them; and the cache entry they came from, if so."""

    def build() -> Prepared:
        examples = load_examples(data, "sft")
        job = (template, tokenizer, data.max_length, data.train_on, workers(data.num_proc))
        train, stats = tokenize_examples(examples.train, *job)
        return train, tokenize_examples(examples.eval, *job)[0] if examples.eval else None, stats

    return prepared_data(data, "sft", tokenizer, template, build)
