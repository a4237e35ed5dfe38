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
                out += [{"role": "tool", "content": result} for result in self.results[i]]
            else:
                out.append({"role": "user", "content": user})
            if i in self.calls:
                calls = [call.as_message() for call in self.calls[i]]
                out.append({"role": "assistant", "content": assistant, "tool_calls": calls})
            elif assistant or i < len(self.turns) - 1:
                out.append({"role": "assistant", "content": assistant})
        return out


def tool_json(value: Any) -> str:
    """JSON as chat templates write it (transformers' `tojson`: no ASCII escaping, `, ` and `: `)."""
    return json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True)
class ToolFormat:
    """How a chat format writes tools, calls and results (Hermes-style: Qwen2.5's template).

    The offered functions go in the system prompt (after the system text); each call is a
    `<tool_call>` block of JSON after the answer's text; a turn of tool results is a user turn of
    `<tool_response>` blocks."""

    name: str = "hermes"

    def system(self, system: str | None, tools: tuple[dict[str, Any], ...]) -> str:
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

    def answer(self, content: str, calls: tuple[ToolCall, ...]) -> str:
        blocks = [
            f'<tool_call>\n{{"name": "{call.name}", "arguments": {tool_json(call.arguments)}}}\n</tool_call>'
            for call in calls
        ]
        return "\n".join([content, *blocks] if content else blocks)

    def results(self, results: tuple[str, ...]) -> str:
        return "\n".join(f"<tool_response>\n{result}\n</tool_response>" for result in results)

    def call_prefix(self, tokenizer: PreTrainedTokenizerBase, name: str | None = None) -> str:
        """The start of a call block, to begin an answer with so that it must call (a tool, or the
        function `name`): cut at the last token boundary of the written call within that start, so
        the prompt ends where training's tokens did (a prompt ending inside a token reads as a
        different text)."""
        text = self.answer("", (ToolCall(name or "f", {}),))
        wanted = len(f'<tool_call>\n{{"name": "{name}"') if name else len("<tool_call>")
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return text[: max([end for _, end in offsets if end <= wanted], default=0)]

    def parse(self, text: str) -> tuple[str, tuple[ToolCall, ...]]:
        """(content, calls) of a generated answer: the text before its first `<tool_call>` block and
        the calls of every block. Text whose blocks are not each a call's JSON (a name and an
        object of arguments) comes back whole as content, with no calls."""
        blocks = _TOOL_CALL.findall(text)
        if not blocks:
            return text, ()
        calls = []
        for block in blocks:
            call = _json_object(block)
            arguments = call.get("arguments", {}) if call else None
            if isinstance(arguments, str):  # some models write the arguments as a JSON string
                arguments = _json_object(arguments)
            if call is None or not isinstance(call.get("name"), str) or not isinstance(arguments, dict):
                return text, ()
            calls.append(ToolCall(name=call["name"], arguments=arguments))
        return text.split("<tool_call>", 1)[0].strip(), tuple(calls)


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


