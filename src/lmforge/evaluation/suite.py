"""Stage-comparison suites: test queries by category, loaded from YAML and scored offline.

A suite is a fixed set of prompts asked of every checkpoint of a run (base, SFT, DPO, ...), so
the stages can be read side by side. This module only loads suites and scores outputs; the
runner generates the outputs and draws the report.

Categories and what is checked (a user may add categories of their own: any string)::

    factual      a known answer: `expect` and/or `contains` (required)
    reasoning    a final answer: `expect` and/or `contains` (required)
    instruction  checkable constraints on the form of the answer: `constraints` (required)
    creative     shown, not graded; length and distinct-2 are reported; `constraints` optional
    code         a Python function: `code` (required); the code is parsed, never run
    paraphrase   one task in several phrasings (`group` + `prompts`), scored for accuracy and
                 consistency; `expect` and/or `contains` (required)

Any query may carry any of the checks; the table says which one its category requires. A group
may take another category than paraphrase (its phrasings are then checked by that category's
rule); consistency is reported for every group. A lone query cannot be a paraphrase: give it a
`group` and `prompts`.

Bundled suites live in `lmforge/assets/suite_<name>.yaml` (package data) and load by name;
`quickstart` is built in code from the quickstart's synthetic task (`quickstart_suite`).

Suite file format::

    name: general                 # optional; defaults to the file name without .yaml
    description: ...              # optional, free text
    queries:
      - id: capital-france        # unique; the runner lines stages up by id
        category: factual
        prompt: What is the capital of France? Answer with one word.
        expect: Paris             # the final answer equals this (see below)
      - id: hamlet
        category: factual
        prompt: Who wrote the play Hamlet?
        contains: [Shakespeare]   # any one of these appears in the answer (see below)
      - id: three-fruits
        category: instruction
        prompt: List three fruits as bullet points, all in lowercase.
        constraints: {bullets: 3, lowercase: true, max_words: 20}
      - id: code-add
        category: code
        prompt: Write a Python function add(a, b) that returns the sum.
        code: {function: add, args: 2}
      - group: sort-paraphrase    # expands to queries sort-paraphrase#1, #2, ... (group set)
        category: paraphrase      # optional for a group: paraphrase is the default
        expect: "1358"
        prompts: ["Sort the digits: 5183", "Put these digits in ascending order: 5183"]

Plain YAML scalars are read the YAML 1.2 way: only `true`/`false` are booleans and only plain
decimals are numbers, so `expect: 0123` stays "0123" (YAML 1.1 reads it as the octal 83),
`expect: 1:30` stays "1:30" (not 90) and `expect: no` stays "no".

How an output is checked (always after dropping a <think>...</think> trace and surrounding space):

* `expect`: the final answer (`lmforge.evaluation.answers`: last \\boxed{}, else the text after
  "answer is", else the last number, else the whole text) equals the expected answer
  (`answers.matches`); case, surrounding quotes and markdown emphasis are also forgiven, so
  "**paris**" matches Paris.
* `contains`: at least one of the strings occurs in the answer, case-insensitively and not inside
  a longer word ("4" is not found in "14").
* `constraints`: every one holds; each failure gives a reason. Case-insensitive unless noted:

      min_words / max_words: N     whitespace-separated words
      bullets: N                   exactly N lines starting with "-", "*" or "•" and a space
      numbered: N                  exactly N lines starting "1." or "1)"
      lowercase / uppercase: true  no letter of the other case (case-sensitive, of course)
      starts_with / ends_with: s   the answer starts / ends with s
      must_include: [s, ...]       every s occurs (substring)
      must_not_include: [s, ...]   no s occurs (substring)
      regex: pattern               re.search finds it (case-sensitive; anchor with ^ and $)
      json: true | [key, ...]      parses as JSON (a ```json fence is allowed); an object with keys
      max_sentences: N             sentences end in ".", "!" or "?" followed by space or the end
      max_chars: N                 characters, any script
* `code`: a ```python (or unlabelled) fenced block, or the whole text when there is no fence,
  parses with `ast.parse` and defines the named function at top level, callable with `args`
  positional arguments when `args` is given; with several blocks, one must. Model output is NEVER
  executed, compiled or imported: parsing only, so a suite can be run on untrusted checkpoints.
  Whether the code is correct is therefore not known.

An empty answer fails every checked query. A query with none of these checks (a creative prompt
without constraints) scores None (not checked) rather than a pass or a fail, and is left out of
pass rates.

Paraphrase consistency is the share of a group's phrasings whose answer equals the group's most
common answer. A phrasing's answer is the expected answer when its answer check passes (so two
right answers agree however they are worded), else its normalised final answer.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lmforge.config.base import closest
from lmforge.data.synthetic import INSTRUCTION as SORT_PROMPT
from lmforge.data.synthetic import PRETRAIN_LINE, make_task_split
from lmforge.evaluation.answers import extract_answer, matches, normalize, strip_reasoning

FACTUAL = "factual"
REASONING = "reasoning"
INSTRUCTION = "instruction"
CREATIVE = "creative"
CODE = "code"
PARAPHRASE = "paraphrase"
CATEGORIES = (FACTUAL, REASONING, INSTRUCTION, CREATIVE, CODE, PARAPHRASE)
# What each built-in category must carry; user-defined categories need nothing.
_REQUIRED_CHECK = {
    FACTUAL: "answer",
    REASONING: "answer",
    PARAPHRASE: "answer",
    INSTRUCTION: "constraints",
    CODE: "code",
}
_REQUIRED_HINT = {
    "answer": "`expect: <answer>` or `contains: [<string>, ...]`",
    "constraints": "`constraints: {...}` (e.g. {max_words: 50})",
    "code": "`code: {function: <name>}`",
}

_SUITE_KEYS = ("name", "description", "queries")
_QUERY_KEYS = ("id", "category", "prompt", "expect", "contains", "constraints", "code")
_GROUP_KEYS = ("group", "category", "prompts", "expect", "contains", "constraints", "code")
_CODE_KEYS = ("function", "args")
_PYTHON_FENCES = ("", "python", "py", "python3")


@dataclass(frozen=True)
class Query:
    """One prompt of a suite and what its output is checked against."""

    id: str
    category: str
    prompt: str
    expect: str | None = None
    contains: tuple[str, ...] = ()
    constraints: dict[str, Any] = field(default_factory=dict)
    code: dict[str, Any] | None = None
    group: str | None = None


# ---------------------------------------------------------------------------------------------
# Constraint checks: each takes the answer text and the constraint's value, and returns None when
# the constraint holds, else the reason it does not.

_BULLET = re.compile(r"^\s*[-*•]\s+\S", re.MULTILINE)
_NUMBERED = re.compile(r"^\s*\d+[.)]\s+\S", re.MULTILINE)
_SENTENCE_END = re.compile(r"[.!?]+(?:\s+|$)")
_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_JSON_FENCE = re.compile(r"\A```[ \t]*(?:json)?[ \t]*\n(.*)\n```\Z", re.DOTALL | re.IGNORECASE)


def _texts(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def check_min_words(text: str, n: int) -> str | None:
    """At least `n` words (split on whitespace)."""
    count = len(text.split())
    return None if count >= n else f"min_words: {count} words, at least {n} required"


def check_max_words(text: str, n: int) -> str | None:
    """At most `n` words (split on whitespace)."""
    count = len(text.split())
    return None if count <= n else f"max_words: {count} words, at most {n} allowed"


def check_bullets(text: str, n: int) -> str | None:
    """Exactly `n` lines that start with "-", "*" or "•" and a space."""
    count = len(_BULLET.findall(text))
    return None if count == n else f"bullets: {count} bullet lines, exactly {n} required"


def check_numbered(text: str, n: int) -> str | None:
    """Exactly `n` lines that start with a number and "." or ")" ("1. ...", "2) ...")."""
    count = len(_NUMBERED.findall(text))
    return None if count == n else f"numbered: {count} numbered lines, exactly {n} required"


def check_lowercase(text: str, value: bool = True) -> str | None:
    """No uppercase letter anywhere."""
    upper = [word for word in text.split() if word != word.lower()]
    return f"lowercase: has uppercase letters (first in {upper[0]!r})" if upper else None


def check_uppercase(text: str, value: bool = True) -> str | None:
    """No lowercase letter anywhere."""
    lower = [word for word in text.split() if word != word.upper()]
    return f"uppercase: has lowercase letters (first in {lower[0]!r})" if lower else None


def check_starts_with(text: str, prefix: str) -> str | None:
    """Starts with `prefix` (case-insensitive)."""
    if text.casefold().startswith(prefix.casefold()):
        return None
    return f"starts_with: starts with {text[: len(prefix) + 10]!r}, not {prefix!r}"


def check_ends_with(text: str, suffix: str) -> str | None:
    """Ends with `suffix` (case-insensitive)."""
    if text.casefold().endswith(suffix.casefold()):
        return None
    return f"ends_with: ends with {text[-(len(suffix) + 10) :]!r}, not {suffix!r}"


def check_must_include(text: str, needles: str | Sequence[str]) -> str | None:
    """Every one of the strings occurs (case-insensitive substring)."""
    missing = [needle for needle in _texts(needles) if needle.casefold() not in text.casefold()]
    return f"must_include: missing {', '.join(map(repr, missing))}" if missing else None


def check_must_not_include(text: str, needles: str | Sequence[str]) -> str | None:
    """None of the strings occurs (case-insensitive substring)."""
    found = [needle for needle in _texts(needles) if needle.casefold() in text.casefold()]
    return f"must_not_include: contains {', '.join(map(repr, found))}" if found else None


def check_regex(text: str, pattern: str) -> str | None:
    """`re.search(pattern, text)` finds a match (anchor with ^ and $ to match the whole answer)."""
    return None if re.search(pattern, text) else f"regex: no match for {pattern!r}"


def check_json(text: str, keys: bool | Sequence[str] = True) -> str | None:
    """Parses as JSON (a ```json fence around the whole answer is allowed); with a list of keys,
    is an object holding every one of them."""
    fenced = _JSON_FENCE.match(text)
    try:
        parsed = json.loads(fenced.group(1) if fenced else text)
    except json.JSONDecodeError as exc:
        return f"json: does not parse ({exc.msg} at line {exc.lineno} column {exc.colno})"
    if keys is True:
        return None
    if not isinstance(parsed, dict):
        return f"json: a {type(parsed).__name__}, not an object with keys {list(keys)}"
    missing = [key for key in keys if key not in parsed]
    return f"json: missing keys {missing}" if missing else None


def check_max_sentences(text: str, n: int) -> str | None:
    """At most `n` sentences (split after ".", "!" or "?" followed by space or the end)."""
    count = len([part for part in _SENTENCE_END.split(text) if part.strip()])
    return None if count <= n else f"max_sentences: {count} sentences, at most {n} allowed"


def check_max_chars(text: str, n: int) -> str | None:
    """At most `n` characters (any script)."""
    return None if len(text) <= n else f"max_chars: {len(text)} characters, at most {n} allowed"


ConstraintCheck = Callable[[str, Any], str | None]
# name -> (check, the kind of value it takes: count, flag, text, texts, pattern or keys)
CONSTRAINTS: dict[str, tuple[ConstraintCheck, str]] = {
    "min_words": (check_min_words, "count"),
    "max_words": (check_max_words, "count"),
    "bullets": (check_bullets, "count"),
    "numbered": (check_numbered, "count"),
    "lowercase": (check_lowercase, "flag"),
    "uppercase": (check_uppercase, "flag"),
    "starts_with": (check_starts_with, "text"),
    "ends_with": (check_ends_with, "text"),
    "must_include": (check_must_include, "texts"),
    "must_not_include": (check_must_not_include, "texts"),
    "regex": (check_regex, "pattern"),
    "json": (check_json, "keys"),
    "max_sentences": (check_max_sentences, "count"),
    "max_chars": (check_max_chars, "count"),
}
_VALUE_KINDS = {
    "count": "a whole number >= 0",
    "flag": "true (remove the constraint to turn it off)",
    "text": "a non-empty string",
    "texts": "a string or a non-empty list of strings",
    "pattern": "a regular expression (a string)",
    "keys": "true, or a list of keys the JSON object must hold",
}


def _valid_value(kind: str, value: Any) -> bool:
    if kind == "count":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    if kind == "flag":
        return value is True
    if kind == "text":
        return isinstance(value, str) and bool(value)
    if kind == "texts":
        items = [value] if isinstance(value, str) else value
        return isinstance(items, list) and bool(items) and all(isinstance(v, str) and v for v in items)
    if kind == "pattern":
        if not isinstance(value, str):
            return False
        try:
            re.compile(value)
        except re.error:
            return False
        return True
    return value is True or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    close = closest(name, known)
    return f"did you mean `{close}`? " if close else ""


# ---------------------------------------------------------------------------------------------
# Code checks: parse only, never run.


def _code_candidates(text: str) -> tuple[list[str], list[str]]:
    """(Python sources to try, languages of fenced blocks that were skipped)."""
    fences = _FENCE.findall(text)
    if not fences:
        return [text], []
    python = [body for lang, body in fences if lang.lower() in _PYTHON_FENCES]
    return python, [lang for lang, _ in fences if lang.lower() not in _PYTHON_FENCES]


def _arity_problem(fn: ast.FunctionDef | ast.AsyncFunctionDef, n: int) -> str | None:
    params = [*fn.args.posonlyargs, *fn.args.args]
    required = len(params) - len(fn.args.defaults)
    required_kw = [a.arg for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults, strict=True) if d is None]
    if required <= n and (n <= len(params) or fn.args.vararg is not None) and not required_kw:
        return None
    return f"`{fn.name}` cannot be called with {n} positional arguments ({ast.unparse(fn.args)})"


def check_code(text: str, function: str, args: int | None = None) -> str | None:
    """A Python block (or the whole text) parses and defines `function` at top level.

    Only `ast.parse` looks at the code: nothing in it is compiled, imported or executed.
    """
    sources, skipped = _code_candidates(text)
    if not sources:
        return f"code: no ```python block (found blocks in: {', '.join(skipped)})"
    problems = []
    for number, source in enumerate(sources, 1):
        where = f"block {number}" if len(sources) > 1 else "the code"
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
            line = getattr(exc, "lineno", None)
            problems.append(
                f"{where} does not parse ({type(exc).__name__}{f' at line {line}' if line else ''})"
            )
            continue
        defined = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        fn = next((n for n in defined if n.name == function), None)
        if fn is None:
            names = ", ".join(n.name for n in defined) or "no functions"
            problems.append(f"{where} defines no top-level function `{function}` (defines: {names})")
            continue
        problem = _arity_problem(fn, args) if args is not None else None
        if problem is None:
            return None
        problems.append(f"{where}: {problem}")
    return "code: " + "; ".join(problems)


# ---------------------------------------------------------------------------------------------
# Answer checks.


def _canon(answer: str) -> str:
    """An answer compared by content: normalised, without markdown emphasis or quotes, casefolded."""
    return normalize(normalize(answer).strip("*_`\"'“”‘’ ")).casefold()


def _matches_expect(text: str, expect: str) -> bool:
    # answers.matches, and also forgive case and markdown emphasis ("**paris**" is Paris).
    return matches(text, expect) or _canon(extract_answer(text)) in {
        _canon(expect),
        _canon(extract_answer(expect)),
    }


def _found(needle: str, text: str) -> bool:
    """Case-insensitive, and not inside a longer word where the needle starts/ends with one."""
    pattern = re.escape(needle)
    if re.match(r"\w", needle):
        pattern = r"(?<!\w)" + pattern
    if re.search(r"\w$", needle):
        pattern += r"(?!\w)"
    return re.search(pattern, text, re.IGNORECASE) is not None


def _answer_check(query: Query, text: str) -> tuple[str | None, str | None]:
    """(reason the answer is wrong or None, the matched expected answer or None)."""
    reasons, matched = [], None
    if query.expect is not None:
        if _matches_expect(text, query.expect):
            matched = query.expect
        else:
            reasons.append(f"answer {extract_answer(text)[:80]!r} is not {query.expect!r}")
    if query.contains:
        found = next((needle for needle in query.contains if _found(needle, text)), None)
        if found is None:
            reasons.append(f"none of {', '.join(map(repr, query.contains))} in the answer")
        matched = matched if matched is not None else found
    return ("; ".join(reasons) or None), (matched if not reasons else None)


def _answer_text(output: str) -> str:
    return strip_reasoning(output).strip()


def check(query: Query, output: str) -> tuple[bool | None, list[str]]:
    """(passed, reasons it failed); passed is None when the query has nothing to check."""
    text = _answer_text(output)
    has_answer = query.expect is not None or bool(query.contains)
    if not (has_answer or query.constraints or query.code):
        return None, []
    if not text:  # an empty answer would satisfy "at most", "must not" and "regex: x?" vacuously
        return False, ["empty answer"]
    reasons: list[str] = []
    if has_answer:
        wrong, _ = _answer_check(query, text)
        reasons += [wrong] if wrong else []
    for name, value in query.constraints.items():
        if name not in CONSTRAINTS:
            raise ValueError(f"query {query.id}: {_unknown_constraint(name)}")
        problem = CONSTRAINTS[name][0](text, value)
        reasons += [problem] if problem else []
    if query.code:
        problem = check_code(text, query.code["function"], query.code.get("args"))
        reasons += [problem] if problem else []
    return not reasons, reasons


def _unknown_constraint(name: str) -> str:
    hint = _did_you_mean(name, list(CONSTRAINTS))
    return f"unknown constraint `{name}`; {hint}known: {', '.join(CONSTRAINTS)}"


# ---------------------------------------------------------------------------------------------
# Scoring.


@dataclass
class SuiteScore:
    """Scores of one checkpoint's outputs on a suite."""

    per_query: list[dict[str, Any]]  # id, category, group, prompt, output, passed, reasons
    per_category: dict[str, dict[str, Any]]  # n, checked, pass_rate, mean_words, distinct_2
    paraphrase: dict[str, dict[str, Any]]  # n, accuracy, consistency, majority (the most common answer)
    overall_pass_rate: float | None


def distinct_n(texts: Sequence[str], n: int = 2) -> float | None:
    """Distinct n-grams over all n-grams of the texts (lowercased words); None when there are none."""
    grams = [
        tuple(words[i : i + n])
        for text in texts
        for words in [text.lower().split()]
        for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else None


def _rate(results: Sequence[bool | None]) -> float | None:
    checked = [r for r in results if r is not None]
    return sum(checked) / len(checked) if checked else None


def _answer_key(query: Query, output: str) -> str:
    """What a phrasing answered, for consistency: the expected answer when right, else its final answer."""
    text = _answer_text(output)
    _, matched = _answer_check(query, text)
    return _canon(matched if matched is not None else extract_answer(text))


def score_suite(queries: list[Query], outputs: list[str]) -> SuiteScore:
    """Check every output against its query; pass rates by category, paraphrase consistency by group."""
    if len(queries) != len(outputs):
        raise ValueError(f"{len(queries)} queries but {len(outputs)} outputs; give one output per query")
    per_query = []
    for query, output in zip(queries, outputs, strict=True):
        passed, reasons = check(query, output)
        per_query.append(
            {
                "id": query.id,
                "category": query.category,
                "group": query.group,
                "prompt": query.prompt,
                "output": output,
                "passed": passed,
                "reasons": reasons,
            }
        )
    per_category: dict[str, dict[str, Any]] = {}
    for category in dict.fromkeys(q.category for q in queries):
        rows = [row for row in per_query if row["category"] == category]
        texts = [_answer_text(row["output"]) for row in rows]
        per_category[category] = {
            "n": len(rows),
            "checked": sum(row["passed"] is not None for row in rows),
            "pass_rate": _rate([row["passed"] for row in rows]),
            "mean_words": sum(len(t.split()) for t in texts) / len(texts),
            "distinct_2": distinct_n(texts, 2),
        }
    paraphrase: dict[str, dict[str, Any]] = {}
    for group in dict.fromkeys(q.group for q in queries if q.group is not None):
        members = [(q, row) for q, row in zip(queries, per_query, strict=True) if q.group == group]
        keys = [_answer_key(q, row["output"]) for q, row in members]
        majority, count = Counter(keys).most_common(1)[0]
        paraphrase[group] = {
            "n": len(members),
            "accuracy": _rate([row["passed"] for _, row in members]),
            "consistency": count / len(members),
            "majority": majority,
        }
    return SuiteScore(per_query, per_category, paraphrase, _rate([row["passed"] for row in per_query]))


# ---------------------------------------------------------------------------------------------
# Loading.


class _SuiteLoader(yaml.SafeLoader):
    """YAML 1.2-style plain scalars: only true/false are booleans, only plain decimals are numbers."""


_SuiteLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag.rsplit(":", 1)[-1] not in ("bool", "int", "float", "timestamp")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SuiteLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_SuiteLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^-?(?:0|[1-9][0-9]*)$"), list("-0123456789")
)
_SuiteLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^-?(?:0|[1-9][0-9]*)\.[0-9]+$"), list("-0123456789")
)


