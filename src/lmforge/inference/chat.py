"""`lmforge chat`: talk to a model in the terminal, with streaming and history."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from lmforge.data.templates import IMAGE_PLACEHOLDER, Conversation
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
    history: list[tuple[str, str]],
    message: str,
    params: SamplingParams,
    console: Console,
    system: str | None = None,
    images: list[Path] | None = None,
    hide_reasoning: bool = False,
) -> str:
    """Stream one answer to the console and return it. `images` go with the conversation's first
    message (`message` itself when the history is empty). `hide_reasoning` prints a reasoning
    model's answer without its <think> trace."""
    pieces = []
    console.print("[bold cyan]assistant[/]: ", end="")
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
) -> None:
    console = Console()
    console.print(f"[dim]template {engine.template.name} · {HELP}[/]")
    history: list[tuple[str, str]] = []
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
            history.clear()
            console.print("[dim]history cleared[/]")
            continue
        if message == "/system" or message.startswith("/system "):
            system = message.removeprefix("/system").strip() or None
            history.clear()
            console.print(f"[dim]system prompt {'set' if system else 'cleared'}; history cleared[/]")
            continue
        if not history:
            message = with_images(message, images or [])
        reply = answer(engine, history, message, params, console, system, images, hide_reasoning)
        history.append((message, reply))
