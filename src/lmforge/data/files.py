"""Read raw records (dicts) from files, folders or the hub, lazily where the file type allows.

json, jsonl, csv, parquet and txt are read here with the standard library and pyarrow rather
than `datasets.load_dataset`, because a file must be read the same way whether or not a
network or a writable cache exists, and because errors must name the file and line. Hub
datasets go through `datasets.load_dataset` (it owns downloads and caching).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
REGISTRY_NAMES = ("dataset_info.json",)  # registries are not data, even inside a data folder


class DataError(ValueError):
    """A data file or record cannot be used; the message names the file and record."""


def inside(root: Path, relative: str, what: str, where: str) -> Path:
    """`relative` resolved inside `root`; a path escaping it (`..`, absolute, symlink) is refused."""
    if relative.strip() in ("", "."):
        raise DataError(f"{where}: {what} path `{relative}` is empty; give a file inside {root}")
    root = root.resolve()
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root):
        raise DataError(
            f"{where}: {what} `{relative}` resolves outside the dataset folder {root}; "
            "keep dataset files inside it and give paths relative to it"
        )
    return candidate


def data_files(path: Path) -> list[Path]:
    """The readable files of a file or folder (a folder's files sorted by name, recursively)."""
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise DataError(
                f"{path}: unsupported file type `{path.suffix}`; use one of {', '.join(SUFFIXES)}"
            )
        return [path]
    root = path.resolve()
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUFFIXES
        and p.name not in REGISTRY_NAMES
        and p.resolve().is_relative_to(root)  # a symlink out of the folder is not followed
    )
    if not files:
        raise DataError(f"{path}: the folder holds no {', '.join(SUFFIXES)} files")
    return files


class DuplicateKey(ValueError):
    """A JSON object that names one key twice (json keeps the last silently)."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's `object_pairs_hook` that refuses a key given twice in one object."""
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise DuplicateKey(f"key `{key}` appears twice in one record; keep one")
        record[key] = value
    return record


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8-sig") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record: Any = json.loads(line, object_pairs_hook=unique_keys)
            except json.JSONDecodeError as exc:
                record = DataError(f"{path}: line {lineno} is not valid JSON ({exc.msg}, column {exc.colno})")
            except DuplicateKey as exc:
                record = DataError(f"{path}: line {lineno}: {exc}")
            yield f"{path}: line {lineno}", record


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=unique_keys)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    except DuplicateKey as exc:
        raise DataError(f"{path}: {exc}") from None
    if isinstance(records, dict) and isinstance(records.get("data"), list):
        records = records["data"]  # {"data": [...]} as some exports write it
    if not isinstance(records, list):
        raise DataError(
            f"{path}: expected a JSON list of records, got {type(records).__name__}; "
            "use .jsonl for one record per line"
        )
    for index, record in enumerate(records):
        yield f"{path}: record {index}", record


def _csv_error(path: Path, what: str, exc: csv.Error) -> DataError:
    if "unexpected end of data" in str(exc):
        return DataError(
            f'{path}: {what} opens a quoted cell (") that never closes, so the rest of the file would be '
            'one cell; close the quote, or write a quote inside a quoted cell as two ("")'
        )
    return DataError(
        f"{path}: {what} cannot be parsed as CSV ({exc}); put a cell holding a comma, quote or line "
        'break in quotes ("..."), with each quote inside it doubled ("")'
    )


def _iter_csv(path: Path) -> Iterator[tuple[str, Any]]:
    csv.field_size_limit(2**31 - 1)  # long documents are normal in training data
    with path.open(encoding="utf-8-sig", newline="") as handle:
        # strict: a quote that never closes is an error, not one cell swallowing the rest of the file
        reader = csv.DictReader(handle, strict=True)
        try:
            if reader.fieldnames is None:  # reading the header row: none in an empty file
                return
        except csv.Error as exc:
            raise _csv_error(path, "the header row (line 1)", exc) from None
        index = 0
        while True:
            line = reader.line_num + 1  # where the next row starts (a quoted cell may span lines)
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise _csv_error(path, f"row {index + 2} (line {line})", exc) from None
            index += 1
            if None in row:
                yield "", DataError(f"{path}: row {index + 1} has more cells than the header has columns")
                continue
            yield f"{path}: row {index + 1}", {key: _cell(key, value) for key, value in row.items()}


# CSV cells that may hold JSON structure (message lists, history pairs, image lists).
STRUCTURED = {
    "history",
    "messages",
    "conversations",
    "images",
    "image",
    "chosen",
    "rejected",
    "prompt",
    "completion",
}


def _cell(key: str, value: str | None) -> Any:
    """A CSV cell: text, except JSON message lists / objects / image lists in structural columns.

    Everything else stays text, so an answer like `true` or `[1, 2]` is not turned into a value.
    """
    if value is None or key not in STRUCTURED or value.strip()[:1] not in ("[", "{"):
        return value
    try:
        decoded = json.loads(value)
    except json.JSONDecodeError:
        return value
    if isinstance(decoded, dict):
        return decoded
    if isinstance(decoded, list) and all(isinstance(item, dict | list) for item in decoded):
        return decoded
    if key in ("images", "image") and isinstance(decoded, list) and all(isinstance(i, str) for i in decoded):
        return decoded
    return value


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid for a corrupt file
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    index = 0
    try:
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield f"{path}: row {index}", row
                index += 1
    except Exception as exc:  # pyarrow's own errors for a damaged page or an unreadable type
        raise DataError(f"{path}: row {index} cannot be read ({exc})") from None


def _iter_txt(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8-sig") as handle:
        for lineno, line in enumerate(handle, start=1):
            if line.strip():
                yield f"{path}: line {lineno}", {"text": line.rstrip("\n")}


READERS = {
    ".jsonl": _iter_jsonl,
    ".json": _iter_json,
    ".csv": _iter_csv,
    ".parquet": _iter_parquet,
    ".txt": _iter_txt,
}


def iter_file(path: Path, keep_going: bool = False) -> Iterator[tuple[str, dict[str, Any] | DataError]]:
    """(where, record) for every record of one file; `where` names the file and line/record.

    A record that cannot be parsed raises its DataError, or with `keep_going` is yielded as
    (where, DataError) so a checker can count it and read on.
    """
    try:
        for where, record in READERS[path.suffix.lower()](path):
            if not isinstance(record, dict | DataError):
                record = DataError(f"{where} is a {type(record).__name__}, expected an object")
            if isinstance(record, DataError) and not keep_going:
                raise record
            yield where, record
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def iter_records(path: Path, keep_going: bool = False) -> Iterator[tuple[str, dict[str, Any] | DataError]]:
    for file in data_files(path):
        yield from iter_file(file, keep_going)


def iter_hub(name: str, split: str, subset: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Records of a hub dataset, streamed; a clear error when it cannot be reached."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, subset, split=split, streaming=True)
        for index, record in enumerate(dataset):
            yield f"{name} ({split}): record {index}", dict(record)
    except (OSError, ValueError, ConnectionError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(
            f"`{name}` is not a local file or folder, and loading it from the hub failed ({exc}); "
            "check the name, your network, or download it and give the local path"
        ) from None


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a file or folder (eager), for small files and tests."""
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"data file {path} does not exist (check data.path; relative paths start at the "
            "directory you run lmforge from)"
        )
    records = [record for _, record in iter_records(path)]
    if not records:
        raise DataError(f"{path}: no records")
    return records