def _bundled_dir() -> Any:
    return resources.files("lmforge") / "assets"


def bundled_suites() -> list[str]:
    """Names of the suites shipped with lmforge (`assets/suite_<name>.yaml`, and quickstart)."""
    folder = _bundled_dir()
    pattern = re.compile(r"suite_(\w[\w-]*)\.yaml")
    files = (
        [m.group(1) for p in folder.iterdir() if (m := pattern.fullmatch(p.name))] if folder.is_dir() else []
    )
    return sorted([*files, QUICKSTART])


def _resolve(source: str | Path) -> tuple[str, str, str]:
    """(where the suite is, for messages; its YAML text; its name unless the file gives one)."""
    looks_like_path = (
        isinstance(source, Path) or any(s in source for s in "/\\") or source.endswith((".yaml", ".yml"))
    )
    if looks_like_path or Path(source).is_file():
        path = Path(source)
        if not path.is_file():
            raise ValueError(
                f"suite file {path} not found; give a YAML file or a bundled suite name "
                f"({', '.join(bundled_suites())})"
            )
        return str(path), path.read_text(encoding="utf-8"), path.stem
    bundled = _bundled_dir() / f"suite_{source}.yaml"
    if not bundled.is_file():
        known = bundled_suites()
        raise ValueError(
            f"no suite file `{source}` and no bundled suite of that name; "
            f"{_did_you_mean(source, known)}bundled suites: {', '.join(known) or 'none'}"
        )
    return f"bundled suite `{source}` ({bundled})", bundled.read_text(encoding="utf-8"), source


