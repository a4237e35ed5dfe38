"""Tool-use fields of a record (docs/tools.md): the functions offered, the calls an answer makes.

Read as users write them: OpenAI `tools` ({"type": "function", "function": {...}}) or bare
function schemas (LLaMA-Factory's `tools` column, often a JSON string); OpenAI `tool_calls`
(`arguments` a JSON string or an object; `null` or `[]` for none); LLaMA-Factory's
`function_call` turns, whose text is one call's JSON object or a list of them. Arguments must be a
JSON object: a call whose arguments cannot be read is refused with the record and field.
"""

from __future__ import annotations

import json
from typing import Any

from lmforge.data.files import DataError
from lmforge.data.templates import ToolCall


def _json(value: Any, where: str, key: str, what: str) -> Any:
    """`value` itself, or parsed when it is a JSON string."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{where}: `{key}` is not valid JSON ({error.msg} at character {error.pos}); expected {what}"
        ) from None


def tool_name(tool: dict[str, Any]) -> str | None:
    """The function name of an offered tool in either layout."""
    function = tool.get("function") if isinstance(tool.get("function"), dict) else tool
    name = function.get("name")
    return name if isinstance(name, str) and name else None


def read_tools(value: Any, where: str, key: str) -> tuple[dict[str, Any], ...]:
    """The functions a record offers, kept as given (templates write them as the data has them)."""
    if value in (None, "", []):
        return ()
    tools = _json(value, where, key, "a list of function schemas")
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise DataError(f"{where}: `{key}` must be a list of function schemas")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool_name(tool) is None:
            raise DataError(
                f"{where}: {key}[{i}] must be a function schema with a `name` (or OpenAI's "
                '{"type": "function", "function": {"name": ...}})'
            )
    return tuple(tools)


def _call(value: Any, where: str, key: str) -> ToolCall:
    if not isinstance(value, dict):
        raise DataError(f"{where}: `{key}` must be an object with a function `name` and `arguments`")
    function = value["function"] if isinstance(value.get("function"), dict) else value
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: `{key}` has no function `name`")
    arguments = _json(function.get("arguments", {}), where, f"{key}.arguments", "a JSON object")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise DataError(f"{where}: `{key}.arguments` is a {type(arguments).__name__}; expected a JSON object")
    call_id = value.get("id")
    return ToolCall(name=name, arguments=arguments, id=call_id if isinstance(call_id, str) else None)


def read_tool_calls(value: Any, where: str, key: str) -> tuple[ToolCall, ...]:
    """OpenAI `tool_calls` (or one call), `null` and `[]` meaning none."""
    if value in (None, "", []):
        return ()
    calls = value if isinstance(value, list) else [value]
    return tuple(_call(call, where, f"{key}[{i}]") for i, call in enumerate(calls))


def read_function_call(text: Any, where: str, key: str) -> tuple[ToolCall, ...]:
    """A LLaMA-Factory `function_call` turn: its text is one call's JSON object or a list of them."""
    parsed = _json(text, where, key, 'a call\'s JSON: {"name": ..., "arguments": {...}} or a list of them')
    calls = read_tool_calls(parsed, where, key)
    if not calls:
        raise DataError(f"{where}: `{key}` holds no function call")
    return calls