HERMES = ToolFormat()
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
    system: str = ""  # a system block before the first user turn; "" = fold into first user turn
    system_in_user: str = "{system}\n\n{content}"  # how a folded system joins the first user turn
    stop: str = "{eos}"  # the token whose generation ends a response
    default_system: str | None = None
    strip_history_thinking: bool = False  # drop <think>…</think> from earlier assistant turns
    image: str = IMAGE_PLACEHOLDER  # what a record's <image> placeholder becomes in the prompt
    generation_suffix: str = ""  # written after the prompt only when asking for an answer
    trim: bool = False  # strip whitespace around every message, as Llama-2's official template does
    tools: ToolFormat | None = None  # how tools, calls and results are written (None: no tool format)
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

    def segments(
        self, conversation: Conversation, tokenizer: PreTrainedTokenizerBase
    ) -> list[tuple[str, str]]:
        """(prompt text, response text) per turn; joined they are the full conversation."""
        system = conversation.system if conversation.system is not None else self.default_system
        if conversation.uses_tools:
            if self.tools is None:
                raise ValueError(
                    f"data.template {self.name} has no format for tools and tool calls, and this data "
                    "has them (docs/tools.md); use qwen2.5 or chatml (Hermes-style <tool_call>), or "
                    "data.template: tokenizer with a tokenizer whose chat_template takes tools"
                )
            if conversation.tools:
                system = self.tools.system(system, conversation.tools)
        pairs: list[tuple[str, str]] = []
        last = len(conversation.turns) - 1
        for i, (user, assistant) in enumerate(conversation.turns):
            if i in conversation.results:
                user = self.tools.results(conversation.results[i])  # type: ignore[union-attr]
            if i in conversation.calls:
                assistant = self.tools.answer(assistant, conversation.calls[i])  # type: ignore[union-attr]
            prompt = ""
            if i == 0:
                prompt += self._fill(self.prefix, tokenizer)
                if system and self.system:
                    prompt += self._fill(self.system, tokenizer, system)
                elif system:
                    user = self.system_in_user.replace("{system}", system).replace("{content}", user)
            else:
                prompt += self._fill(self.separator, tokenizer)
            if self.image != IMAGE_PLACEHOLDER:
                user = user.replace(IMAGE_PLACEHOLDER, self.image)
            if self.trim:  # after folding the system in, as the official template strips
                user, assistant = user.strip(), assistant.strip()
            prompt += self._fill(self.user, tokenizer, user)
            if self.strip_history_thinking and i < last and "</think>" in assistant:
                assistant = assistant.split("</think>")[-1]  # as the official template: keeps what follows
            pairs.append((prompt, self._fill(self.assistant, tokenizer, assistant)))
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
        """An equivalent Jinja chat template (messages with system/user/assistant roles).

        `tokenizer` is not read here: the template names `bos_token`/`eos_token`, which the
        tokenizer fills in when it renders. It is taken so that code holding either kind of
        template (`AnyTemplate`) calls `jinja(tokenizer)` alike; `TokenizerTemplate.jinja` needs it.
        """

        def lit(pattern: str, content_expr: str) -> str:
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
            return " + ".join(out) if out else "''"

        text = "(content | trim)" if self.trim else "content"  # trimmed after the system is folded in
        folded = self.system_in_user.replace("{system}", "' + system + '")
        folded_expr = "'" + folded.replace("\n", "\\n").replace("{content}", "' + content + '") + "'"
        default = repr(self.default_system) if self.default_system is not None else "none"
        history_strip = (
            "{%- if loop.index0 < last_user and '</think>' in content -%}"
            "{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
            if self.strip_history_thinking
            else ""
        )
        tool_system, tool_turn, tool_calls = self._tool_jinja()
        return (
            "{%- set system = none -%}"
            "{%- set msgs = messages -%}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system = messages[0]['content'] -%}{%- set msgs = messages[1:] -%}"
            "{%- endif -%}"
            f"{{%- if system is none -%}}{{%- set system = {default} -%}}{{%- endif -%}}"
            + tool_system
            + "{%- set ns = namespace(turn=0, last_user=0, tool='', text='') -%}"
            "{%- for m in msgs -%}{%- if m['role'] in ('user', 'tool') -%}"
            "{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
            "{%- set last_user = ns.last_user -%}"
            f"{{{{- {lit(self.prefix, 'content')} -}}}}"
            "{%- for m in msgs -%}{%- set content = m['content'] -%}{%- set role = m['role'] -%}"
            + tool_turn
            + "{%- if role == 'user' -%}"
            "{%- if ns.turn == 0 and system -%}"
            + (
                f"{{{{- {lit(self.system, 'system')} -}}}}"
                if self.system
                else f"{{%- set content = {folded_expr} -%}}"
            )
            + "{%- endif -%}"
            f"{{%- if ns.turn > 0 -%}}{{{{- {lit(self.separator, 'content')} -}}}}{{%- endif -%}}"
            + (
                f"{{%- set content = content.replace({IMAGE_PLACEHOLDER!r}, {self.image!r}) -%}}"
                if self.image != IMAGE_PLACEHOLDER
                else ""
            )
            + f"{{{{- {lit(self.user, text)} -}}}}"
            "{%- set ns.turn = ns.turn + 1 -%}"
            "{%- elif role == 'assistant' -%}"
            + tool_calls
            + history_strip
            + f"{{{{- {lit(self.assistant, text)} -}}}}"
            "{%- endif -%}{%- endfor -%}"
            + (
                "{%- if add_generation_prompt and msgs and msgs[-1]['role'] == 'user' -%}"
                f"{{{{- {self.generation_suffix!r} -}}}}{{%- endif -%}}"
                if self.generation_suffix
                else ""
            )
        )

    def _tool_jinja(self) -> tuple[str, str, str]:
        """The Jinja pieces that write tools into the system prompt, a run of `tool` messages as one
        user turn of results, and an assistant message's `tool_calls` (as `self.tools` does; "" for
        a template without a tool format)."""
        if self.tools is None:
            return "", "", ""
        # The fixed text around the tools list, from the Python format itself (one source).
        probe = self.tools.system(None, ({"TOOLS": 0},)).split('\n{"TOOLS": 0}')
        system = (
            "{%- if tools -%}{%- set listed = namespace(text='') -%}{%- for tool in tools -%}"
            "{%- set listed.text = listed.text + '\\n' + (tool | tojson) -%}{%- endfor -%}"
            f"{{%- set system = ((system + '\\n\\n') if system else '') + {probe[0]!r} + listed.text + "
            f"{probe[1]!r} -%}}{{%- endif -%}}"
        )
        turn = (
            "{%- if role == 'tool' -%}"
            "{%- set block = '<tool_response>\\n' + content + '\\n</tool_response>' -%}"
            "{%- set ns.tool = (ns.tool + '\\n' + block) "
            "if loop.index0 > 0 and msgs[loop.index0 - 1]['role'] == 'tool' else block -%}"
            "{%- set content = ns.tool -%}"
            "{%- set role = 'held' "
            "if not loop.last and msgs[loop.index0 + 1]['role'] == 'tool' else 'user' -%}"
            "{%- endif -%}"
        )
        calls = (
            "{%- if m['tool_calls'] is defined and m['tool_calls'] -%}{%- set ns.text = content or '' -%}"
            "{%- for call in m['tool_calls'] -%}"
            "{%- set f = call['function'] if call['function'] is defined else call -%}"
            "{%- set block = '<tool_call>\\n{\"name\": \"' + f['name'] + '\", \"arguments\": ' + "
            "(f['arguments'] | tojson) + '}\\n</tool_call>' -%}"
            "{%- set ns.text = (ns.text + '\\n' + block) if ns.text else block -%}{%- endfor -%}"
            "{%- set content = ns.text -%}{%- endif -%}"
        )
        return system, turn, calls


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
        Hermes-style when it writes `<tool_call>` blocks (Qwen2.5, Hermes, many ChatML models)."""
        return HERMES if "<tool_call>" in (getattr(tokenizer, "chat_template", None) or "") else None

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
                "chatml)"
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
        trim=True,
        prefix="",
        user="<s>[INST] {content} [/INST]",
        assistant=" {content} </s>",
        system_in_user="<<SYS>>\n{system}\n<</SYS>>\n\n{content}",
        stop="</s>",
    )
)
_register(
    ChatTemplate(
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
        aliases=("llama-3", "llama3.0"),
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
        return "mistral"
    if "llama-2" in lowered or "llama2" in lowered:
        return "llama2"
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