def _scalar_text(value: Any) -> str | None:
    """A YAML scalar answer as text (numbers as written); None when it is not a string or number."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    return str(value)


def _parse_entry(entry: Any, where: str) -> list[Query]:
    """The queries of one entry of `queries:` (several for a paraphrase group)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping with id, category and prompt; got {entry!r}")
    is_group = "group" in entry or "prompts" in entry
    allowed = _GROUP_KEYS if is_group else _QUERY_KEYS
    for key in entry:
        if key not in allowed:
            kind = "a paraphrase group (its queries get ids <group>#1, #2, ...)" if is_group else "a query"
            raise ValueError(
                f"{where}: unknown key `{key}` in {kind}; {_did_you_mean(str(key), allowed)}"
                f"known keys: {', '.join(allowed)}"
            )
    name_key = "group" if is_group else "id"
    name = _scalar_text(entry.get(name_key))
    if not name:
        raise ValueError(
            f"{where}: missing `{name_key}` (a unique name for the {'group' if is_group else 'query'})"
        )
    where = f"{where} ({name_key} `{name}`)"

    category = entry.get("category", PARAPHRASE if is_group else None)
    if not isinstance(category, str) or not category.strip():
        raise ValueError(f"{where}: missing `category` ({', '.join(CATEGORIES)}, or a name of your own)")
    if category == PARAPHRASE and not is_group:
        raise ValueError(
            f"{where}: a paraphrase query needs `group: <name>` and `prompts: [...]`, not `id`/`prompt`"
        )

    if is_group:
        prompts = entry.get("prompts")
        if not isinstance(prompts, list) or len(prompts) < 2:
            raise ValueError(f"{where}: `prompts` must be a list of at least two phrasings")
    else:
        prompts = [entry.get("prompt")]
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            label = "a prompt in `prompts`" if is_group else "`prompt`"
            raise ValueError(f"{where}: {label} is missing or empty (got {prompt!r}); give the text to ask")

    expect = None
    if entry.get("expect") is not None:
        expect = _scalar_text(entry["expect"])
        if expect is None:
            raise ValueError(
                f"{where}: `expect` must be one answer (a string or number), got {entry['expect']!r}"
            )
    contains_raw = entry.get("contains", [])
    contains_list = [contains_raw] if not isinstance(contains_raw, list) else contains_raw
    contains = tuple(_scalar_text(c) or "" for c in contains_list)
    if any(not c for c in contains):
        raise ValueError(
            f"{where}: `contains` must be a string or a list of non-empty strings, got {contains_raw!r}"
        )

    constraints = {} if entry.get("constraints") is None else entry["constraints"]
    if not isinstance(constraints, dict):
        raise ValueError(
            f"{where}: `constraints` must be a mapping, e.g. {{max_words: 50}}; got {constraints!r}"
        )
    for key, value in constraints.items():
        if key not in CONSTRAINTS:
            raise ValueError(f"{where}: {_unknown_constraint(str(key))}")
        kind = CONSTRAINTS[key][1]
        if not _valid_value(kind, value):
            raise ValueError(f"{where}: constraint `{key}` must be {_VALUE_KINDS[kind]}; got {value!r}")

    code = entry.get("code")
    if code is not None:
        if not isinstance(code, dict):
            raise ValueError(
                f"{where}: `code` must be a mapping like {{function: add, args: 2}}; got {code!r}"
            )
        for key in code:
            if key not in _CODE_KEYS:
                raise ValueError(
                    f"{where}: unknown key `code.{key}`; {_did_you_mean(str(key), _CODE_KEYS)}"
                    f"known keys: {', '.join(_CODE_KEYS)}"
                )
        if not isinstance(code.get("function"), str) or not code["function"].isidentifier():
            raise ValueError(
                f"{where}: `code.function` must be a Python function name; got {code.get('function')!r}"
            )
        args = code.get("args")
        if args is not None and not _valid_value("count", args):
            raise ValueError(f"{where}: `code.args` must be a whole number >= 0; got {args!r}")

    needed = _REQUIRED_CHECK.get(category)
    present = {
        "answer": expect is not None or bool(contains),
        "constraints": bool(constraints),
        "code": bool(code),
    }
    if needed and not present[needed]:
        raise ValueError(f"{where}: a {category} query has nothing to check; add {_REQUIRED_HINT[needed]}")

    fields = {"expect": expect, "contains": contains, "constraints": constraints, "code": code}
    if not is_group:
        return [Query(id=name, category=category, prompt=prompts[0], **fields)]
    return [
        Query(id=f"{name}#{i}", category=category, prompt=prompt, group=name, **fields)
        for i, prompt in enumerate(prompts, 1)
    ]


