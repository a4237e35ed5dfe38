"""Reasoning models (DeepSeek-R1 style): the `<think>…</think>` trace apart from the answer.

A reasoning model writes its trace, then `</think>`, then the answer. The opening `<think>` may be in
the output or already in the prompt (the DeepSeek-R1 template ends the generation prompt with it),
so the trace is everything before the last `</think>`. Text without `</think>` is all answer, unless
it starts with `<think>`: then the model is still thinking (cut off), and it is all trace.
"""

from __future__ import annotations

from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
MODES = ("separate", "hide", "show")


def split_reasoning(text: str, opened: bool = False) -> tuple[str | None, str]:
    """(reasoning or None, answer). `opened`: the prompt already opened a `<think>` block."""
    if THINK_CLOSE in text:
        trace, _, answer = text.rpartition(THINK_CLOSE)
        return trace.replace(THINK_OPEN, "", 1).strip(), answer.strip()
    if opened or text.lstrip().startswith(THINK_OPEN):
        return text.replace(THINK_OPEN, "", 1).strip(), ""  # cut off while thinking
    return None, text


def prompt_opens_reasoning(prompt_text: str) -> bool:
    """Whether a generation prompt ends inside a `<think>` block (the DeepSeek-R1 template's does)."""
    return prompt_text.rstrip().endswith(THINK_OPEN)


@dataclass
class ReasoningStream:
    """Routes streamed text pieces to the trace or the answer as `</think>` goes by."""

    opened: bool = False  # the prompt opened the block: the model starts inside it
    mode: str = field(default="undecided")  # undecided, thinking, answering
    buffer: str = field(default="")

    def __post_init__(self) -> None:
        if self.opened:
            self.mode = "thinking"

    def feed(self, piece: str) -> tuple[str, str]:
        """(reasoning part, answer part) of this piece."""
        if self.mode == "answering":
            return "", piece
        self.buffer += piece
        if self.mode == "undecided":
            stripped = self.buffer.lstrip()
            if len(stripped) < len(THINK_OPEN) and THINK_OPEN.startswith(stripped):
                return "", ""  # could still become "<think>"
            if not stripped.startswith(THINK_OPEN):
                self.mode, text, self.buffer = "answering", self.buffer, ""
                return "", text
            self.mode, self.buffer = "thinking", stripped[len(THINK_OPEN) :]
        if THINK_CLOSE in self.buffer:
            trace, _, answer = self.buffer.partition(THINK_CLOSE)
            self.mode, self.buffer = "answering", ""
            return trace, answer.lstrip("\n")
        # Keep back a tail that might be the start of "</think>".
        keep = max(
            (n for n in range(1, len(THINK_CLOSE)) if self.buffer.endswith(THINK_CLOSE[:n])), default=0
        )
        out, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep :]
        return out, ""

    def flush(self) -> tuple[str, str]:
        """What is held back at the end of the stream."""
        held, self.buffer = self.buffer, ""
        return (held, "") if self.mode == "thinking" else ("", held)
