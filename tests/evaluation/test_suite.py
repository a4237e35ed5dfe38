"""Stage-comparison suites: loading and its errors, every check, scores computed by hand."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from lmforge.data.synthetic import is_heldout_item
from lmforge.evaluation.suite import (
    CATEGORIES,
    CONSTRAINTS,
    Query,
    bundled_suites,
    check,
    check_code,
    distinct_n,
    load_suite,
    quickstart_suite,
    score_suite,
)


def write_suite(tmp_path: Path, body: str, name: str = "suite.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


# --- constraint checks: (name, value, a passing text, a failing text, words in the reason) ---------

CASES = [
    ("min_words", 3, "one two three", "one two", "2 words"),
    ("max_words", 3, "one two three", "one two three four", "4 words"),
    ("bullets", 2, "- apple\n* pear", "- apple\n**bold** text\n• pear\n- plum", "3 bullet"),
    ("numbered", 3, "1. a\n2) b\n3. c", "1. a\n2. b\n2.5 is a number", "2 numbered"),
    ("lowercase", True, "all small here 42.", "all small Here", "'Here'"),
    ("uppercase", True, "ALL BIG, 42!", "ALL BIG here", "'here'"),
    ("starts_with", "Leaves", "leaves fall!", "The leaves fall", "'Leaves'"),
    ("ends_with", "!", "leaves fall!", "leaves fall.", "'!'"),
    ("must_include", ["River", "lantern"], "a river and a Lantern", "a river only", "'lantern'"),
    ("must_not_include", ["blue"], "green sea", "deep BLUE sea", "'blue'"),
    ("regex", r"^\d+$", "1358", "1358 is it", "no match"),
    ("json", True, '```json\n{"a": 1}\n```', "{'a': 1}", "does not parse"),
    ("json", ["name", "age"], '{"name": "Ann", "age": 3}', '{"name": "Ann"}', "['age']"),
    ("json", ["name"], '{"name": 1}', '["name"]', "list"),
    ("max_sentences", 2, "One. Two has 2.5 parts!", "One. Two! Three?", "3 sentences"),
    ("max_chars", 4, "abcd", "abcde", "5 characters"),
]


def test_every_constraint_has_a_case():
    assert {case[0] for case in CASES} == set(CONSTRAINTS)


@pytest.mark.parametrize(("name", "value", "good", "bad", "reason_part"), CASES)
def test_constraint_passes_and_fails_with_a_reason(name, value, good, bad, reason_part):
    query = Query(id="q", category="instruction", prompt="p", constraints={name: value})
    assert check(query, good) == (True, [])
    passed, reasons = check(query, bad)
    assert passed is False and len(reasons) == 1
    assert reasons[0].startswith(f"{name}:") and reason_part in reasons[0]


def test_constraints_read_the_answer_after_the_reasoning_trace():
    query = Query(id="q", category="instruction", prompt="p", constraints={"max_words": 1})
    assert check(query, "<think>a long chain of Thought</think>\n  1358 ")[0] is True


def test_all_failing_constraints_are_reported():
    query = Query(id="q", category="instruction", prompt="p", constraints={"lowercase": True, "max_chars": 3})
    passed, reasons = check(query, "Hello")
    assert passed is False and [r.split(":")[0] for r in reasons] == ["lowercase", "max_chars"]


# --- answer checks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "passed"),
    [("Paris", True), ("**paris**.", True), ("The answer is Paris.", True), ("Lyon", False), ("", False)],
)
def test_expect_compares_the_final_answer(output, passed):
    assert check(Query(id="q", category="factual", prompt="p", expect="Paris"), output)[0] is passed


def test_expect_uses_final_answer_extraction():
    query = Query(id="q", category="reasoning", prompt="p", expect="42")
    assert check(query, "6 * 7 = 42, so it is \\boxed{42}") == (True, [])
    assert check(query, "20 + 22 makes 42.0") == (True, [])
    passed, reasons = check(query, "I think 41")
    assert passed is False and "'41'" in reasons[0]


def test_contains_is_any_of_and_whole_words():
    query = Query(id="q", category="factual", prompt="p", contains=("carbon dioxide", "CO2"))
    assert check(query, "Plants take in co2 from the air.")[0] is True
    assert check(query, "Carbon Dioxide.")[0] is True
    assert check(query, "Oxygen.")[0] is False
    four = Query(id="q", category="factual", prompt="p", contains=("4",))
    assert check(four, "It has 14 legs")[0] is False
    assert check(four, "It has 4 legs")[0] is True


def test_nothing_to_check_is_none():
    assert check(Query(id="q", category="creative", prompt="Write a poem."), "A poem.") == (None, [])
    assert check(Query(id="q", category="creative", prompt="Write a poem."), "") == (None, [])


def test_an_empty_answer_fails_even_constraints_it_would_meet():
    query = Query(id="q", category="instruction", prompt="p", constraints={"must_not_include": ["blue"]})
    assert check(query, "green")[0] is True
    assert check(query, " <think>blue</think> ") == (False, ["empty answer"])


# --- code checks: parsed, never run ---------------------------------------------------------------


def test_code_check_passes_a_fenced_function():
    output = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nUse it as add(1, 2)."
    query = Query(id="q", category="code", prompt="p", code={"function": "add", "args": 2})
    assert check(query, output) == (True, [])
    assert check_code("def add(a, b=0, *rest):\n    return a + b", "add", 2) is None  # no fence: whole text


@pytest.mark.parametrize(
    ("output", "reason_part"),
    [
        ("```python\ndef add(a, b)\n    return a + b\n```", "does not parse"),
        ("```python\ndef plus(a, b):\n    return a + b\n```", "no top-level function `add` (defines: plus)"),
        (
            "```python\nclass A:\n    def add(self, a, b):\n        return a\n```",
            "no top-level function `add`",
        ),
        ("```python\ndef add(a):\n    return a\n```", "cannot be called with 2"),
        ("```javascript\nfunction add(a, b) { return a + b }\n```", "no ```python block"),
    ],
)
def test_code_check_fails_with_a_reason(output, reason_part):
    passed, reasons = check(
        Query(id="q", category="code", prompt="p", code={"function": "add", "args": 2}), output
    )
    assert passed is False and reason_part in reasons[0]


def test_code_check_never_runs_model_output(tmp_path):
    marker = tmp_path / "marker"
    output = textwrap.dedent(
        f"""
        ```python
        import os
        open({str(marker)!r}, "w").write("ran")
        os._exit(1)

        def add(a, b=open({str(marker)!r}, "w")):
            return a + b
        ```
        """
    )
    query = Query(id="q", category="code", prompt="p", code={"function": "add", "args": 2})
    assert check(query, output) == (True, [])  # reached at all: os._exit(1) did not run
    assert not marker.exists()


# --- scores ---------------------------------------------------------------------------------------


def test_paraphrase_accuracy_and_consistency_by_hand():
    group = [
        Query(id=f"sort#{i}", category="paraphrase", prompt=f"p{i}", expect="1358", group="sort")
        for i in (1, 2, 3)
    ]
    score = score_suite(group, ["1358", "The answer is 1358.", "1385"])
    assert score.paraphrase["sort"] == {"n": 3, "accuracy": 2 / 3, "consistency": 2 / 3, "majority": "1358"}
    # Consistently wrong is consistent, and not accurate.
    score = score_suite(group, ["1385", "1385", "1538"])
    assert score.paraphrase["sort"]["accuracy"] == 0.0
    assert score.paraphrase["sort"]["consistency"] == 2 / 3
    assert score.paraphrase["sort"]["majority"] == "1385"


def test_paraphrase_right_answers_agree_however_worded():
    group = [
        Query(id=f"j#{i}", category="paraphrase", prompt="p", contains=("Tokyo",), group="j") for i in (1, 2)
    ]
    score = score_suite(group, ["Tokyo.", "The capital of Japan is Tokyo."])
    assert score.paraphrase["j"]["consistency"] == 1.0


def test_per_category_pass_rates_by_hand():
    queries = [
        Query(id="f1", category="factual", prompt="p", expect="Paris"),
        Query(id="f2", category="factual", prompt="p", expect="4"),
        Query(id="i1", category="instruction", prompt="p", constraints={"max_words": 2}),
        Query(id="c1", category="creative", prompt="p"),
        Query(id="c2", category="creative", prompt="p", constraints={"min_words": 3}),
        Query(id="m1", category="my-own", prompt="p"),
    ]
    outputs = ["Paris", "5", "too many words here", "the sea the sea", "a b", "x"]
    score = score_suite(queries, outputs)
    factual, instruction = score.per_category["factual"], score.per_category["instruction"]
    assert (factual["n"], factual["checked"], factual["pass_rate"]) == (2, 2, 0.5)
    assert (instruction["checked"], instruction["pass_rate"]) == (1, 0.0)
    creative = score.per_category["creative"]
    assert (creative["n"], creative["checked"], creative["pass_rate"]) == (2, 1, 0.0)
    assert creative["mean_words"] == (4 + 2) / 2
    # bigrams: (the sea) (sea the) (the sea) (a b) -> 3 distinct of 4
    assert creative["distinct_2"] == 3 / 4
    assert score.per_category["my-own"]["pass_rate"] is None
    assert score.overall_pass_rate == 1 / 4  # f1 passes; f2, i1, c2 fail; c1 and m1 are not checked
    assert [row["passed"] for row in score.per_query] == [True, False, False, None, False, None]
    assert score.per_query[1]["reasons"] and score.per_query[1]["output"] == "5"
    assert score.paraphrase == {}


def test_distinct_n_and_output_count():
    assert distinct_n(["a a a"], 2) == 1 / 2
    assert distinct_n(["one"], 2) is None
    with pytest.raises(ValueError, match="2 queries but 1 outputs"):
        score_suite([Query(id="a", category="x", prompt="p")] * 2, ["o"])


# --- loading --------------------------------------------------------------------------------------


def test_load_suite_expands_groups_and_keeps_answers_as_written(tmp_path):
    path = write_suite(
        tmp_path,
        """
        queries:
          - {id: a, category: reasoning, prompt: "Sort 3201", expect: 0123}
          - id: b
            category: factual
            prompt: Time?
            expect: 1:30
            contains: no
          - {id: c, category: instruction, prompt: p, constraints: {must_include: river, lowercase: true}}
          - {id: d, category: code, prompt: p, code: {function: add}}
          - {id: e, category: my-own, prompt: Anything}
          - group: g
            expect: 7
            prompts: [one, two]
        """,
        name="mine.yaml",
    )
    name, queries = load_suite(path)
    assert name == "mine"
    assert [q.id for q in queries] == ["a", "b", "c", "d", "e", "g#1", "g#2"]
    assert queries[0].expect == "0123"  # YAML 1.1 would read the octal 83
    assert (queries[1].expect, queries[1].contains) == ("1:30", ("no",))  # not 90 and False
    assert queries[2].constraints == {"must_include": "river", "lowercase": True}
    assert queries[5] == Query(id="g#1", category="paraphrase", prompt="one", expect="7", group="g")
    assert load_suite(str(path)) == (name, queries)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("queries: []", "no queries"),
        ("name: x", "no queries"),
        ("querys: []", "did you mean `queries`"),
        ("queries:\n  - {id: a, category: factual, expect: x}", "queries[0] (id `a`): `prompt` is missing"),
        (
            "queries:\n  - {id: a, category: factual, prompt: p, expect: x}\n"
            "  - {id: a, category: factual, prompt: q, expect: y}",
            "queries[1]: duplicate id `a` (also queries[0])",
        ),
        (
            "queries:\n  - {id: a, category: factual, prompt: p}",
            "a factual query has nothing to check; add `expect",
        ),
        ("queries:\n  - {id: a, category: reasoning, prompt: p}", "(id `a`): a reasoning query has nothing"),
        ("queries:\n  - {id: a, category: instruction, prompt: p}", "add `constraints"),
        ("queries:\n  - {id: a, category: code, prompt: p}", "add `code"),
        ("queries:\n  - {group: g, prompts: [a, b]}", "a paraphrase query has nothing to check"),
        ("queries:\n  - {group: g, expect: 1, prompts: [a]}", "at least two phrasings"),
        ("queries:\n  - {id: a, category: paraphrase, prompt: p, expect: 1}", "needs `group: <name>`"),
        (
            "queries:\n  - {id: a, category: factual, prompt: p, expcet: x}",
            "unknown key `expcet` in a query; did you mean `expect`?",
        ),
        ("queries:\n  - {group: g, expect: 1, prompt: a}", "did you mean `prompts`?"),
        (
            "queries:\n  - {id: a, category: instruction, prompt: p, constraints: {max_word: 3}}",
            "(id `a`): unknown constraint `max_word`; did you mean `max_words`? known: min_words, max_words",
        ),
        (
            "queries:\n  - {id: a, category: instruction, prompt: p, constraints: {max_words: -1}}",
            "a whole number >= 0",
        ),
        (
            "queries:\n  - {id: a, category: instruction, prompt: p, constraints: {lowercase: false}}",
            "must be true",
        ),
        (
            "queries:\n  - {id: a, category: instruction, prompt: p, constraints: {regex: '('}}",
            "a regular expression",
        ),
        (
            "queries:\n  - {id: a, category: code, prompt: p, code: {function: add, arg: 2}}",
            "did you mean `args`?",
        ),
        (
            "queries:\n  - {id: a, category: code, prompt: p, code: {function: 'no way'}}",
            "a Python function name",
        ),
        ("queries:\n  - {category: factual, prompt: p, expect: x}", "queries[0]: missing `id`"),
        ("queries:\n  - {id: a, prompt: p, expect: x}", "missing `category`"),
        (
            "queries:\n  - {id: a, category: factual, prompt: p, expect: [x, y]}",
            "`expect` must be one answer",
        ),
        ("queries: [", "not valid YAML"),
    ],
)
def test_load_suite_errors_name_the_file_and_the_query(tmp_path, body, message):
    path = write_suite(tmp_path, body)
    with pytest.raises(ValueError) as error:
        load_suite(path)
    assert str(error.value).startswith(str(path)) and message in str(error.value)


def test_load_suite_unknown_file_or_name(tmp_path):
    with pytest.raises(ValueError, match="suite file .*missing.yaml not found"):
        load_suite(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="did you mean `general`.*bundled suites: general, quickstart"):
        load_suite("generla")


# --- shipped suites -------------------------------------------------------------------------------


def test_bundled_general_suite_is_valid_and_checkable():
    assert "general" in bundled_suites()
    name, queries = load_suite("general")
    assert name == "general" and 25 <= len(queries) <= 40
    assert {q.category for q in queries} == set(CATEGORIES)
    assert len({q.id for q in queries}) == len(queries)
    for query in queries:
        passed, _ = check(query, "some answer")
        assert passed is not None or query.category == "creative", query.id
        if query.expect is not None or query.contains:  # its own reference answer passes its answer check
            bare = Query(
                id=query.id, category=query.category, prompt="", expect=query.expect, contains=query.contains
            )
            assert check(bare, query.expect or query.contains[0]) == (True, []), query.id
    groups = {q.group for q in queries if q.group}
    assert len(groups) >= 2 and all(sum(q.group == g for q in queries) >= 2 for g in groups)


def test_quickstart_suite_is_deterministic_and_correct():
    queries = quickstart_suite()
    assert queries == quickstart_suite() and load_suite("quickstart") == ("quickstart", queries)
    assert "quickstart" in bundled_suites()
    assert len({q.id for q in queries}) == len(queries)
    by_category = {
        c: [q for q in queries if q.category == c] for c in ("reasoning", "paraphrase", "instruction")
    }
    assert len(by_category["reasoning"]) == 20 and len(by_category["instruction"]) >= 2
    for query in by_category["reasoning"] + by_category["paraphrase"]:
        digits = query.prompt.removesuffix(" ->").rsplit(" ", 1)[-1]
        assert query.expect == "".join(sorted(digits)) and is_heldout_item(digits), query.id
        assert check(query, query.expect) == (True, [])
    groups = {q.group for q in by_category["paraphrase"]}
    assert len(groups) == 3 and len(by_category["paraphrase"]) == 9
    prompts = [q.prompt for q in by_category["paraphrase"][:3]]
    assert (
        prompts[0].startswith("Sort the digits: ")
        and prompts[2].startswith("sort ")
        and prompts[2].endswith("->")
    )
    for query in by_category["instruction"]:
        digits = query.prompt.rsplit(" ", 1)[-1]
        assert check(query, "".join(sorted(digits))) == (True, [])
        assert check(query, f"{''.join(sorted(digits))}.")[0] is False
    # The right answers score 100%, on every group consistently.
    score = score_suite(queries, [q.expect or "".join(sorted(q.prompt.rsplit(" ", 1)[-1])) for q in queries])
    assert score.overall_pass_rate == 1.0
    assert all(group["consistency"] == 1.0 for group in score.paraphrase.values())
