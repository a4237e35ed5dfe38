"""Normalise records of every supported layout into one `Example`.

Layouts (`data.format`):
* alpaca: `instruction`, `input`, `output`, optional `system`, `history` ([user, assistant]
  pairs), `images`; `chosen`/`rejected` instead of `output` for preference pairs, `label` or
  `kto_tag` for KTO; no `output` at all for a prompt-only record. Seq2seq pairs
  `{"source": …, "target": …}` read the same way (source = instruction, target = output).
* sharegpt: a `conversations` list of `{from, value}` messages (role names configurable through
  `tags`, LLaMA-Factory style); a `function_call` turn is the assistant's tool call (its text the
  call's JSON), an `observation` turn the tool's result; `tools` lists the functions offered.
* messages: OpenAI-style `messages` of `{role, content}`; content may be a list of parts
  (`{"type": "text", "text": …}` / `{"type": "image"}`); assistant messages may carry
  `tool_calls` and `tool` messages their results (docs/tools.md).
* prompt: TRL style `prompt` (string or messages) with `completion`, `chosen`/`rejected`, `label`,
  or nothing (prompt-only, for PPO/GRPO: the other fields become reference answers). GSM8K-style
  `question`/`answer` records read the same way: `question` is the prompt, `answer` the reference.
* text: `text` for pre-training and masked-LM training; with a `label` (a class id or name) and
  optionally a `text_pair` (or the dataset's `columns.query`) for sequence classification.
  A stage that reads text also reads an alpaca record with a mapped `columns.prompt` as text
  (`prompt_as_text`: LLaMA-Factory's pre-training entries, `columns: {prompt: text}`).

What kind of example a record is follows from its fields: text (labelled or not), preference
(chosen and rejected), kto (a boolean label), prompt (no response) or sft. Errors are `DataError`s naming
the file, record and field, raised here, before any library sees the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmforge.config.data import Columns, Tags
from lmforge.data.files import DataError, inside
from lmforge.data.templates import IMAGE_PLACEHOLDER, Conversation, ToolCall
from lmforge.data.tools import read_function_call, read_tool_calls, read_tools, tool_name

OPENAI_TAGS = Tags(
    role_tag="role", content_tag="content", user_tag="user", assistant_tag="assistant", observation_tag="tool"
)


@dataclass(frozen=True)
class Example:
    """One record, whatever its file layout.

    `turns` are (user, assistant) pairs; the last pair's assistant text is the response (the
    chosen one for a preference pair) and is "" for a prompt-only record.
    """

    turns: tuple[tuple[str, str], ...] = ()
    system: str | None = None
    rejected: str | None = None
    label: bool | None = None
    images: tuple[Path, ...] = ()
    reference: dict[str, Any] = field(default_factory=dict)
    text: str | None = None
    text_pair: str | None = None  # classification: the second text of a pair (NLI, paraphrase)
    class_label: Any = None  # classification: the record's `label` as given (see `class_label`)
    where: str = ""
    fields: tuple[str, ...] = field(default=(), compare=False)  # the record's keys, for messages
    tools: tuple[dict[str, Any], ...] = ()  # tool use: see `Conversation`
    calls: dict[int, tuple[ToolCall, ...]] = field(default_factory=dict)
    results: dict[int, tuple[str, ...]] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        if self.text is not None:
            return "text"
        if self.rejected is not None:
            return "preference"
        if self.label is not None:
            return "kto"
        if not self.turns[-1][1] and (len(self.turns) - 1) not in self.calls:
            return "prompt"
        return "sft"

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools or self.calls or self.results)

    @property
    def prompt(self) -> str:
        return self.turns[-1][0]

    @property
    def response(self) -> str:
        return self.turns[-1][1]

    def conversation(self, response: str | None = None) -> Conversation:
        """The chat; `response` replaces the last answer (e.g. the rejected one)."""
        turns = list(self.turns)
        if response is not None:
            turns[-1] = (turns[-1][0], response)
        return Conversation(
            turns=turns, system=self.system, tools=self.tools, calls=self.calls, results=self.results
        )


# --------------------------------------------------------------------------------------------------
# field access
# --------------------------------------------------------------------------------------------------


def _text(value: Any, where: str, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # CSV/parquet numbers as answers: "42"
    found = "missing" if value is None else f"a {type(value).__name__}"
    raise DataError(f"{where}: `{key}` is {found}, expected a string")


def _bool(value: Any, where: str, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise DataError(f"{where}: `{key}` is {value!r}, expected true or false (KTO desirability)")


def _column(record: dict[str, Any], *names: str | None) -> str | None:
    """The first of `names` present in the record (None when none is)."""
    for name in names:
        if name is not None and name in record:
            return name
    return None


def _images(record: dict[str, Any], key: str | None, where: str, root: Path | None) -> tuple[Path, ...]:
    if key is None or record.get(key) in (None, [], ""):
        return ()
    value = record[key]
    items = [value] if isinstance(value, str | dict) else value
    if not isinstance(items, list):
        raise DataError(f"{where}: `{key}` must be a list of image paths")
    paths = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and isinstance(item.get("path"), str):
            item = item["path"]
        if not isinstance(item, str) or not item:
            raise DataError(f"{where}: `{key}`[{i}] must be an image path (a string)")
        paths.append(inside(root, item, "image", where) if root is not None else Path(item))
    return tuple(paths)


def _message_text(content: Any, where: str) -> str:
    """A message's content: a string, or OpenAI/HF parts (text parts joined, images as <image>)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            elif isinstance(part, dict) and part.get("type") in ("image", "image_url"):
                pieces.append(IMAGE_PLACEHOLDER)
            else:
                raise DataError(f"{where}: content parts must be {{type: text, text}} or {{type: image}}")
        return "".join(pieces)
    raise DataError(f"{where}: message content must be a string or a list of parts")


