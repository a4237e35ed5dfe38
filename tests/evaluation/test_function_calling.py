"""The function-calling eval task (docs/tools.md): calls read back from generated text in the
template's format, scored as names and normalised arguments (AST-style), against hand counts."""

from __future__ import annotations

import json

import pytest

from lmforge.data.formats import to_example
from lmforge.data.templates import HERMES, ToolCall, get_template
from lmforge.data.tool_task import eval_records
from lmforge.evaluation.tools import evaluate_function_calls, score_calls


def block(name, arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def test_hermes_calls_are_read_back_and_broken_ones_stay_text():
    text = "Checking.\n" + block("add", {"a": 1, "b": 2}) + "\n" + block("colour", {"fruit": "lime"})
    assert HERMES.parse(text) == (
        "Checking.",
        (ToolCall("add", {"a": 1, "b": 2}), ToolCall("colour", {"fruit": "lime"})),
    )
    as_string = '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1}"}\n</tool_call>'
    assert HERMES.parse(as_string)[1] == (ToolCall("add", {"a": 1}),)
    for broken in (
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',
        "plain",
    ):
        assert HERMES.parse(broken) == (broken, ())
    # What the template writes, it reads back.
    calls = (ToolCall("add", {"a": 3, "b": 4}),)
    assert HERMES.parse(HERMES.answer("", calls)) == ("", calls)


def test_scores_count_names_arguments_and_order_free_parallel_calls():
    add, lime = ToolCall("add", {"a": 2, "b": 3}), ToolCall("colour", {"fruit": "lime"})
    assert score_calls((add, lime), (lime, ToolCall("add", {"a": 2.0, "b": 3}))) == {
        "called": True,
        "names": True,
        "exact": True,
        "arguments": (3, 3),
    }  # parallel calls in any order; 2 == 2.0
    assert score_calls((add,), (ToolCall("add", {"a": 2, "b": 4}),))["arguments"] == (1, 2)
    assert score_calls((lime,), (ToolCall("colour", {"fruit": " Lime "}),))["exact"]  # case, space
    assert score_calls((add,), ()) == {"called": False, "names": False, "exact": False, "arguments": (0, 2)}
    assert score_calls((), ())["called"] and not score_calls((), (add,))["called"]


class Scripted:
    """An engine whose answers are given: the task's reading and scoring, without a model."""

    def __init__(self, answers: list[str], tokenizer) -> None:
        self.answers, self.tokenizer, self.template = answers, tokenizer, get_template("qwen2.5")
        self.prompts: list[str] = []

    def generate(self, conversations, params, batch_size):
        self.prompts = [self.template.generation_prompt(c, self.tokenizer) for c in conversations]
        return self.answers


def test_the_task_scores_every_item_and_prompts_with_the_tools(tokenizer):
    records = eval_records(40, 1)
    examples = [to_example(r, f"held.json #{i}", "messages") for i, r in enumerate(records)]
    expected = [e.calls.get(0, ()) for e in examples]
    answers = []
    for i, calls in enumerate(expected):
        if not calls:
            answers.append(
                "Hello! How can I help?" if i % 2 else block("add", {"a": 1, "b": 1})
            )  # half wrong
        elif i % 3 == 0:
            answers.append(block(calls[0].name, {}))  # right tool, no arguments
        else:
            answers.append(HERMES.answer("", calls))
    engine = Scripted(answers, tokenizer)
    metrics = evaluate_function_calls(engine, examples, params=None, batch_size=8)
    with_calls = [i for i, calls in enumerate(expected) if calls]
    without = [i for i, calls in enumerate(expected) if not calls]
    assert metrics["items"] == 40 and metrics["items_with_calls"] == len(with_calls)
    assert metrics["call_accuracy"] == pytest.approx((len(with_calls) + sum(i % 2 for i in without)) / 40)
    assert metrics["name_accuracy"] == 1.0
    assert metrics["exact_match"] == pytest.approx(sum(i % 3 != 0 for i in with_calls) / len(with_calls))
    args = [len(expected[i][0].arguments) for i in with_calls]
    right = sum(n for i, n in zip(with_calls, args, strict=True) if i % 3 != 0)
    assert metrics["argument_accuracy"] == pytest.approx(right / sum(args))
    assert all("<tools>" in p and '"name": "add"' in p for p in engine.prompts)  # the tools reach the prompt
    assert all(p.endswith("<|im_start|>assistant\n") for p in engine.prompts)


def test_a_template_without_a_tool_format_is_refused(tokenizer):
    examples = [to_example(r, "h #0", "messages") for r in eval_records(2, 1)]
    engine = Scripted(["x", "y"], tokenizer)
    engine.template = get_template("llama3")
    with pytest.raises(ValueError, match="template llama3 has no tool format to read calls back"):
        evaluate_function_calls(engine, examples, params=None)
