"""lmforge's imports form the DAG `../shared/DESIGN.md` draws: between packages, and between
modules. Every import counts, a function's lazy one too; only `if TYPE_CHECKING:` blocks (annotations)
are left out."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "lmforge"

# What each part may import (besides itself). Bottom to top: config; artifacts (atomic writes,
# versions, model cards); lab (the decoder architecture); adapters; models; data; losses, optim;
# training (what drivers share); inference; evaluation; export; methods (every stage, the
# dispatcher); pipeline; the front ends (cli, wizard).
LOW = {"config", "artifacts", "distributed"}
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "distributed": set(),  # which process this is: read from the launcher's environment
    "artifacts": {"config"},
    "lab": LOW,
    "adapters": LOW,
    "models": LOW | {"lab", "adapters"},
    "data": LOW | {"models"},
    "losses": LOW,
    "optim": LOW,
    "training": LOW | {"lab", "adapters", "models", "data", "losses", "optim"},
    "inference": LOW | {"adapters", "models", "data"},
    "evaluation": LOW | {"models", "data", "inference"},
    "export": LOW | {"adapters", "models", "data", "inference"},
    "methods": LOW
    | {"lab", "adapters", "models", "data", "losses", "optim", "training", "inference", "evaluation"},
    "pipeline": LOW | {"lab", "models", "data", "training", "inference", "evaluation", "export", "methods"},
    "wizard": LOW | {"lab", "data", "pipeline"},
    "cli": set(),  # filled below: the CLI may import anything
}
ALLOWED["cli"] = set(ALLOWED) - {"cli"}
ALLOWED["__main__"] = {"cli"}  # `python -m lmforge`: the CLI, as launchers call it


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "lmforge"


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports() -> dict[str, set[str]]:
    """module -> the lmforge modules it imports (`from a import b` counts `a.b` when that is a module)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    out: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                ]
            for target in targets:
                if target.startswith("lmforge.") and target in modules and target != name:
                    out[name].add(target)
    return out


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (as a path), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for source, targets in imports().items():
        for target in targets:
            if part(source) != part(target):
                graph[part(source)].add(part(target))
    return graph


def test_every_arrow_between_parts_is_one_the_design_allows():
    wrong = sorted(
        f"{source} -> {target}"
        for source, targets in package_graph().items()
        for target in targets
        if target not in ALLOWED.get(source, set())
    )
    assert not wrong, "imports DESIGN.md does not allow: " + ", ".join(wrong)


def test_nothing_imports_the_cli():
    importers = [s for s, targets in imports().items() if "lmforge.cli" in targets]
    assert importers in ([], ["lmforge.__main__"]), importers


def test_parts_and_modules_have_no_import_cycle():
    assert cycle(package_graph()) is None
    assert cycle(imports()) is None


def test_the_checker_finds_a_cycle_and_a_forbidden_arrow():
    """The checks have teeth."""
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    assert "cli" not in ALLOWED["pipeline"] and "methods" not in ALLOWED["inference"]
    assert "evaluation" not in ALLOWED["training"] and "training" not in ALLOWED["evaluation"]
