"""Named datasets: lmforge's `datasets.yaml` and LLaMA-Factory's `dataset_info.json`, read as-is.

A name in `data.path` / `data.datasets[].path` is looked up in the registry of `data.dataset_dir`
first, then taken as a local file or folder, then as a hub dataset id. Registry files resolve
inside `data.dataset_dir`; a `file_name` that escapes it is refused.

`datasets.yaml` entries use lmforge's own keys (those of `DatasetSource` minus `weight`):

    my_chat:
      path: chat/train.jsonl
      format: sharegpt
      tags: {role_tag: role, content_tag: content, user_tag: user, assistant_tag: assistant}

`dataset_info.json` entries use LLaMA-Factory's keys: `file_name`, `hf_hub_url`, `formatting`
(alpaca | sharegpt), `ranking`, `columns`, `tags`, `subset`, `split`, `folder`, `num_samples`.
How an alpaca entry's mapped `columns.prompt` reads is the stage's to decide, not the registry's:
the text for pre-training (LLaMA-Factory's `columns: {prompt: text}` corpora), the prompt
otherwise (`loader.normalised`).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lmforge.config.data import DatasetSource
from lmforge.config.loader import strict_yaml
from lmforge.data.files import DataError, DuplicateKey, inside, unique_keys

REGISTRY_FILES = ("datasets.yaml", "datasets.yml", "dataset_info.json")
# LLaMA-Factory keys that change nothing about how a local file is read.
_LF_IGNORED = {"file_sha1", "ranking", "folder", "load_from"}


@dataclass(frozen=True)
class ResolvedSource:
    """Where one dataset's records come from, and how to read them."""

    name: str
    source: DatasetSource  # format/columns/tags/split filled in from the registry entry
    local: Path | None  # a file or folder on disk
    hub: str | None  # a hub dataset id (when not local)
    root: Path  # the folder its images resolve inside


def registry_path(dataset_dir: str | Path) -> Path | None:
    for name in REGISTRY_FILES:
        candidate = Path(dataset_dir) / name
        if candidate.is_file():
            return candidate
    return None


def load_registry(path: Path) -> dict[str, dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
        entries = (
            json.loads(text, object_pairs_hook=unique_keys) if path.suffix == ".json" else strict_yaml(text)
        )
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError, DuplicateKey) as exc:
        raise DataError(f"{path}: cannot be parsed ({exc})") from None
    if not isinstance(entries, dict):
        raise DataError(f"{path}: expected a mapping of dataset name -> entry")
    for name, entry in entries.items():
        if not isinstance(name, str):
            raise DataError(f"{path}: dataset name {name!r} must be a string (quote it in YAML)")
        if not isinstance(entry, dict) or not all(isinstance(key, str) for key in entry):
            raise DataError(f"{path}: dataset `{name}` must be a mapping of option -> value")
        for key in ("columns", "tags"):
            if entry.get(key) is not None and not isinstance(entry[key], dict):
                raise DataError(f"{path}: dataset `{name}`: `{key}` must be a mapping")
    return entries


def _from_llamafactory(name: str, entry: dict[str, Any], path: Path) -> dict[str, Any]:
    """A dataset_info.json entry as DatasetSource fields."""
    where = f"{path}: dataset `{name}`"
    unknown = set(entry) - _LF_IGNORED - {
        "file_name", "hf_hub_url", "formatting", "columns", "tags", "subset", "split", "num_samples",
        "ms_hub_url", "om_hub_url", "script_url",
    }  # fmt: skip
    if unknown:
        raise DataError(f"{where}: unknown keys {sorted(unknown)}")
    if entry.get("folder") and "file_name" not in entry:
        raise DataError(
            f"{where}: `folder` (a hub sub-folder) is not supported; download it and set file_name"
        )
    for remote in ("ms_hub_url", "om_hub_url", "script_url"):
        if remote in entry and "file_name" not in entry and "hf_hub_url" not in entry:
            raise DataError(
                f"{where}: `{remote}` sources are not supported; download the data and set file_name"
            )
    fields: dict[str, Any] = {"path": entry.get("file_name") or entry.get("hf_hub_url") or ""}
    if not fields["path"]:
        raise DataError(f"{where}: needs `file_name` (a file in {path.parent}) or `hf_hub_url`")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise DataError(f"{where}: formatting `{formatting}` is not alpaca or sharegpt")
    fields["format"] = formatting
    columns = dict(entry.get("columns") or {})
    if formatting == "sharegpt":
        columns.setdefault("messages", "conversations")
    fields["columns"] = columns
    if "tags" in entry:
        fields["tags"] = entry["tags"]
    for key in ("subset", "split"):
        if entry.get(key) is not None:
            fields[key] = entry[key]
    if entry.get("num_samples") is not None:
        fields["max_samples"] = entry["num_samples"]  # the first N (LLaMA-Factory samples N at random)
    return fields


def _entry_source(name: str, entry: dict[str, Any], path: Path, given: DatasetSource) -> DatasetSource:
    fields = _from_llamafactory(name, entry, path) if path.suffix == ".json" else dict(entry)
    # What the config says about this use of the dataset wins over the registry's defaults.
    fields["weight"] = given.weight
    if given.max_samples is not None:
        fields["max_samples"] = given.max_samples
    if given.format != "auto":
        fields["format"] = given.format
    try:
        return DatasetSource(**fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise DataError(f"{path}: dataset `{name}`: {problems}") from None


def _is_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not Path(text).suffix and not text.startswith((".", "/"))


def resolve(source: DatasetSource, dataset_dir: str | Path) -> ResolvedSource:
    """Registry name -> local path -> hub id, in that order; a clear error when none fits."""
    dataset_dir = Path(dataset_dir)
    registry = registry_path(dataset_dir)
    entries = load_registry(registry) if registry else {}
    if source.path in entries:
        assert registry is not None
        resolved = _entry_source(source.path, entries[source.path], registry, source)
        where = f"{registry}: dataset `{source.path}`"
        entry = entries[source.path]
        if registry.suffix == ".json":
            from_hub = "file_name" not in entry
        else:
            from_hub = _is_hub_id(resolved.path) and not (dataset_dir / resolved.path).exists()
        if not from_hub:
            local = inside(dataset_dir, resolved.path, "file", where)
            if not local.exists():
                raise DataError(f"{where}: file {local} does not exist")
            return ResolvedSource(source.path, resolved, local, None, dataset_dir.resolve())
        return ResolvedSource(source.path, resolved, None, resolved.path, dataset_dir.resolve())
    local = Path(source.path)
    if local.exists():
        root = local if local.is_dir() else local.parent
        return ResolvedSource(source.path, source, local, None, root.resolve())
    if _is_hub_id(source.path):
        return ResolvedSource(source.path, source, None, source.path, dataset_dir.resolve())
    hint = ""
    close = difflib.get_close_matches(source.path, list(entries), n=1)
    if close:
        hint = f"; did you mean the registered dataset `{close[0]}`?"
    elif entries:
        hint = f"; registered datasets in {registry}: {', '.join(sorted(entries)[:10])}"
    else:
        hint = f"; no registry ({' / '.join(REGISTRY_FILES)}) in data.dataset_dir={dataset_dir}"
    raise DataError(
        f"dataset `{source.path}` is not a file or folder (relative paths start at the directory you "
        f"run lmforge from), not a registered name and not a hub id{hint}"
    )
