"""`lmforge chat`: talk to a model in the terminal, with streaming and history."""

from __future__ import annotations

from rich.console import Console

from lmforge.data.templates import Conversation
from lmforge.inference.engine import Engine, SamplingParams

DEMO_PROMPTS = [
    "Hello! Who are you?",
    "Give me three tips for writing clear commit messages.",
    "What is 17 + 25?",
]

HELP = "commands: /reset clears the history, /exit quits"


def answer(
    engine: Engine,
    history: list[tuple[str, str]],
    message: str,
    params: SamplingParams,
    console: Console,
    system: str | None = None,
) -> str:
    """Stream one answer to the console and return it."""
    pieces = []
    console.print("[bold cyan]assistant[/]: ", end="")
    for piece in engine.stream(Conversation(turns=[*history, (message, "")], system=system), params):
        pieces.append(piece)
        console.print(piece, end="", markup=False, highlight=False)
    console.print()
    return "".join(pieces).strip()


def interactive(engine: Engine, params: SamplingParams, system: str | None = None) -> None:
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
        reply = answer(engine, history, message, params, console, system)
        history.append((message, reply))
