"""`lmforge chat`: talk to a model in the terminal, with streaming and history; with `--tools`, the
model's tool calls are shown and the user types each call's result (docs/tools.md)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rich.console import Console

from lmforge.data.templates import IMAGE_PLACEHOLDER, Conversation, tool_json
from lmforge.inference.engine import Engine, SamplingParams
from lmforge.inference.reasoning import ReasoningStream, prompt_opens_reasoning

DEMO_PROMPTS = [
    "Hello! Who are you?",
    "Give me three tips for writing clear commit messages.",
    "What is 17 + 25?",
]

HELP = "commands: /reset clears the history, /system TEXT sets the system prompt (and resets), /exit quits"


def with_images(message: str, images: list[Path]) -> str:
    """The message with one `<image>` per image in front, unless it places them itself."""
    if not images or IMAGE_PLACEHOLDER in message:
        return message
    return IMAGE_PLACEHOLDER * len(images) + message


def answer(
    engine: Engine,
    history: list[tuple[str, str]] | Conversation,
    message: str,
    params: SamplingParams,
    console: Console,
    system: str | None = None,
    images: list[Path] | None = None,
    hide_reasoning: bool = False,
) -> str:
    """Stream one answer to the console and return it. `history` is the turns so far (a
    `Conversation` when it holds tools, calls and results); `message` the new user message (or,
    when the history's next turn holds tool results, ignored). `images` go with the
    conversation's first message. `hide_reasoning` prints a reasoning model's answer without its
    <think> trace."""
    pieces = []
    console.print("[bold cyan]assistant[/]: ", end="")
    if isinstance(history, Conversation):
        conversation = dataclasses.replace(history, turns=[*history.turns, (message, "")], system=system)
    else:
        conversation = Conversation(turns=[*history, (message, "")], system=system)
    router = ReasoningStream(opened=prompt_opens_reasoning(engine.prompt_text(conversation)))
    try:
        for piece in engine.stream(conversation, params, images):
            pieces.append(piece)
            shown = router.feed(piece)[1] if hide_reasoning else piece
            console.print(shown, end="", markup=False, highlight=False)
    except BaseException:
        console.print()  # a failed generation's error goes on a line of its own
        raise
    if hide_reasoning:
        console.print(router.flush()[1], end="", markup=False, highlight=False)
    console.print()
    return "".join(pieces).strip()


def interactive(
    engine: Engine,
    params: SamplingParams,
    system: str | None = None,
    images: list[Path] | None = None,
    hide_reasoning: bool = False,
    tools: tuple[dict[str, Any], ...] = (),
) -> None:
    console = Console()
    form = engine.template.tool_format(engine.tokenizer) if tools else None
    if tools and form is None:
        raise ValueError(
            f"--tools: the chat template {engine.template.name} has no tool format; use --template "
            "qwen2.5, chatml, llama3.1 or mistral-v0.3 (docs/tools.md)"
        )
    console.print(f"[dim]template {engine.template.name} · {HELP}[/]")
    history = Conversation(turns=[], tools=tools)
    while True:
        try:
            message = console.input("[bold green]you[/]: ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not message:
            continue
        if message in ("/exit", "/quit"):
            return
        if message == "/reset":
            history = Conversation(turns=[], tools=tools)
            console.print("[dim]history cleared[/]")
            continue
        if message == "/system" or message.startswith("/system "):
            system = message.removeprefix("/system").strip() or None
            history = Conversation(turns=[], tools=tools)
            console.print(f"[dim]system prompt {'set' if system else 'cleared'}; history cleared[/]")
            continue
        if not history.turns:
            message = with_images(message, images or [])
        while True:  # answer, and again after the results of each round of tool calls
            reply = answer(engine, history, message, params, console, system, images, hide_reasoning)
            content, calls = form.parse(reply) if form is not None else (reply, ())
            turn = len(history.turns)
            history.turns.append((message, content if calls else reply))
            if not calls:
                break
            history.calls[turn] = calls
            results = []
            for call in calls:
                console.print("[bold magenta]tool call[/]: ", end="")
                console.print(f"{call.name}({tool_json(call.arguments)})", markup=False, highlight=False)
                results.append(console.input(f"[bold magenta]result of {call.name}[/]: "))
            history.results[turn + 1] = tuple(results)
            message = ""