def detect_tags(messages: list[Any]) -> Tags:
    first = messages[0] if messages and isinstance(messages[0], dict) else {}
    return OPENAI_TAGS if "role" in first else Tags()


class Message(tuple):
    """(role, text, calls): role is system, user, assistant or tool; calls an assistant's tool calls."""

    def __new__(cls, role: str, text: str, calls: tuple[ToolCall, ...] = ()) -> Message:
        return super().__new__(cls, (role, text, calls))


def _messages(value: Any, where: str, key: str, tags: Tags | None) -> list[Message]:
    """The messages of a list in any tag style, tool calls and results included."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: `{key}` must be a non-empty list of messages")
    tags = tags or detect_tags(value)
    roles = {
        tags.user_tag: "user",
        tags.observation_tag: "tool",
        tags.assistant_tag: "assistant",
        tags.function_tag: "function_call",
        tags.system_tag: "system",
    }
    out = []
    for i, message in enumerate(value):
        at = f"{where}: {key}[{i}]"
        calls_given = isinstance(message, dict) and message.get("tool_calls") not in (None, [])
        if (
            not isinstance(message, dict)
            or tags.role_tag not in message
            or (tags.content_tag not in message and not calls_given)
        ):
            raise DataError(
                f"{at} must be an object with `{tags.role_tag}` and `{tags.content_tag}` "
                "(set the dataset's tags if your messages use other keys)"
            )
        role = message[tags.role_tag]
        if not isinstance(role, str) or role not in roles:
            raise DataError(
                f"{at} has role `{role}`; expected one of {', '.join(map(str, roles))} "
                "(set the dataset's tags if your roles have other names)"
            )
        content = message.get(tags.content_tag)
        if roles[role] == "function_call":  # LLaMA-Factory: the turn's text is the call's JSON
            out.append(Message("assistant", "", read_function_call(content, at, tags.content_tag)))
            continue
        calls = (
            read_tool_calls(message.get("tool_calls"), at, "tool_calls") if roles[role] == "assistant" else ()
        )
        text = "" if content is None and calls else _message_text(content, at)
        out.append(Message(roles[role], text, calls))
    return out


@dataclass
class Turns:
    """A message list as turns (`Example.turns`), with the tool calls and results of each."""

    system: str | None
    turns: list[tuple[str, str]]
    calls: dict[int, tuple[ToolCall, ...]] = field(default_factory=dict)
    results: dict[int, tuple[str, ...]] = field(default_factory=dict)


def _turns(messages: list[Message], where: str, key: str) -> Turns:
    """Turns from messages: a user message, or the tool results answering the previous turn's
    calls, then the assistant's answer; a trailing user message (or results) becomes a turn with
    no answer."""
    out = Turns(None, [])
    if messages and messages[0][0] == "system":
        out.system = messages[0][1]
        messages = messages[1:]
    pending: str | None = None
    results: list[str] = []
    for i, (role, text, calls) in enumerate(messages):
        if role == "system":
            raise DataError(f"{where}: {key} has a system message after the start; only the first may be")
        if role == "tool":
            if pending is not None or not (out.turns and (len(out.turns) - 1) in out.calls):
                raise DataError(
                    f"{where}: {key} has a tool result with no tool call before it (message {i}); a "
                    "tool message follows an assistant message with `tool_calls` (or a function_call)"
                )
            results.append(text)
            if len(results) > len(out.calls[len(out.turns) - 1]):
                raise DataError(
                    f"{where}: {key} has more tool results than the calls before them (message {i})"
                )
        elif role == "user":
            if pending is not None or results:
                raise DataError(
                    f"{where}: {key} has two user messages in a row (message {i}); user and assistant "
                    "must alternate"
                )
            pending = text
        else:
            if pending is None and not results:
                what = "two assistant messages in a row" if out.turns else "an assistant message first"
                raise DataError(
                    f"{where}: {key} has {what} (message {i}); user and assistant must alternate, "
                    "starting with the user (tool results may stand for the user after a tool call)"
                )
            if results:
                out.results[len(out.turns)] = tuple(results)
            if calls:
                out.calls[len(out.turns)] = calls
            out.turns.append((pending or "", text))
            pending, results = None, []
    if results:
        out.results[len(out.turns)] = tuple(results)
    if pending is not None or results:
        out.turns.append((pending or "", ""))
    if not out.turns:
        raise DataError(f"{where}: `{key}` holds no user message")
    return out


def _response(value: Any, where: str, key: str, tags: Tags | None) -> str:
    """A response given as a string, one message object, or a list of assistant messages."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        parsed = _messages(value, where, key, tags)
        if any(role != "assistant" or calls for role, _, calls in parsed):
            raise DataError(f"{where}: `{key}` must hold only assistant messages (without tool calls)")
        return "".join(text for _, text, _ in parsed)
    return _text(value, where, key)


