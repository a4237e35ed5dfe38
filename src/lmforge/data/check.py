"""`lmforge data check`: read every record, count what would go wrong, show what the model sees.

Unlike training, which stops at the first bad records, the check goes on after a malformed
record so one run lists every problem. Errors (exit 1): malformed records, records of the wrong
kind for the stage, empty responses, image/placeholder mismatches, missing images. Warnings:
examples that would be truncated, and those left with no trainable token after truncation.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table
from rich.text import Text
from transformers import PreTrainedTokenizerBase

from lmforge.config.data import DataConfig
from lmforge.data.files import DataError
from lmforge.data.formats import Example, problems
from lmforge.data.loader import normalised, prepare
from lmforge.data.multimodal import VisionProcessor, encode_multimodal
from lmforge.data.registry import resolve
from lmforge.data.templates import AnyTemplate
from lmforge.data.tokenize import IGNORE, fit_segments

PROBLEM_NAMES = {
    "malformed": "malformed records",
    "wrong_kind": "records of the wrong kind",
    "empty_response": "empty responses",
    "identical_pair": "pairs with identical chosen and rejected",
    "empty_prompt": "empty prompts",
    "image_mismatch": "image/placeholder mismatches",
    "missing_image": "missing image files",
    "image_cut": "images cut by max_length",
    "unknown_tool": "calls to a tool not in the record's tools",
    "tools_unsupported": "tool records for a stage that drops them",
    "template": "records the chat template cannot write",
}


@dataclass
class CheckReport:
    needs: str
    records: Counter = field(default_factory=Counter)  # per dataset
    kinds: Counter = field(default_factory=Counter)
    problems: Counter = field(default_factory=Counter)
    examples_of_problems: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # tokens per example (full, before truncation)
    truncated: int = 0
    no_trainable: int = 0
    samples: list[list[tuple[str, bool]]] = field(default_factory=list)  # (text, trained) pieces
    tool_records: int = 0  # records offering tools or making calls
    tool_calls: int = 0
    tool_results: int = 0

    @property
    def errors(self) -> int:
        return sum(self.problems.values())

    def percentile(self, q: float) -> int:
        ordered = sorted(self.lengths)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] if ordered else 0

    def note(self, code: str, message: str) -> None:
        self.problems[code] += 1
        if len(self.examples_of_problems) < 10:
            self.examples_of_problems.append(message)


def _pieces(ids: list[int], labels: list[int], tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, bool]]:
    """Runs of consecutive tokens with the same trained/masked state, decoded."""
    pieces: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != IGNORE) != (labels[start] != IGNORE):
            pieces.append((tokenizer.decode(ids[start:i]), labels[start] != IGNORE))
            start = i
    return pieces


def _measure(
    example: Example,
    report: CheckReport,
    tokenizer: PreTrainedTokenizerBase | None,
    template: AnyTemplate | None,
    max_length: int,
    train_on: str,
    sample: bool,
    vision: VisionProcessor | None = None,
) -> None:
    if tokenizer is None or template is None:
        texts = [example.text] if example.text is not None else [t for turn in example.turns for t in turn]
        report.lengths.append(sum(len(t) for t in texts if t))
        return
    if example.kind == "text":
        length = len(tokenizer(example.text or "", add_special_tokens=False)["input_ids"]) + 1
        report.lengths.append(length)
        return
    if vision is not None and example.images and sample:
        _measure_with_images(example, report, tokenizer, template, max_length, train_on, vision)
        return
    responses = [example.response] + ([example.rejected] if example.rejected is not None else [])
    longest = 0
    for response_index, response in enumerate(responses):
        conversation = example.conversation(response)
        segments = template.encode(conversation, tokenizer)  # once: the whole and the cut rows
        full, _ = fit_segments(segments, 10**9, train_on)
        cut, truncated = fit_segments(segments, max_length, train_on)
        longest = max(longest, len(full["input_ids"]) if full else 0)
        report.truncated += int(truncated)
        if cut is None and example.kind != "prompt":
            report.no_trainable += 1
        if sample and cut is not None and len(report.samples) < 2 and response_index == 0:
            report.samples.append(_pieces(cut["input_ids"], cut["labels"], tokenizer))
    report.lengths.append(longest)


def _measure_with_images(example, report, tokenizer, template, max_length, train_on, vision) -> None:
    """A vision-language model's length: each image counts as the tokens it will take."""
    try:
        row = encode_multimodal(example, template, tokenizer, vision, 10**9, train_on)
    except DataError as exc:
        report.note("malformed", str(exc))
        return
    if row is None:
        report.no_trainable += 1
        return
    ids = row["input_ids"]
    if len(report.samples) < 2:
        report.samples.append(_pieces(ids[:max_length], row["labels"][:max_length], tokenizer))
    report.lengths.append(len(ids))
    report.truncated += int(len(ids) > max_length)
    report.no_trainable += int(all(label == IGNORE for label in row["labels"][:max_length]))
    last = max(i for i, t in enumerate(ids) if t == vision.image_token_id)
    if last >= max_length:
        report.note(
            "image_cut",
            f"{example.where}: its image tokens end at token {last + 1}, past data.max_length={max_length}; "
            "raise data.max_length or lower data.max_pixels",
        )


