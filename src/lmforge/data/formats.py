"""Read training records from disk and normalise them into `Conversation`s.

Formats: alpaca (`instruction`, `input`, `output`, optional `system`, `history`),
chat `messages` (`role`/`content`, OpenAI style) and plain `text` for pre-training.
Every problem is reported as a `DataError` naming the file, the record and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.data.templates import Conversation


class DataError(ValueError):
    """A data file or record cannot be used; the message names the file and record."""


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records from a .json file (a list of objects) or a .jsonl file (one object per line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"data file {path} does not exist (check data.path; relative paths start at the "
            "directory you run lmforge from)"
        )
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}: line {lineno} is not valid JSON ({exc.msg}, column {exc.colno})"
                ) from None
    elif suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
            ) from None
        if not isinstance(records, list):
            raise DataError(
                f"{path}: expected a JSON list of records, got {type(records).__name__}; "
                "use .jsonl for one record per line"
            )
    elif suffix == ".txt":
        records = [{"text": line} for line in text.splitlines() if line.strip()]
    else:
        raise DataError(f"{path}: unsupported file type `{suffix}`; use .json, .jsonl or .txt")
    if not records:
        raise DataError(f"{path}: no records")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {index} is a {type(record).__name__}, expected an object")
    return records


def detect_format(record: dict[str, Any], path: str | Path) -> str:
    if "messages" in record:
        return "messages"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    raise DataError(
        f"{path}: record 0 has keys {sorted(record)}; cannot tell its format. Expected "
        "`instruction`/`output` (alpaca), `messages` (chat) or `text` (pre-training); "
        "or set data.format"
    )


def _require_str(record: dict[str, Any], key: str, where: str, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        found = "missing" if key not in record else f"a {type(value).__name__}"
        raise DataError(f"{where}: `{key}` is {found}, expected a string")
    return value


def alpaca_to_conversation(record: dict[str, Any], where: str) -> Conversation:
    instruction = _require_str(record, "instruction", where)
    extra = _require_str(record, "input", where, optional=True)
    output = _require_str(record, "output", where)
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: `system` must be a string")
    turns: list[tuple[str, str]] = []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError(f"{where}: `history` must be a list of [user, assistant] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{where}: history[{i}] must be a [user, assistant] pair of strings")
        turns.append((pair[0], pair[1]))
    prompt = f"{instruction}\n{extra}" if extra else instruction
    turns.append((prompt, output))
    return Conversation(turns=turns, system=system or None)


def messages_to_conversation(record: dict[str, Any], where: str) -> Conversation:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
    system = None
    turns: list[tuple[str, str]] = []
    pending_user: str | None = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: messages[{i}] must be an object with `role` and `content`")
        role, content = message["role"], message["content"]
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{i}].content must be a string")
        if role == "system":
            if i != 0:
                raise DataError(f"{where}: messages[{i}] is a system message; only the first may be")
            system = content
        elif role == "user":
            if pending_user is not None:
                raise DataError(
                    f"{where}: messages[{i}] is a second user message in a row; "
                    "user and assistant must alternate"
                )
            pending_user = content
        elif role == "assistant":
            if pending_user is None:
                raise DataError(
                    f"{where}: messages[{i}] is an assistant message with no user message before it"
                )
            turns.append((pending_user, content))
            pending_user = None
        else:
            raise DataError(f"{where}: messages[{i}] has role `{role}`; expected system, user or assistant")
    if pending_user is not None:
        raise DataError(
            f"{where}: the last message is from the user; a training record must end "
            "with the assistant's answer"
        )
    return Conversation(turns=turns, system=system)


def load_conversations(
    path: str | Path, data_format: str = "auto", max_samples: int | None = None
) -> list[Conversation]:
    """Read and validate every record of an instruction/chat file."""
    records = read_records(path)
    if max_samples is not None:
        records = records[:max_samples]
    fmt = detect_format(records[0], path) if data_format == "auto" else data_format
    if fmt == "text":
        raise DataError(
            f"{path}: records are plain `text`; supervised fine-tuning needs "
            "instruction/output or messages records (use method.name: pretrain for text)"
        )
    convert = alpaca_to_conversation if fmt == "alpaca" else messages_to_conversation
    return [convert(record, f"{path}: record {i}") for i, record in enumerate(records)]


def load_texts(path: str | Path, max_samples: int | None = None) -> list[str]:
    """Plain texts for pre-training: `text` fields of json/jsonl records, or .txt lines."""
    records = read_records(path)
    if max_samples is not None:
        records = records[:max_samples]
    return [_require_str(record, "text", f"{path}: record {i}") for i, record in enumerate(records)]