# --------------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------------


def class_label(value: Any) -> int | str | None:
    """A classification label as a class id (an integer >= 0) or a class name (a non-empty string;
    true/false become "true"/"false"); None when the value is neither."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # parquet/pandas integer columns with gaps arrive as floats
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def detect_format(record: dict[str, Any], where: str, columns: Columns | None = None) -> str:
    columns = columns or Columns()
    if _column(record, columns.messages, "conversations", "messages"):
        return "sharegpt"
    if _column(record, columns.prompt, "instruction") or ("source" in record and "target" in record):
        return "alpaca"
    if "prompt" in record or "question" in record or ("chosen" in record and "rejected" in record):
        return "prompt"
    if "text" in record:
        return "text"
    raise DataError(
        f"{where} has keys {sorted(record)}; cannot tell its format. Expected `instruction`/`output` "
        "(alpaca), `source`/`target` (seq2seq pairs), `conversations` (sharegpt), `messages` (chat), "
        "`prompt` with `completion`/`chosen`/`rejected` (TRL style) or `text` (pre-training; with "
        "`label` for classification); or set the format and columns"
    )


def _kto_key(record: dict[str, Any], columns: Columns) -> str | None:
    """The KTO desirability field: the mapped column or `kto_tag`; `label` only when it holds a
    boolean (a `label` such as "math" is an ordinary field, kept as a reference)."""
    key = _column(record, columns.kto_tag, "kto_tag")
    if key is None and "label" in record:
        value = record["label"]
        if isinstance(value, bool) or (isinstance(value, str) and value.strip().lower() in ("true", "false")):
            key = "label"
    return key


def _kto_label(record: dict[str, Any], key: str | None, where: str) -> bool | None:
    if key is None or record[key] is None:
        return None
    return _bool(record[key], where, key)


def _finish(
    record: dict[str, Any],
    used: set[str],
    parsed: Turns,
    columns: Columns,
    tags: Tags | None,
    where: str,
    root: Path | None,
) -> Example:
    """Common tail: chosen/rejected, KTO label, images, tools, reference fields."""
    turns, system = parsed.turns, parsed.system
    system_key = _column(record, columns.system, "system")
    if system_key is not None and record[system_key] not in (None, ""):
        system = _text(record[system_key], where, system_key)
    chosen_key = _column(record, columns.chosen, "chosen")
    rejected_key = _column(record, columns.rejected, "rejected")
    rejected = None
    if (chosen_key is None) != (rejected_key is None):
        have, missing = (chosen_key, "rejected") if chosen_key else (rejected_key, "chosen")
        raise DataError(f"{where}: has `{have}` but no `{missing}`; a preference pair needs both")
    if chosen_key is not None and rejected_key is not None:
        if turns[-1][1]:
            raise DataError(
                f"{where}: has both a response and chosen/rejected; a preference record's prompt must "
                "end with the user turn"
            )
        turns[-1] = (turns[-1][0], _response(record[chosen_key], where, chosen_key, tags))
        rejected = _response(record[rejected_key], where, rejected_key, tags)
    kto_key = _kto_key(record, columns)
    label = _kto_label(record, kto_key, where)
    image_key = _column(record, columns.images, "images", "image")
    images = _images(record, image_key, where, root)
    tools_key = _column(record, columns.tools, "tools")
    tools = read_tools(record[tools_key], where, tools_key) if tools_key else ()
    used |= {k for k in (system_key, chosen_key, rejected_key, image_key, kto_key, tools_key) if k}
    reference = {k: v for k, v in record.items() if k not in used and v is not None}
    return Example(
        turns=tuple(turns),
        system=system or None,
        rejected=rejected,
        label=label,
        images=images,
        reference=reference,
        where=where,
        tools=tools,
        calls=parsed.calls,
        results=parsed.results,
    )


def _alpaca(
    record: dict[str, Any], columns: Columns, tags: Tags | None, where: str, root: Path | None
) -> Example:
    pair = "instruction" not in record and "source" in record  # a seq2seq {source, target} pair
    prompt_key = columns.prompt or ("source" if pair else "instruction")
    query_key = columns.query or "input"
    response_key = _column(record, columns.response, "output", "response", "target")
    history_key = columns.history or "history"
    instruction = _text(record.get(prompt_key), where, prompt_key)
    extra = record.get(query_key)
    extra = _text(extra, where, query_key) if extra not in (None, "") else ""
    turns: list[tuple[str, str]] = []
    history = record.get(history_key) or []
    if not isinstance(history, list):
        raise DataError(f"{where}: `{history_key}` must be a list of [user, assistant] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{where}: {history_key}[{i}] must be a [user, assistant] pair of strings")
        turns.append((pair[0], pair[1]))
    response = ""
    if response_key is not None and record[response_key] is not None:
        response = _text(record[response_key], where, response_key)
    turns.append((f"{instruction}\n{extra}" if extra else instruction, response))
    used = {prompt_key, query_key, history_key, response_key or ""}
    return _finish(record, used, Turns(None, turns), columns, tags, where, root)


def _sharegpt(
    record: dict[str, Any], columns: Columns, tags: Tags | None, where: str, root: Path | None
) -> Example:
    key = _column(record, columns.messages, "conversations", "messages") or (
        columns.messages or "conversations"
    )
    return _finish(
        record,
        {key},
        _turns(_messages(record.get(key), where, key, tags), where, key),
        columns,
        tags,
        where,
        root,
    )


def _prompt_style(
    record: dict[str, Any], columns: Columns, tags: Tags | None, where: str, root: Path | None
) -> Example:
    prompt_key = columns.prompt or (
        "question" if "question" in record and "prompt" not in record else "prompt"
    )
    used = {prompt_key}
    if prompt_key not in record and "chosen" in record and isinstance(record["chosen"], list):
        return _implicit_prompt(record, columns, tags, where, root)
    value = record.get(prompt_key)
    if isinstance(value, list):
        parsed = _turns(_messages(value, where, prompt_key, tags), where, prompt_key)
        if parsed.turns[-1][1] or (len(parsed.turns) - 1) in parsed.calls:
            raise DataError(f"{where}: `{prompt_key}` must end with a user message (or tool results)")
    else:
        parsed = Turns(None, [(_text(value, where, prompt_key), "")])
    response_key = _column(record, columns.response, "completion", "response")
    if response_key is not None and record[response_key] is not None:
        turns = parsed.turns
        turns[-1] = (turns[-1][0], _response(record[response_key], where, response_key, tags))
        used.add(response_key)
    return _finish(record, used, parsed, columns, tags, where, root)


def _implicit_prompt(
    record: dict[str, Any], columns: Columns, tags: Tags | None, where: str, root: Path | None
) -> Example:
    """TRL's implicit-prompt preference: chosen and rejected are whole chats sharing a prefix."""
    chosen = _messages(record["chosen"], where, "chosen", tags)
    rejected = _messages(record.get("rejected"), where, "rejected", tags)
    if (
        chosen[:-1] != rejected[:-1]
        or chosen[-1][0] != "assistant"
        or rejected[-1][0] != "assistant"
        or len(chosen) < 2
        or chosen[-2][0] != "user"
    ):
        raise DataError(
            f"{where}: `chosen` and `rejected` must be the same conversation up to a user message, "
            "each ending with one assistant message (or give a separate `prompt`)"
        )
    parsed = _turns(chosen[:-1], where, "chosen")
    parsed.turns[-1] = (parsed.turns[-1][0], chosen[-1][1])
    example = _finish(
        {k: v for k, v in record.items() if k not in ("chosen", "rejected")},
        set(),
        parsed,
        columns,
        tags,
        where,
        root,
    )
    return Example(**{**example.__dict__, "rejected": rejected[-1][1]})


