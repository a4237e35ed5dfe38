"""Chat templates: how a conversation becomes the exact text a model was trained on.

Each template is written out by hand from the model's published chat format, because
training needs what a Jinja `chat_template` cannot give: the boundary between the
prompt (masked from the loss) and the response (learned, including its end-of-turn
token). `render` builds a conversation segment by segment and `encode` splits the whole
text's encoding at those segments (`split_encoding`); `jinja()` emits
the equivalent Jinja template, saved with every model lmforge writes so other tools
(vLLM, transformers `apply_chat_template`) format prompts identically. A test checks,
for every template, that both agree token for token.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from transformers import PreTrainedTokenizerBase

THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)
IMAGE_PLACEHOLDER = "<image>"  # where an image goes in a record's text


@dataclass(frozen=True)
class ToolCall:
    """One function call an assistant turn makes: the function's name and its arguments (a JSON
    object), and the call's id when the data gives one (OpenAI's `tool_calls[i].id`)."""

    name: str
    arguments: dict[str, Any]
    id: str | None = None

    def as_message(self) -> dict[str, Any]:
        """The call as an OpenAI `tool_calls` entry (arguments as an object, as chat templates take)."""
        function = {"name": self.name, "arguments": self.arguments}
        call: dict[str, Any] = {"type": "function", "function": function}
        return {"id": self.id, **call} if self.id else call


@dataclass(frozen=True)
class Conversation:
    """One normalised training record: an optional system prompt and (user, assistant) turns.

    The last turn's assistant text may be empty for a generation prompt. Tool use (docs/tools.md):
    `tools` are the JSON-schema functions offered to the model; `calls[i]` the function calls turn
    i's answer makes after its text; `results[i]` the tool results that are turn i's user side
    (what the tools returned for the previous turn's calls), in place of a user message.
    """

    turns: list[tuple[str, str]]
    system: str | None = None
    tools: tuple[dict[str, Any], ...] = ()
    calls: dict[int, tuple[ToolCall, ...]] = field(default_factory=dict)
    results: dict[int, tuple[str, ...]] = field(default_factory=dict)
    prefill: str = ""  # generation only: the text the answer starts with (a forced tool call)

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools or self.calls or self.results)

    def messages(self) -> list[dict[str, Any]]:
        """The conversation as OpenAI chat messages (what a Jinja chat template takes)."""
        out: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        for i, (user, assistant) in enumerate(self.turns):
            if i in self.results:
                answered = self.calls.get(i - 1, ())
                for j, result in enumerate(self.results[i]):
                    call_id = answered[j].id if j < len(answered) else None
                    message = {"role": "tool", "content": result}
                    out.append({**message, "tool_call_id": call_id} if call_id else message)
            else:
                out.append({"role": "user", "content": user})
            if i in self.calls:
                calls = [call.as_message() for call in self.calls[i]]
                out.append({"role": "assistant", "content": assistant, "tool_calls": calls})
            elif assistant or i < len(self.turns) - 1:
                out.append({"role": "assistant", "content": assistant})
        return out


def tool_json(value: Any, indent: int | None = None) -> str:
    """JSON as chat templates write it (transformers' `tojson`: no ASCII escaping, `, ` and `: `)."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    """An offered tool's function schema, in either layout (OpenAI's wrapper or bare)."""
    return tool["function"] if isinstance(tool.get("function"), dict) else tool


@dataclass(frozen=True)
class ToolFormat:
    """How a chat format writes tools, calls and results. This base is Hermes-style (Qwen2.5's
    template, ChatML): the offered functions go in the system prompt (after the system text); each
    call is a `<tool_call>` block of JSON after the answer's text; a turn of tool results is a user
    turn of `<tool_response>` blocks. The subclasses are Llama 3.1's and Mistral's formats.

    A format that cannot write something the data has (text beside a call, several calls in one
    answer) raises ValueError naming it: the official template would drop it silently."""

    name: str = "hermes"
    opening: str = "<tool_call>"  # how every calling answer starts (a forced call's prefill)
    leads: str = ""  # the character a call answer's decoded text starts with, when calls are whole answers

    def prepare(self, conversation: Conversation) -> Conversation:
        """The conversation as this format writes it (Mistral: every call gets its id)."""
        return conversation

    def system(self, system: str | None, tools: tuple[dict[str, Any], ...]) -> str | None:
        listed = "".join("\n" + tool_json(tool) for tool in tools)
        return (
            (f"{system}\n\n" if system else "")
            + "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
            + listed
            + "\n</tools>\n\nFor each function call, return a json object with function name and "
            "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        )

    def tools_turns(self, turns: list[tuple[str, str]], asked: list[int]) -> set[int]:
        """The user turns (of `asked`, those not of tool results) that carry the offered tools;
        none here: Hermes puts them in the system prompt."""
        return set()

    def before_user(self, tools: tuple[dict[str, Any], ...]) -> str:
        """Text before a user turn that carries the tools (`tools_turns`)."""
        return ""

    def user(self, user: str, tools: tuple[dict[str, Any], ...]) -> str:
        """The text of a user turn that carries the tools (`tools_turns`)."""
        return user

    def answer(self, content: str, calls: tuple[ToolCall, ...]) -> str:
        blocks = [
            f'<tool_call>\n{{"name": "{call.name}", "arguments": {tool_json(call.arguments)}}}\n</tool_call>'
            for call in calls
        ]
        return "\n".join([content, *blocks] if content else blocks)

    def results(self, results: tuple[str, ...], calls: tuple[ToolCall, ...]) -> str:
        """A turn of tool results; `calls` are the calls they answer, in order."""
        return "\n".join(f"<tool_response>\n{result}\n</tool_response>" for result in results)

    def call_prefix(self, tokenizer: PreTrainedTokenizerBase, name: str | None = None) -> str:
        """The start of a call, to begin an answer with so that it must call (a tool, or the
        function `name`): cut at the last token boundary of the written call within that start, so
        the prompt ends where training's tokens did (a prompt ending inside a token reads as a
        different text)."""
        text = self.answer("", (ToolCall(name or "f", {}, id="000000000"),))
        wanted = text.index(f'"{name}"') + len(name) + 2 if name else len(self.opening)
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return text[: max([end for _, end in offsets if end <= wanted], default=0)]

    def streamable(self, text: str) -> int:
        """How much of a partly generated answer is surely content, to stream before it ends: the
        text before a call could start, less trailing space. A format whose calls are the whole
        answer (`leads`) holds an answer that starts like one; Hermes holds from `<tool_call>` (or
        a tail that may begin it)."""
        if not text.strip():
            return 0
        if self.leads:
            return 0 if text.lstrip().startswith(self.leads) else len(text.rstrip())
        found = text.find(self.opening)
        if found >= 0:
            return len(text[:found].rstrip())
        tail = next((k for k in range(len(self.opening) - 1, 0, -1) if text.endswith(self.opening[:k])), 0)
        return len(text[: len(text) - tail].rstrip())

    def parse(self, text: str) -> tuple[str, tuple[ToolCall, ...]]:
        """(content, calls) of a generated answer: the text before its first `<tool_call>` block and
        the calls of every block. Text whose blocks are not each a call's JSON (a name and an
        object of arguments) comes back whole as content, with no calls."""
        blocks = _TOOL_CALL.findall(text)
        calls = [_read_call(_json_value(block), "arguments") for block in blocks]
        if not calls or None in calls:
            return text, ()
        return text.split("<tool_call>", 1)[0].strip(), tuple(calls)  # type: ignore[arg-type]

    def jinja(self) -> tuple[str, str, str, str]:
        """The Jinja pieces (system, tool messages, tools user turn, calls) that write what this
        format does, for `ChatTemplate.jinja`: see `_HERMES_JINJA`."""
        probe = self.system(None, ({"TOOLS": 0},)).split('\n{"TOOLS": 0}')  # type: ignore[union-attr]
        system = (
            "{%- if tools -%}{%- set listed = namespace(text='') -%}{%- for tool in tools -%}"
            "{%- set listed.text = listed.text + '\\n' + (tool | tojson) -%}{%- endfor -%}"
            f"{{%- set system = ((system + '\\n\\n') if system else '') + {probe[0]!r} + listed.text + "
            f"{probe[1]!r} -%}}{{%- endif -%}}"
        )
        turn = _results_jinja("'<tool_response>\\n' + content + '\\n</tool_response>'", "'\\n'")
        calls = (
            "{%- set ns.text = content or '' -%}{%- for call in m['tool_calls'] -%}"
            "{%- set f = call['function'] if call['function'] is defined else call -%}"
            "{%- set block = '<tool_call>\\n{\"name\": \"' + f['name'] + '\", \"arguments\": ' + "
            "(f['arguments'] | tojson) + '}\\n</tool_call>' -%}"
            "{%- set ns.text = (ns.text + '\\n' + block) if ns.text else block -%}{%- endfor -%}"
            "{%- set content = ns.text -%}"
        )
        return system, turn, "", calls


def _results_jinja(block: str, joiner: str) -> str:
    """Jinja that gathers a run of `tool` messages into one turn of results (role `results`, the
    earlier ones of the run `held`); `block` is one result's text."""
    return (
        "{%- if role == 'tool' -%}"
        f"{{%- set block = {block} -%}}"
        f"{{%- set ns.tool = (ns.tool + {joiner} + block) "
        "if loop.index0 > 0 and msgs[loop.index0 - 1]['role'] == 'tool' else block -%}"
        "{%- set ns.j = ns.j + 1 -%}{%- set content = ns.tool -%}"
        "{%- set role = 'held' if not loop.last and msgs[loop.index0 + 1]['role'] == 'tool' "
        "else 'results' -%}"
        "{%- endif -%}"
    )


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _json_object(text: str) -> dict[str, Any] | None:
    value = _json_value(text)
    return value if isinstance(value, dict) else None


def _read_call(value: Any, key: str) -> ToolCall | None:
    """A generated call's JSON object read into a ToolCall (its arguments under `key`, an object
    or a JSON string of one); None when it is not a call."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(key, {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        arguments = _json_object(arguments)
    if not isinstance(arguments, dict):
        return None
    call_id = value.get("id")
    return ToolCall(value["name"], arguments, id=call_id if isinstance(call_id, str) else None)


def _one_call(form: str, content: str, calls: tuple[ToolCall, ...], many: bool) -> None:
    if content:
        raise ValueError(
            f"{form}'s format writes an answer that calls as the call alone, and this answer has text "
            f"beside its call ({content[:40]!r}): drop the text, or use a template that keeps both "
            "(qwen2.5, chatml)"
        )
    if not many and len(calls) != 1:
        raise ValueError(
            f"{form}'s format writes one call per answer, and this answer makes {len(calls)}: split "
            "them over turns, or use a template with parallel calls (qwen2.5, chatml, mistral-v0.3)"
        )


_LLAMA_TOOLS = (
    "Given the following functions, please respond with a JSON for a function call with its proper "
    "arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    "value}.Do not use variables.\n\n"
)


@dataclass(frozen=True)
class LlamaJsonTools(ToolFormat):
    """Llama 3.1's format: the functions as indented JSON in the first user turn, the system block
    marked `Environment: ipython`; a call is the whole answer, one JSON object with `parameters`;
    each result is an `ipython` turn holding the result as a JSON string."""

    name: str = "llama3.1"
    opening: str = '{"name": "'
    leads: str = "{"

    def tools_turns(self, turns: list[tuple[str, str]], asked: list[int]) -> set[int]:
        return {asked[0]}  # the first user turn

    def system(self, system: str | None, tools: tuple[dict[str, Any], ...]) -> str | None:
        return "Environment: ipython\n" + (system or "")

    def user(self, user: str, tools: tuple[dict[str, Any], ...]) -> str:
        return _LLAMA_TOOLS + "".join(tool_json(tool, indent=4) + "\n\n" for tool in tools) + user

    def answer(self, content: str, calls: tuple[ToolCall, ...]) -> str:
        _one_call(self.name, content, calls, many=False)
        return f'{{"name": "{calls[0].name}", "parameters": {tool_json(calls[0].arguments)}}}'

    def results(self, results: tuple[str, ...], calls: tuple[ToolCall, ...]) -> str:
        return "".join(
            f"<|start_header_id|>ipython<|end_header_id|>\n\n{tool_json(result)}<|eot_id|>"
            for result in results
        )

    def parse(self, text: str) -> tuple[str, tuple[ToolCall, ...]]:
        """One call when the whole answer is a call's JSON object (`parameters`, or `arguments`)."""
        value = _json_object(text.strip()) if text.strip().startswith("{") else None
        key = "parameters" if value and "parameters" in value else "arguments"
        call = _read_call(value, key)
        return ("", (call,)) if call else (text, ())

    def jinja(self) -> tuple[str, str, str, str]:
        system = "{%- if tools -%}{%- set system = 'Environment: ipython\\n' + system -%}{%- endif -%}"
        turn = _results_jinja(
            "'<|start_header_id|>ipython<|end_header_id|>\\n\\n' + (content | tojson) + '<|eot_id|>'", "''"
        )
        user = (
            "{%- if tools and ns.turn == 0 -%}{%- set listed = namespace(text='') -%}"
            "{%- for tool in tools -%}{%- set listed.text = listed.text + (tool | tojson(indent=4)) + "
            f"'\\n\\n' -%}}{{%- endfor -%}}{{%- set content = {_LLAMA_TOOLS!r} + listed.text + content -%}}"
            "{%- endif -%}"
        )
        calls = (
            "{%- if m['tool_calls'] | length != 1 -%}"
            "{{- raise_exception('Llama 3.1 writes one tool call per answer') -}}{%- endif -%}"
            "{%- set f = m['tool_calls'][0]['function'] -%}"
            "{%- set content = '{\"name\": \"' + f['name'] + '\", \"parameters\": ' "
            "+ (f['arguments'] | tojson) + '}' -%}"
        )
        return system, turn, user, calls


def mistral_call_id(call_id: str | None, index: int) -> str:
    """The 9-character id Mistral's format gives a call: the call's own id when it is one,
    else its last 9 letters and digits (padded with 0s), else the call's index in the conversation."""
    if call_id is None:
        return ("000000000" + str(index))[-9:]
    kept = str(call_id).replace("_", "").replace("-", "")
    return kept[-9:] if len(kept) >= 9 else (kept + "000000000")[:9]


@dataclass(frozen=True)
class MistralTools(ToolFormat):
    """Mistral's v3 tokenizer format (Mistral-7B-Instruct-v0.3): `[AVAILABLE_TOOLS] [...]` before the
    last user turn; calls as `[TOOL_CALLS] [...]` with 9-character ids; each result as
    `[TOOL_RESULTS] {"content": ..., "call_id": ...}[/TOOL_RESULTS]`."""

    name: str = "mistral-v0.3"
    opening: str = "[TOOL_CALLS] ["
    leads: str = "["  # [TOOL_CALLS] is a special token, so decoded text starts at the list

    def prepare(self, conversation: Conversation) -> Conversation:
        index, calls = 0, {}
        for turn in sorted(conversation.calls):
            named = []
            for call in conversation.calls[turn]:
                named.append(replace(call, id=mistral_call_id(call.id, index)))
                index += 1
            calls[turn] = tuple(named)
        return replace(conversation, calls=calls)

    def tools_turns(self, turns: list[tuple[str, str]], asked: list[int]) -> set[int]:
        """Every user turn whose text is the last one's, as Mistral's template compares them."""
        return {i for i in asked if turns[i][0] == turns[asked[-1]][0]}

    def system(self, system: str | None, tools: tuple[dict[str, Any], ...]) -> str | None:
        return system

    def before_user(self, tools: tuple[dict[str, Any], ...]) -> str:
        listed = []
        for tool in tools:
            fields = [
                f'"{key}": "{value}"' if isinstance(value, str) else f'"{key}": {tool_json(value)}'
                for key, value in _function(tool).items()
                if key != "return"
            ]
            listed.append('{"type": "function", "function": {' + ", ".join(fields) + "}}")
        return "[AVAILABLE_TOOLS] [" + ", ".join(listed) + "][/AVAILABLE_TOOLS]"

    def answer(self, content: str, calls: tuple[ToolCall, ...]) -> str:
        _one_call(self.name, content, calls, many=True)
        written = [
            tool_json({"name": call.name, "arguments": call.arguments})[:-1] + f', "id": "{call.id}"}}'
            for call in calls
        ]
        return "[TOOL_CALLS] [" + ", ".join(written) + "]"

    def results(self, results: tuple[str, ...], calls: tuple[ToolCall, ...]) -> str:
        if len(results) > len(calls):
            raise ValueError(f"{len(results)} tool results answer {len(calls)} call(s): each needs its call")
        return "".join(
            f'[TOOL_RESULTS] {{"content": {result}, "call_id": "{call.id}"}}[/TOOL_RESULTS]'
            for result, call in zip(results, calls, strict=False)
        )

    def parse(self, text: str) -> tuple[str, tuple[ToolCall, ...]]:
        """The calls of a `[TOOL_CALLS]` list (the marker is a special token, so decoded text may
        start at the list itself)."""
        content, marker, listed = text.partition("[TOOL_CALLS]")
        if not marker:
            content, listed = "", text
        value = _json_value(listed.strip()) if listed.strip().startswith("[") else None
        calls = [_read_call(item, "arguments") for item in value] if isinstance(value, list) else []
        if not calls or None in calls:
            return text, ()
        return content.strip(), tuple(calls)  # type: ignore[arg-type]

    def jinja(self) -> tuple[str, str, str, str]:
        call_id = (
            "{%- set cid = (cid | string) | replace('_', '') | replace('-', '') -%}"
            "{%- set cid = cid[-9:] if cid | length >= 9 else (cid + '000000000')[:9] -%}"
        )
        turn = (
            "{%- if role == 'tool' -%}"
            "{%- if m['tool_call_id'] is defined and m['tool_call_id'] is not none -%}"
            "{%- set cid = m['tool_call_id'] -%}" + call_id + "{%- else -%}"
            "{%- set cid = ns.ids[ns.j] if ns.j < ns.ids | length else '' -%}{%- endif -%}"
            '{%- set content = \'[TOOL_RESULTS] {"content": \' + (content | string) + \', "call_id": "\' '
            "+ cid + '\"}[/TOOL_RESULTS]' -%}{%- endif -%}"
        ) + _results_jinja("content", "''")
        user = (
            "{%- if tools and loop.index0 <= ns.asked and m['content'] == msgs[ns.asked]['content'] -%}"
            "{%- set listed = namespace(items=[]) -%}{%- for tool in tools -%}"
            "{%- set f = tool['function'] if tool['function'] is defined else tool -%}"
            "{%- set fields = namespace(items=[]) -%}{%- for key, val in f.items() if key != 'return' -%}"
            "{%- set fields.items = fields.items + ['\"' + key + '\": ' + (('\"' + val + '\"') "
            "if val is string else (val | tojson))] -%}{%- endfor -%}"
            '{%- set listed.items = listed.items + [\'{"type": "function", "function": {\' + '
            "fields.items | join(', ') + '}}'] -%}{%- endfor -%}"
            "{{- '[AVAILABLE_TOOLS] [' + listed.items | join(', ') + '][/AVAILABLE_TOOLS]' -}}"
            "{%- endif -%}"
        )
        calls = (
            "{%- set ns.ids = [] -%}{%- set ns.j = 0 -%}{%- set written = namespace(items=[]) -%}"
            "{%- for call in m['tool_calls'] -%}"
            "{%- set f = call['function'] if call['function'] is defined else call -%}"
            "{%- if call['id'] is defined and call['id'] is not none -%}{%- set cid = call['id'] -%}"
            + call_id
            + "{%- else -%}{%- set cid = ('000000000' + (ns.k | string))[-9:] -%}{%- endif -%}"
            "{%- set ns.k = ns.k + 1 -%}{%- set ns.ids = ns.ids + [cid] -%}"
            "{%- set written.items = written.items + [({'name': f['name'], 'arguments': f['arguments']} "
            "| tojson)[:-1] + ', \"id\": \"' + cid + '\"}'] -%}{%- endfor -%}"
            "{%- set content = '[TOOL_CALLS] [' + written.items | join(', ') + ']' -%}"
        )
        return "", turn, user, calls


HERMES = ToolFormat()
LLAMA_JSON = LlamaJsonTools()
MISTRAL_TOOLS = MistralTools()
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", flags=re.DOTALL)


def split_encoding(
    segments: list[tuple[str, str]], tokenizer: PreTrainedTokenizerBase
) -> list[tuple[list[int], list[int]]]:
    """The ids of the whole text (`segments` joined), split at each segment's first character.

    Encoding prompt and answer separately is not the same as encoding the conversation: a
    SentencePiece tokenizer (Llama-2, Mistral, T5) writes a `▁` before a text it starts anew, and
    any tokenizer may merge across a boundary. Training must see the tokens inference and
    `apply_chat_template(tokenize=True)` see, so the whole text is encoded once and each token
    goes to the segment holding its first character (its character offsets). A tokenizer
    without offsets is split where the encoding of each prefix stops agreeing with the whole.
    """
    pieces = [text for pair in segments for text in pair]
    starts, position = [], 0
    for text in pieces:
        starts.append(position)
        position += len(text)
    full = "".join(pieces)
    if not full:
        return [([], []) for _ in segments]
    try:
        encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    except NotImplementedError:  # a slow (Python) tokenizer has no offsets
        ids, offsets = tokenizer(full, add_special_tokens=False)["input_ids"], None
    if offsets is not None:
        owners = [_owner(starts, pieces, start) for start, _ in offsets]
    else:
        owners, cut = [], 0
        for index in range(len(pieces)):
            end = starts[index] + len(pieces[index])
            prefix = tokenizer(full[:end], add_special_tokens=False)["input_ids"] if end < len(full) else ids
            agree = next(
                (i for i, (a, b) in enumerate(zip(prefix, ids, strict=False)) if a != b), len(prefix)
            )
            agree = max(min(agree, len(ids)), cut)
            owners += [index] * (agree - cut)
            cut = agree
        owners += [len(pieces) - 1] * (len(ids) - cut)
    split: list[list[int]] = [[] for _ in pieces]
    for token, owner in zip(ids, owners, strict=True):
        split[owner].append(token)
    return [(split[2 * i], split[2 * i + 1]) for i in range(len(segments))]


def _owner(starts: list[int], pieces: list[str], char: int) -> int:
    """The index of the last non-empty piece that starts at or before character `char`."""
    index = max(bisect_right(starts, char) - 1, 0)
    while index > 0 and not pieces[index]:
        index -= 1
    return index


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format. `{content}` marks where text goes; `{bos}`/`{eos}` are the tokenizer's."""

    name: str
    prefix: str  # once, at the start of a conversation
    user: str  # one user turn, up to where the assistant starts writing
    assistant: str  # one assistant turn, ending with the token that stops generation
    separator: str = ""  # between an assistant turn and the next user turn
    system: str = ""  # a system block before the first user turn; "" = fold into a user turn
    system_in_user: str = "{system}\n\n{content}"  # how a folded system joins its user turn
    system_turn: str = "first"  # the user turn a folded system joins: first, or last (Mistral v0.3)
    system_head: str = ""  # fixed text the system block always starts with (Llama 3.1's dates)
    stop: str = "{eos}"  # the token whose generation ends a response
    default_system: str | None = None
    strip_history_thinking: bool = False  # drop <think>…</think> from earlier assistant turns
    image: str = IMAGE_PLACEHOLDER  # what a record's <image> placeholder becomes in the prompt
    generation_suffix: str = ""  # written after the prompt only when asking for an answer
    trim: tuple[str, ...] = ()  # the messages stripped of surrounding whitespace, as the official does
    tools: ToolFormat | None = None  # how tools, calls and results are written (None: no tool format)
    results_user: str = ""  # a turn of tool results, where the user turn would be ("" = `user`)
    calls_assistant: str = ""  # an answer that calls ("" = `assistant`)
    aliases: tuple[str, ...] = field(default=())

    def _fill(self, pattern: str, tokenizer: PreTrainedTokenizerBase, content: str = "") -> str:
        bos = tokenizer.bos_token or ""
        eos = tokenizer.eos_token or ""
        # Replace content last so braces in user text are never interpreted.
        return pattern.replace("{bos}", bos).replace("{eos}", eos).replace("{content}", content)

    def stop_token(self, tokenizer: PreTrainedTokenizerBase) -> str:
        return self._fill(self.stop, tokenizer)

    def tool_format(self, tokenizer: PreTrainedTokenizerBase | None = None) -> ToolFormat | None:
        return self.tools

    def _system(self, conversation: Conversation) -> str | None:
        system = conversation.system if conversation.system is not None else self.default_system
        if system and "system" in self.trim:
            system = system.strip()
        if self.system_head:
            system = self.system_head + (system or "")
        if self.tools is not None and conversation.tools:
            system = self.tools.system(system, conversation.tools)
        return system

    def segments(
        self, conversation: Conversation, tokenizer: PreTrainedTokenizerBase
    ) -> list[tuple[str, str]]:
        """(prompt text, response text) per turn; joined they are the full conversation."""
        form = self.tools
        if conversation.uses_tools:
            if form is None:
                raise ValueError(
                    f"data.template {self.name} has no format for tools and tool calls, and this data "
                    "has them (docs/tools.md); use qwen2.5 or chatml (Hermes-style <tool_call>), "
                    "llama3.1, mistral-v0.3, or data.template: tokenizer with a tokenizer whose "
                    "chat_template takes tools"
                )
            conversation = form.prepare(conversation)
        system, tools, turns = self._system(conversation), conversation.tools, conversation.turns
        asked = [i for i in range(len(turns)) if i not in conversation.results]  # the user turns
        fold_at = asked[-1] if self.system_turn == "last" else 0
        tools_at = form.tools_turns(turns, asked) if form is not None and tools else set()
        pairs: list[tuple[str, str]] = []
        for i, (user, assistant) in enumerate(turns):
            prompt = self._fill(self.prefix if i == 0 else self.separator, tokenizer)
            if i == 0 and system and self.system:
                prompt += self._fill(self.system, tokenizer, system)
            if i in conversation.results:
                written = form.results(conversation.results[i], conversation.calls.get(i - 1, ()))  # type: ignore[union-attr]
                prompt += self._fill(self.results_user or self.user, tokenizer, written)
            else:
                if i == fold_at and system and not self.system:
                    user = self.system_in_user.replace("{system}", system).replace("{content}", user)
                if "user" in self.trim:  # after folding the system in, as Llama-2's official strips
                    user = user.strip()
                if i in tools_at:
                    prompt += form.before_user(tools)  # type: ignore[union-attr]
                    user = form.user(user, tools)  # type: ignore[union-attr]
                if self.image != IMAGE_PLACEHOLDER:
                    user = user.replace(IMAGE_PLACEHOLDER, self.image)
                prompt += self._fill(self.user, tokenizer, user)
            if "assistant" in self.trim:
                assistant = assistant.strip()
            if i in conversation.calls:
                written = form.answer(assistant, conversation.calls[i])  # type: ignore[union-attr]
                answer = self._fill(self.calls_assistant or self.assistant, tokenizer, written)
            else:
                if self.strip_history_thinking and i < len(turns) - 1 and "</think>" in assistant:
                    assistant = assistant.split("</think>")[-1]  # as the official: keeps what follows
                answer = self._fill(self.assistant, tokenizer, assistant)
            pairs.append((prompt, answer))
        return pairs

    def render(self, conversation: Conversation, tokenizer: PreTrainedTokenizerBase) -> str:
        return "".join(p + r for p, r in self.segments(conversation, tokenizer))

    def generation_prompt(self, conversation: Conversation, tokenizer: PreTrainedTokenizerBase) -> str:
        """The text to feed a model so it writes the last turn's answer."""
        segments = self.segments(conversation, tokenizer)
        prompt = "".join(p + r for p, r in segments[:-1]) + segments[-1][0] + self.generation_suffix
        return prompt + conversation.prefill

    def encode(
        self, conversation: Conversation, tokenizer: PreTrainedTokenizerBase
    ) -> list[tuple[list[int], list[int]]]:
        """Token ids of each (prompt, response) segment: the whole conversation's encoding, split."""
        return split_encoding(self.segments(conversation, tokenizer), tokenizer)

    def jinja(self, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
        """An equivalent Jinja chat template (messages with system/user/assistant/tool roles).

        `tokenizer` is not read here: the template names `bos_token`/`eos_token`, which the
        tokenizer fills in when it renders. It is taken so that code holding either kind of
        template (`AnyTemplate`) calls `jinja(tokenizer)` alike; `TokenizerTemplate.jinja` needs it.
        """

        def lit(pattern: str, content_expr: str = "content") -> str:
            out = []
            for piece in re.split(r"(\{content\}|\{bos\}|\{eos\})", pattern):
                if piece == "{content}":
                    out.append(content_expr)
                elif piece == "{bos}":
                    out.append("bos_token")
                elif piece == "{eos}":
                    out.append("eos_token")
                elif piece:
                    out.append(repr(piece))
            return "{{- " + (" + ".join(out) if out else "''") + " -}}"

        def trimmed(part: str) -> str:
            return "{%- set content = (content or '') | trim -%}" if part in self.trim else ""

        folded = self.system_in_user.replace("{system}", "' + system + '")
        folded_expr = "'" + folded.replace("\n", "\\n").replace("{content}", "' + content + '") + "'"
        default = repr(self.default_system) if self.default_system is not None else "none"
        history_strip = (
            "{%- if loop.index0 < last_user and '</think>' in content -%}"
            "{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
            if self.strip_history_thinking
            else ""
        )
        tool_system, tool_turn, tool_user, tool_calls = self.tools.jinja() if self.tools else ("",) * 4
        fold_when = "ns.turn == 0" if self.system_turn == "first" else "loop.index0 == ns.asked"
        separator = f"{{%- if ns.turn > 0 -%}}{lit(self.separator)}{{%- endif -%}}"
        system_fixes = "{%- if system -%}{%- set system = system | trim -%}{%- endif -%}"
        system_fixes *= "system" in self.trim
        if self.system_head:
            system_fixes += f"{{%- set system = {self.system_head!r} + (system or '') -%}}"
        if self.system:  # a block of its own before the first user turn
            place_system = f"{{%- if ns.turn == 0 and system -%}}{lit(self.system, 'system')}{{%- endif -%}}"
            fold_system = ""
        else:  # folded into the first (or last) user turn
            place_system = ""
            fold_system = f"{{%- if {fold_when} and system -%}}{{%- set content = {folded_expr} -%}}"
            fold_system += "{%- endif -%}"
        answer = trimmed("assistant") + history_strip + lit(self.assistant)
        if self.tools is not None:
            answer = (
                "{%- if m['tool_calls'] is defined and m['tool_calls'] -%}"
                + trimmed("assistant")
                + tool_calls
                + lit(self.calls_assistant or self.assistant)
                + "{%- else -%}"
                + answer
                + "{%- endif -%}"
            )
        return (
            "{%- set system = none -%}"
            "{%- set msgs = messages -%}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system = messages[0]['content'] -%}{%- set msgs = messages[1:] -%}"
            "{%- endif -%}"
            f"{{%- if system is none -%}}{{%- set system = {default} -%}}{{%- endif -%}}"
            + system_fixes
            + tool_system
            + "{%- set ns = namespace(turn=0, last_user=0, asked=0, tool='', text='', k=0, j=0, ids=[]) -%}"
            "{%- for m in msgs -%}{%- if m['role'] in ('user', 'tool') -%}"
            "{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
            "{%- if m['role'] == 'user' -%}{%- set ns.asked = loop.index0 -%}{%- endif -%}{%- endfor -%}"
            "{%- set last_user = ns.last_user -%}"
            + lit(self.prefix)
            + "{%- for m in msgs -%}{%- set content = m['content'] -%}{%- set role = m['role'] -%}"
            + tool_turn
            + "{%- if role == 'user' -%}"
            + place_system
            + separator
            + fold_system
            + trimmed("user")
            + tool_user
            + (
                f"{{%- set content = content.replace({IMAGE_PLACEHOLDER!r}, {self.image!r}) -%}}"
                if self.image != IMAGE_PLACEHOLDER
                else ""
            )
            + lit(self.user)
            + "{%- set ns.turn = ns.turn + 1 -%}"
            "{%- elif role == 'results' -%}"
            + separator
            + lit(self.results_user or self.user)
            + "{%- set ns.turn = ns.turn + 1 -%}"
            "{%- elif role == 'assistant' -%}"
            + answer
            + "{%- endif -%}{%- endfor -%}"
            + (
                "{%- if add_generation_prompt and msgs and msgs[-1]['role'] == 'user' -%}"
                f"{{{{- {self.generation_suffix!r} -}}}}{{%- endif -%}}"
                if self.generation_suffix
                else ""
            )
        )


@dataclass(frozen=True)
class TokenizerTemplate:
    """The tokenizer's own Jinja `chat_template` (`data.template: tokenizer`).

    Prompt/response boundaries come from rendering growing prefixes of the conversation: the
    text added by a user turn (with the generation prompt) is prompt, the text added by the
    answer is response. A template whose earlier output changes when a turn is added (e.g. one
    that drops past reasoning) cannot be split that way and is refused with the fix.
    """

    name: str = "tokenizer"
    generation_suffix: str = ""  # the Jinja template writes its own generation prompt

    def tool_format(self, tokenizer: PreTrainedTokenizerBase) -> ToolFormat | None:
        """How the tokenizer's template writes calls, for reading them back from generated text:
        Hermes-style when it writes `<tool_call>` blocks (Qwen2.5, Hermes, many ChatML models),
        Mistral's `[TOOL_CALLS]` lists, or Llama 3.1's JSON calls with `ipython` results."""
        text = getattr(tokenizer, "chat_template", None) or ""
        if "<tool_call>" in text:
            return HERMES
        if "[TOOL_CALLS]" in text:
            return MISTRAL_TOOLS
        return LLAMA_JSON if "ipython" in text and '"parameters": ' in text else None

    def stop_token(self, tokenizer: PreTrainedTokenizerBase) -> str:
        return tokenizer.eos_token or ""

    def _render(
        self,
        tokenizer: PreTrainedTokenizerBase,
        messages: list[dict[str, Any]],
        prompt: bool,
        tools: tuple[dict[str, Any], ...] = (),
    ) -> str:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "data.template is `tokenizer` but this tokenizer has no chat_template; "
                "name a template instead (e.g. chatml)"
            )
        if any(IMAGE_PLACEHOLDER in (m["content"] or "") for m in messages):
            raise ValueError(
                "data.template `tokenizer` cannot place images; use the model's named template "
                "(e.g. qwen2-vl)"
            )
        extra = {"tools": list(tools)} if tools else {}
        try:
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt, **extra
            )
        except Exception as exc:  # jinja2's TemplateError, raised by the template itself
            raise ValueError(f"the tokenizer's chat_template refused this conversation: {exc}") from None

    def segments(
        self, conversation: Conversation, tokenizer: PreTrainedTokenizerBase
    ) -> list[tuple[str, str]]:
        """Each turn's prompt (its user message or tool results, with the generation prompt) and
        response (the answer, tool calls included), from renders of growing message lists."""
        if conversation.uses_tools and "tools" not in (tokenizer.chat_template or ""):
            raise ValueError(
                "this tokenizer's chat_template has no tool format (it never reads `tools`), and this "
                "data has tools or tool calls (docs/tools.md); use a named template with one (qwen2.5, "
                "chatml, llama3.1, mistral-v0.3)"
            )
        full_messages = Conversation(
            turns=[(u, a or "x") for u, a in conversation.turns],  # every turn's answer, to split at
            system=conversation.system,
            calls=conversation.calls,
            results=conversation.results,
        ).messages()
        messages: list[dict[str, Any]] = []
        if conversation.system:
            messages.append(full_messages.pop(0))
        pairs: list[tuple[str, str]] = []
        done, tools = "", conversation.tools
        for _, assistant in conversation.turns:
            while full_messages[0]["role"] != "assistant":
                messages.append(full_messages.pop(0))  # the user message, or the tool results
            with_prompt = self._render(tokenizer, messages, True, tools)
            messages.append({**full_messages.pop(0), "content": assistant})
            full = self._render(tokenizer, messages, False, tools)
            if not (with_prompt.startswith(done) and full.startswith(with_prompt)):
                raise ValueError(
                    "the tokenizer's chat_template rewrites earlier turns when a turn is added, so "
                    "prompt and response cannot be told apart; use a named template (data.template)"
                )
            pairs.append((with_prompt[len(done) :], full[len(with_prompt) :]))
            done = full
        return pairs

    render = ChatTemplate.render
    generation_prompt = ChatTemplate.generation_prompt
    encode = ChatTemplate.encode

    def jinja(self, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("the `tokenizer` template needs a tokenizer with a chat_template")
        return tokenizer.chat_template


AnyTemplate = ChatTemplate | TokenizerTemplate
TEMPLATES: dict[str, ChatTemplate] = {}


def _register(template: ChatTemplate) -> None:
    for name in (template.name, *template.aliases):
        TEMPLATES[name] = template


_register(
    ChatTemplate(
        # Llama-2-chat: every user turn opens with BOS; system folded into the first one.
        # Message text is stripped of surrounding whitespace, as the official template's `| trim`.
        name="llama2",
        trim=("user", "assistant"),
        prefix="",
        user="<s>[INST] {content} [/INST]",
        assistant=" {content} </s>",
        system_in_user="<<SYS>>\n{system}\n<</SYS>>\n\n{content}",
        stop="</s>",
    )
)
LLAMA3 = ChatTemplate(
    # Llama-3-Instruct (3.0): header blocks per role, each turn closed by <|eot_id|>.
    name="llama3",
    prefix="<|begin_of_text|>",
    system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user=(
        "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    assistant="{content}<|eot_id|>",
    stop="<|eot_id|>",
    trim=("system", "user", "assistant"),
    aliases=("llama-3", "llama3.0"),
)
_register(LLAMA3)
# Llama-3.1-Instruct: Llama 3's with a system block that is always written (its knowledge and
# "today" dates first) and Llama 3.1's JSON tool calls with `ipython` results.
_register(
    replace(
        LLAMA3,
        name="llama3.1",
        system_head="Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",
        tools=LLAMA_JSON,
        results_user="{content}<|start_header_id|>assistant<|end_header_id|>\n\n",
        aliases=("llama-3.1", "llama3_1"),
    )
)
_register(
    ChatTemplate(
        # Mistral-7B-Instruct v0.2 as its tokenizer now ships it (the 2024 template): a space before
        # each [INST] and each answer; a system prompt joins the first user turn.
        name="mistral",
        prefix="<s>",
        user=" [INST] {content} [/INST]",
        assistant=" {content}</s>",
        stop="</s>",
    )
)
_register(
    ChatTemplate(
        # Mistral-7B-Instruct v0.3 (the v3 tokenizer): no space before [INST] or [/INST], the answer
        # stripped after one space; the system prompt and the tools join the last user turn, and
        # calls and results are control-token blocks (MistralTools).
        name="mistral-v0.3",
        prefix="<s>",
        user="[INST] {content}[/INST]",
        assistant=" {content}</s>",
        system_turn="last",
        stop="</s>",
        trim=("assistant",),
        tools=MISTRAL_TOOLS,
        results_user="{content}",
        calls_assistant="{content}</s>",
        aliases=("mistral-v3", "mistral_v0.3"),
    )
)
_register(
    ChatTemplate(
        # Mistral-7B-Instruct v0.1/v0.2 as first released (2023): no space before [INST] or the
        # answer, no system role (lmforge folds a system prompt into the first user turn).
        name="mistral-2023",
        prefix="<s>",
        user="[INST] {content} [/INST]",
        assistant="{content}</s>",
        stop="</s>",
        aliases=("mistral-v0.2-2023",),
    )
)
CHATML = ChatTemplate(
    name="chatml",
    prefix="",
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    assistant="{content}<|im_end|>",
    separator="\n",
    stop="<|im_end|>",
    tools=HERMES,
)
_register(CHATML)
# Qwen2.5 is ChatML with a default system prompt.
_register(
    replace(
        CHATML,
        name="qwen2.5",
        default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        aliases=("qwen",),
    )
)
# Qwen2-VL is ChatML with its own default system prompt and vision tokens for each image
# (the processor later expands <|image_pad|> to one token per image patch).
_register(
    replace(
        CHATML,
        name="qwen2-vl",
        default_system="You are a helpful assistant.",
        image="<|vision_start|><|image_pad|><|vision_end|>",
        tools=None,  # Qwen2-VL's official template has no tool format
        aliases=("qwen2_vl",),
    )
)
_register(
    ChatTemplate(
        # DeepSeek-R1 distills: reasoning in <think>…</think> before the answer; earlier turns'
        # reasoning is dropped from the history and a generation prompt opens the <think> block,
        # as the official template does. The trained answer keeps its own reasoning.
        name="deepseek-r1",
        prefix="<｜begin▁of▁sentence｜>",
        system="{content}",
        user="<｜User｜>{content}<｜Assistant｜>",
        assistant="{content}<｜end▁of▁sentence｜>",
        stop="<｜end▁of▁sentence｜>",
        strip_history_thinking=True,
        generation_suffix="<think>\n",
        aliases=("deepseek_r1", "r1"),
    )
)
_register(
    ChatTemplate(
        name="alpaca",
        prefix="{bos}",
        system="{content}\n\n",
        user="### Instruction:\n{content}\n\n### Response:\n",
        assistant="{content}{eos}",
        separator="\n\n",
        default_system=(
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request."
        ),
    )
)
_register(
    ChatTemplate(
        # For base models with no chat format: prompt, newline, answer, EOS.
        name="plain",
        prefix="{bos}",
        system="{content}\n",
        user="{content}\n",
        assistant="{content}{eos}",
        separator="\n",
    )
)


def get_template(name: str) -> AnyTemplate:
    if name == "tokenizer":
        return TokenizerTemplate()
    try:
        return TEMPLATES[name]
    except KeyError:
        known = ", ".join(sorted({t.name for t in TEMPLATES.values()} | {"tokenizer"}))
        raise ValueError(f"unknown chat template `{name}`; known templates: {known}") from None


def guess_template(model_name: str) -> str | None:
    """A template name for a model id's family, or None when the name matches no family."""
    lowered = model_name.lower()
    if "deepseek-r1" in lowered or "r1-distill" in lowered:
        return "deepseek-r1"
    if "qwen2-vl" in lowered or "qwen2_vl" in lowered:
        return "qwen2-vl"
    if "qwen" in lowered:
        return "qwen2.5"
    if "mistral" in lowered:
        return "mistral-v0.3" if "v0.3" in lowered else "mistral"
    if "llama-2" in lowered or "llama2" in lowered:
        return "llama2"
    if "llama-3.1" in lowered or "llama3.1" in lowered:
        return "llama3.1"
    if "llama-3" in lowered or "llama3" in lowered:
        return "llama3"
    return None


def pick_template(
    name: str | None,
    saved: Iterable[str | None],
    tokenizer: PreTrainedTokenizerBase | None,
    model_name: str,
) -> AnyTemplate:
    """The one template resolution every command shares (train, chat, predict, serve, merge, ...).

    In order: `name` when given (and not `auto`); the first template lmforge saved with the
    adapter or model (`saved`, e.g. `[saved_template_name(adapter), saved_template_name(model)]`);
    the named template of the model's family, guessed from its name; the tokenizer's own Jinja
    `chat_template`; and ChatML for a tokenizer that has none.
    """
    if name and name != "auto":
        return get_template(name)
    chosen = next((s for s in saved if s), None) or guess_template(model_name)
    if chosen is None and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        chosen = "tokenizer"
    return get_template(chosen or "chatml")


# Generation prompts that tell the named templates apart: with a system prompt or none, after no
# earlier turn or after several.
_PROBES = (
    Conversation([("What is 2+2?", "")]),
    Conversation([("What is 2+2?", "")], system="Be brief."),
    Conversation([("hello", "hi there"), ("and you?", "fine"), ("bye", "")]),
    Conversation([("a", "b"), ("c", "")], system="S"),
)


def named_equivalent(tokenizer: PreTrainedTokenizerBase) -> ChatTemplate | None:
    """The named template whose generation prompts equal those of the tokenizer's Jinja
    `chat_template` on a few probe conversations, or None when no named template's do. A Jinja
    template that refuses a system prompt is compared on the probes without one."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    expected: list[tuple[Conversation, str]] = []
    for conversation in _PROBES:
        messages = [{"role": "system", "content": conversation.system}] if conversation.system else []
        for user, assistant in conversation.turns:
            messages.append({"role": "user", "content": user})
            if assistant:
                messages.append({"role": "assistant", "content": assistant})
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # jinja2's TemplateError, raised by the template itself (e.g. no system role)
            continue
        expected.append((conversation, text))
    if not expected:
        return None
    for template in dict.fromkeys(TEMPLATES.values()):
        if all(template.generation_prompt(c, tokenizer) == text for c, text in expected):
            return template
    return None