def check_data(
    data: DataConfig,
    needs: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    template: AnyTemplate | None = None,
    vision: VisionProcessor | None = None,
) -> CheckReport:
    """Read every record of every dataset in `data` and report (never raises for a bad record).
    With `vision` (a vision-language model's image side) images count as their image tokens.

    Raises DataError when there is nothing to report on: a dataset that cannot be found, or a
    file of which not one record can be read (empty, not JSON as a whole, not UTF-8)."""
    report = CheckReport(needs=needs)
    rng = random.Random(data.seed)
    for source in data.sources():
        resolved = resolve(source, data.dataset_dir)
        report.records[resolved.name] = 0
        try:
            for where, example in normalised(resolved, needs, keep_going=True):
                report.records[resolved.name] += 1
                if isinstance(example, DataError):
                    report.note("malformed", str(example))
                    continue
                example = prepare(example, data, rng)
                report.kinds[example.kind] += 1
                report.tool_records += int(example.uses_tools)
                report.tool_calls += sum(len(calls) for calls in example.calls.values())
                report.tool_results += sum(len(results) for results in example.results.values())
                found = problems(example, needs)
                for code, message in found:
                    report.note(code, f"{where} {message}")
                try:
                    _measure(
                        example,
                        report,
                        tokenizer,
                        template,
                        data.max_length,
                        data.train_on,
                        not found,
                        vision,
                    )
                except ValueError as exc:  # the template cannot write it (tools without a tool format)
                    report.note("template", f"{where}: {exc}")
        except DataError as exc:  # a file that cannot be read on: broken JSON file, bad encoding
            if not report.records[resolved.name]:
                raise
            report.note("malformed", str(exc))
        if not report.records[resolved.name]:
            raise DataError(f"dataset `{resolved.name}` has no records")
    return report


def print_report(report: CheckReport, console: Console, unit: str = "tokens") -> None:
    table = Table(title=f"data check (for a stage reading {report.needs} records)", show_header=False)
    for name, count in report.records.items():
        table.add_row(f"records in {name}", str(count))
    table.add_row("kinds", ", ".join(f"{k}: {v}" for k, v in report.kinds.items()) or "-")
    if report.tool_records:
        table.add_row(
            "tool use",
            f"{report.tool_records} records · {report.tool_calls} calls · {report.tool_results} results",
        )
    if report.lengths:
        table.add_row(
            f"length ({unit})",
            f"p50 {report.percentile(0.5)} · p90 {report.percentile(0.9)} · p99 {report.percentile(0.99)} "
            f"· max {max(report.lengths)}",
        )
    if unit == "tokens":
        table.add_row("would be truncated", str(report.truncated))
        table.add_row("no trainable token left", str(report.no_trainable))
    for code, name in PROBLEM_NAMES.items():
        table.add_row(
            name, str(report.problems.get(code, 0)), style="red" if report.problems.get(code) else None
        )
    console.print(table)
    for message in report.examples_of_problems:
        console.print(f"[red]error[/]: {message}", highlight=False)
    for i, pieces in enumerate(report.samples, start=1):
        console.print(f"[bold]example {i}[/] ([dim]prompt, masked[/] · [bold green]trained[/]):")
        text = Text()
        for piece, trained in pieces:
            text.append(f"⟦{piece}⟧" if trained else piece, style="bold green" if trained else "dim")
        console.print(text)