def _text_record(record: dict[str, Any], columns: Columns, where: str) -> Example:
    key = columns.prompt or "text"
    pair_key = columns.query or "text_pair"
    pair = record.get(pair_key)
    return Example(
        text=_text(record.get(key), where, key),
        text_pair=_text(pair, where, pair_key) if pair is not None else None,
        class_label=record.get("label"),
        where=where,
    )


def prompt_as_text(record: dict[str, Any], columns: Columns, where: str) -> Example:
    """An alpaca record with a mapped `columns.prompt`, read as pre-training text.

    LLaMA-Factory's pre-training stage (pt) trains on the user turn it builds from such a record:
    the prompt column's text, then the query column's on a new line when it holds any. Its answer
    columns are dropped there; here a mapped response, history or chosen/rejected that holds text
    is refused, so no part of a record is left out of training unnoticed.
    """
    assert columns.prompt is not None
    for field_name in ("response", "history", "chosen", "rejected"):
        key = getattr(columns, field_name)
        if key is not None and record.get(key) not in (None, "", []):
            raise DataError(
                f"{where}: `{key}` (columns.{field_name}) holds text that pre-training would not read: "
                f"it reads the `{columns.prompt}` column (columns.prompt) and columns.query as text, as "
                f"LLaMA-Factory's pt stage does; remove `{field_name}` from the dataset's columns to "
                "pre-train on the prompt text alone, or use this data with a stage that learns answers "
                "(sft, dpo, kto)"
            )
    text = _text(record.get(columns.prompt), where, columns.prompt)
    query = record.get(columns.query) if columns.query is not None else None
    if query not in (None, ""):
        query = _text(query, where, columns.query)
        text = f"{text}\n{query}" if text else query
    return Example(text=text, where=where)