def load_suite(source: str | Path) -> tuple[str, list[Query]]:
    """(name, queries) of a suite: a YAML file, or the name of a bundled suite ("general").

    Paraphrase groups come out as one query per phrasing, with ids "<group>#1", "<group>#2", ...
    Raises ValueError naming the file and the query for anything it cannot use.
    """
    if source == QUICKSTART:  # built in code from the synthetic task, not a file
        return QUICKSTART, quickstart_suite()
    where, text, default_name = _resolve(source)
    try:
        raw = yaml.load(text, Loader=_SuiteLoader)  # a SafeLoader: builds plain data only
    except yaml.YAMLError as exc:
        raise ValueError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping with `queries:` (a list of queries) at the top level")
    for key in raw:
        if key not in _SUITE_KEYS:
            raise ValueError(
                f"{where}: unknown top-level key `{key}`; {_did_you_mean(str(key), _SUITE_KEYS)}"
                f"known keys: {', '.join(_SUITE_KEYS)}"
            )
    entries = raw.get("queries")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: the suite has no queries; add a non-empty `queries:` list")
    queries: list[Query] = []
    seen: dict[str, int] = {}  # id -> index of its entry
    for index, entry in enumerate(entries):
        for query in _parse_entry(entry, f"{where}: queries[{index}]"):
            if query.id in seen:
                raise ValueError(
                    f"{where}: queries[{index}]: duplicate id `{query.id}` "
                    f"(also queries[{seen[query.id]}]); ids must be unique"
                )
            seen[query.id] = index
            queries.append(query)
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: `name` must be a non-empty string; got {name!r}")
    return name, queries


