"""Function-calling accuracy (docs/tools.md): does the model call the right tools with the right
arguments, and answer directly when no call is expected?

Records are tool-use chats as lmforge trains on them (docs/tools.md): their tools, and a last
assistant turn whose `tool_calls` are the expected calls (none: a direct answer is expected).
The model answers the conversation before that turn; its calls are read back in the template's
tool format. Scored as the public function-calling leaderboards score simple and parallel calls
(AST-style: calls compared as names and arguments, not as text):

- `call_accuracy`: it calls when calls are expected, and answers without one when none are;
- `name_accuracy`: of the items expecting calls, those whose called names are the expected ones
  (as a multiset: parallel calls in any order);
- `exact_match`: of those, the calls equal the expected ones, arguments included;
- `argument_accuracy`: of every expected argument (of a call matched by name), the share given
  the expected value;
- `unparsed`: answers that write a call block the format cannot read.

Argument values are compared after JSON normalisation: numbers as numbers (2 == 2.0), strings
without surrounding whitespace and case, lists and objects element by element.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from lmforge.data.formats import Example
from lmforge.data.templates import ToolCall
from lmforge.inference.engine import Engine, SamplingParams
from lmforge.inference.predict import prompt_conversation


def normalize(value: Any) -> Any:
    """A JSON value as compared: numbers as floats, strings stripped and case-folded."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        return value.strip().casefold()
    if isinstance(value, list):
        return [normalize(v) for v in value]
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items()}
    return value


def _key(call: ToolCall) -> tuple[str, str]:
    return call.name, repr(sorted((k, repr(v)) for k, v in normalize(call.arguments).items()))


def score_calls(expected: tuple[ToolCall, ...], predicted: tuple[ToolCall, ...]) -> dict[str, Any]:
    """One item's scores (see the module docstring); `arguments` is (matched, expected) counts."""
    names_match = Counter(c.name for c in expected) == Counter(c.name for c in predicted)
    exact = Counter(map(_key, expected)) == Counter(map(_key, predicted))
    matched, total, unused = 0, 0, list(predicted)
    for call in expected:
        total += len(call.arguments)
        partner = next((p for p in unused if p.name == call.name), None)
        if partner is None:
            continue
        unused.remove(partner)
        given = normalize(partner.arguments)
        matched += sum(k in given and given[k] == v for k, v in normalize(call.arguments).items())
    return {
        "called": bool(predicted) == bool(expected),
        "names": names_match,
        "exact": exact,
        "arguments": (matched, total),
    }


def evaluate_function_calls(
    engine: Engine,
    examples: list[Example],
    params: SamplingParams,
    batch_size: int = 8,
    system: str | None = None,
) -> dict:
    form = engine.template.tool_format(engine.tokenizer)
    if form is None:
        raise ValueError(
            f"the template {engine.template.name} has no tool format to read calls back with; evaluate "
            "with a template that has one (qwen2.5, chatml) (docs/tools.md)"
        )
    if not any(e.tools for e in examples):
        raise ValueError(
            "no record offers tools: a function_calling task needs tool-use records (docs/tools.md)"
        )
    conversations = [prompt_conversation(e, system) for e in examples]
    outputs = engine.generate(conversations, params, batch_size)
    rows = []
    for example, output in zip(examples, outputs, strict=True):
        expected = example.calls.get(len(example.turns) - 1, ())
        _, predicted = form.parse(output)
        score = score_calls(expected, predicted)
        rows.append(
            {
                "where": example.where,
                "output": output,
                "expected": [c.as_message()["function"] for c in expected],
                "calls": [c.as_message()["function"] for c in predicted],
                "unparsed": not predicted and "<tool_call>" in output,
                **score,
                "correct": score["called"] and (score["exact"] or not expected),
            }
        )
    calling = [r for r in rows if r["expected"]]
    matched = sum(r["arguments"][0] for r in calling)
    total = sum(r["arguments"][1] for r in calling)
    return {
        "call_accuracy": sum(r["called"] for r in rows) / len(rows),
        "name_accuracy": sum(r["names"] for r in calling) / len(calling) if calling else None,
        "exact_match": sum(r["exact"] for r in calling) / len(calling) if calling else None,
        "argument_accuracy": matched / total if total else None,
        "unparsed": sum(r["unparsed"] for r in rows),
        "items": len(rows),
        "items_with_calls": len(calling),
        "failures": [r for r in rows if not r["correct"]][:5],
        "_rows": rows,
    }