CHAT_LAYOUTS = {  # records read as conversations: role tags and image paths apply
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "messages": _sharegpt,
    "prompt": _prompt_style,
}


def to_example(
    record: dict[str, Any],
    where: str,
    fmt: str,
    columns: Columns | None = None,
    tags: Tags | None = None,
    root: Path | None = None,
) -> Example:
    """Normalise one record; image paths resolve inside `root` (the dataset's folder)."""
    columns = columns or Columns()
    if fmt == "auto":
        fmt = detect_format(record, where, columns)
    if fmt == "text":
        return _text_record(record, columns, where)
    if fmt == "messages" and tags is None:
        tags = OPENAI_TAGS
    return replace(CHAT_LAYOUTS[fmt](record, columns, tags, where, root), fields=tuple(record))


# --------------------------------------------------------------------------------------------------
# semantic checks (what `lmforge data check` counts and training refuses)
# --------------------------------------------------------------------------------------------------

KIND_NEEDS = {
    "sft": "an instruction with a response (output / an assistant message)",
    "preference": "a prompt with `chosen` and `rejected` responses",
    "kto": "a prompt, one response and a boolean `label` (or `kto_tag`)",
    "prompt": "a prompt (the user turn; reference answers in other fields)",
    "text": "a `text` field",
    "classify": "a `text` field and its `label` (a class id 0, 1, … or a class name)",
}