# ---------------------------------------------------------------------------------------------
# The quickstart's suite.

QUICKSTART = "quickstart"
QUICKSTART_SEED = 1234  # any seed: held-out items come from the held-out side of the split whatever the seed
QUICKSTART_REASONING = 20
QUICKSTART_GROUPS = 3
QUICKSTART_INSTRUCTION = 3


def quickstart_suite() -> list[Query]:
    """A suite for the quickstart's toy model, from held-out items of its sorting task.

    * reasoning: "Sort the digits: <d>" (the SFT phrasing), expecting the sorted digits;
    * paraphrase: three phrasings of a few items: the SFT phrasing, "Sort these digits: <d>" (one
      word changed) and "sort <d> ->" (the pre-training phrasing), so a model that has the skill
      can be right on more than the phrasing it was tuned on;
    * instruction: the SFT phrasing, with the format checked: digits only, no longer than the item.

    Deterministic: the same queries on every call.
    """
    n = QUICKSTART_REASONING + QUICKSTART_GROUPS + QUICKSTART_INSTRUCTION
    _, heldout = make_task_split(QUICKSTART_SEED, 0, n)
    items = [(example.prompt.rsplit(" ", 1)[-1], example.answer) for example in heldout]
    reasoning = items[:QUICKSTART_REASONING]
    grouped = items[QUICKSTART_REASONING : QUICKSTART_REASONING + QUICKSTART_GROUPS]
    formatted = items[QUICKSTART_REASONING + QUICKSTART_GROUPS :]

    queries = [
        Query(id=f"sort-{d}", category=REASONING, prompt=SORT_PROMPT.format(digits=d), expect=a)
        for d, a in reasoning
    ]
    for d, a in grouped:
        phrasings = [
            SORT_PROMPT.format(digits=d),
            f"Sort these digits: {d}",
            PRETRAIN_LINE.format(digits=d, answer="").rstrip(),
        ]
        queries += [
            Query(id=f"paraphrase-{d}#{i}", category=PARAPHRASE, prompt=p, expect=a, group=f"paraphrase-{d}")
            for i, p in enumerate(phrasings, 1)
        ]
    queries += [
        Query(
            id=f"digits-only-{d}",
            category=INSTRUCTION,
            prompt=SORT_PROMPT.format(digits=d),
            constraints={"regex": r"^[0-9]+$", "max_chars": len(d)},
        )
        for d, _ in formatted
    ]
    return queries