def problems(example: Example, needs: str) -> list[tuple[str, str]]:
    """(code, message) for what makes this example unusable for a stage needing `needs` examples.

    Codes: wrong_kind, empty_response, identical_pair, empty_prompt, image_mismatch, missing_image,
    missing_label, bad_label, empty_text, tools_unsupported, unknown_tool.
    """
    found: list[tuple[str, str]] = []
    kind = example.kind
    if example.uses_tools and needs != "sft":
        return [
            (
                "tools_unsupported",
                "has tools, tool calls or tool results, which only method sft trains on so far "
                "(docs/tools.md); this stage would drop them",
            )
        ]
    offered = {tool_name(tool) for tool in example.tools}
    for turn, calls in sorted(example.calls.items()):
        for call in calls:
            if example.tools and call.name not in offered:
                found.append(
                    (
                        "unknown_tool",
                        f"calls `{call.name}` (turn {turn + 1}), which is not among its tools "
                        f"({', '.join(sorted(n for n in offered if n))}); add it to `tools` or fix the call",
                    )
                )
    if needs == "text":
        if kind == "text":
            return []
        return [
            (
                "wrong_kind",
                f"is a {kind} record; pre-training reads `text` (or, from a registry entry, the "
                "field its columns.prompt names)",
            )
        ]
    if needs == "classify":
        return _classify_problems(example)
    if kind == "text":
        return [
            (
                "wrong_kind",
                f"is plain `text`; this stage needs {KIND_NEEDS[needs]} "
                "(text trains with method.name: pretrain)",
            )
        ]
    if needs == "sft" and kind == "prompt":
        found.append(("empty_response", _no_answer(example)))
    elif needs == "sft" and kind == "kto":
        found.append(
            ("wrong_kind", "has a KTO `label`; SFT would learn undesirable answers too (use method kto)")
        )
    elif needs == "sft" and kind == "preference":
        found.append(
            (
                "wrong_kind",
                "is a preference pair (`chosen`/`rejected`); SFT learns one answer per prompt: train on "
                "pairs with method dpo, orpo or simpo, or give SFT the chosen answers alone (as `output`, "
                "or `completion` beside `prompt`)",
            )
        )
    elif needs == "preference" and kind != "preference":
        found.append(
            ("wrong_kind", f"has no chosen/rejected pair; this stage needs {KIND_NEEDS['preference']}")
        )
    elif needs == "kto" and example.label is None:
        found.append(("wrong_kind", f"has no `label`; this stage needs {KIND_NEEDS['kto']}"))
    if needs == "kto" and not example.response:
        found.append(("empty_response", "has an empty response"))
    if needs == "preference" and kind == "preference" and not (example.response and example.rejected):
        found.append(("empty_response", "has an empty chosen or rejected response"))
    elif (
        needs == "preference"
        and kind == "preference"
        and example.response.strip() == example.rejected.strip()
    ):
        found.append(
            (
                "identical_pair",
                "has identical chosen and rejected answers; a pair must differ to teach a preference",
            )
        )
    if needs in ("preference", "kto") and not example.prompt.strip() and not example.images:
        found.append(
            ("empty_prompt", "has an empty prompt; preference data needs the question being answered")
        )
    placeholders = sum(text.count(IMAGE_PLACEHOLDER) for turn in example.turns for text in turn)
    placeholders += (example.system or "").count(IMAGE_PLACEHOLDER)
    if placeholders != len(example.images):
        found.append(
            (
                "image_mismatch",
                f"has {placeholders} `{IMAGE_PLACEHOLDER}` placeholder(s) but {len(example.images)} "
                f"image(s); put one `{IMAGE_PLACEHOLDER}` in the text where each image goes",
            )
        )
    missing = [str(p) for p in example.images if not p.is_file()]
    if missing:
        found.append(("missing_image", f"names missing image file(s): {', '.join(missing[:3])}"))
    return found


def _no_answer(example: Example) -> str:
    """Why an SFT record has no answer: an empty one, or fields of a layout lmforge does not know."""
    if not example.reference:
        return "has an empty response; SFT needs an answer to learn"
    fields = ", ".join(f"`{name}`" for name in example.fields or example.reference)
    if {"messages", "conversations"} & set(example.fields):
        return (
            f"has fields {fields} and its conversation ends with a user message; SFT learns the "
            "assistant messages: end it with the answer"
        )
    unread = next(iter(example.reference))
    return (
        f"has fields {fields}, none of which is an answer lmforge reads: SFT takes it from `output` "
        "(alpaca: instruction/input/output), `completion` or `response` (beside `prompt`), or the "
        "assistant messages of `messages`/`conversations`; if `"
        f"{unread}` holds the answer, map it in the dataset's columns (`columns: {{response: {unread}}}` "
        "in data.datasets[] or the dataset's registry entry)"
    )


def _classify_problems(example: Example) -> list[tuple[str, str]]:
    if example.kind != "text":
        return [("wrong_kind", f"is a {example.kind} record; classification needs {KIND_NEEDS['classify']}")]
    value = example.class_label
    if value is None:
        return [
            (
                "missing_label",
                "has no `label`; classification needs each text's class: add `label` (a class id 0, 1, "
                '… or a class name such as "positive")',
            )
        ]
    if class_label(value) is None:
        return [
            (
                "bad_label",
                f"has `label` {value!r} (a {type(value).__name__}); expected a class id (an integer 0, 1, "
                "…) or a class name (a non-empty string)",
            )
        ]
    if not (example.text or "").strip():
        return [("empty_text", "has an empty `text`; there is nothing to classify")]
    return []
