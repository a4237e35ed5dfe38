"""The comparison report of an eval run: markdown (results.md) and self-contained HTML
(report.html, plots inlined; the PNGs also in plots/).

Models are columns in the order the config lists them (base, SFT, DPO, ...), so each column's
change against the one before it is what that stage did. For every task: its headline metrics
side by side with that change; for multiple choice, every subject's accuracy; for suites,
per-category pass rates, paraphrase consistency, the queries each stage newly passed or failed,
and every answer side by side. Plots keep their legend outside the axes, so it covers no bar;
perplexity is drawn on a log axis (a base model's hundreds beside a tuned model's units).
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

from lmforge.config.eval import EvalConfig
from lmforge.evaluation.benchmarks import category_of

HIGHER, LOWER, NEUTRAL = "higher", "lower", "neutral"


def slug(name: str) -> str:
    """A folder name for a model or task name: never empty, never `..` (stays inside output_dir)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def headline(kind: str, metrics: dict) -> list[tuple[str, float | None, str]]:
    """(label, value, which direction is better) of the metrics a reader compares first."""
    if kind == "perplexity":
        return [("perplexity", metrics["perplexity"], LOWER), ("NLL / token", metrics["nll"], LOWER)]
    if kind == "multiple_choice":
        rows = [
            ("accuracy", metrics["accuracy"], HIGHER),
            ("subject macro", metrics["subject_macro"], HIGHER),
        ]
        rows += [(f"{c}", v, HIGHER) for c, v in metrics["per_category"].items()]
        counts = [("no letter (generate)", "no_letter", LOWER), ("fewer shots", "fewer_shots", NEUTRAL)]
        counts.append(("cropped questions", "cropped", NEUTRAL))
        return rows + [(label, metrics[key], better) for label, key, better in counts if key in metrics]
    if kind == "generation":
        names = ("exact_match", "rouge1", "rouge2", "rougeL", "bleu", "bertscore_f1")
        return [(n, metrics[n], HIGHER) for n in names if n in metrics]
    if kind == "reasoning":
        return [
            ("accuracy", metrics["accuracy"], HIGHER),
            ("think compliance", metrics["think_compliance"], HIGHER),
            ("cut off", metrics["cut_off"], LOWER),
            ("completion tokens (mean)", metrics["completion_tokens"].get("mean"), NEUTRAL),
            ("reasoning tokens (mean)", metrics["reasoning_tokens"].get("mean"), NEUTRAL),
        ]
    if kind == "multimodal":
        return [("accuracy", metrics["accuracy"], HIGHER)]
    if kind == "suite":
        rows = [("pass rate", metrics["pass_rate"], HIGHER)]
        rows += [(f"{c} pass rate", v["pass_rate"], HIGHER) for c, v in metrics["per_category"].items()]
        groups = list(metrics["paraphrase"].values())
        if groups:  # per group in results.json; the means here
            rows += [
                ("paraphrase consistency", sum(g["consistency"] for g in groups) / len(groups), HIGHER),
                ("paraphrase accuracy", sum(g["accuracy"] for g in groups) / len(groups), HIGHER),
            ]
        return rows
    if kind == "harness":  # sample_len is how many documents the task scored, not a score
        return [
            (f"{t} {m}", v, HIGHER) for t, ms in metrics.items() for m, v in ms.items() if m != "sample_len"
        ]
    return []


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"
    return f"{value:.3f}"


def _delta(value: float | None, before: float | None, better: str) -> str:
    if value is None or before is None or fmt(value) == fmt(before):
        return ""
    sign = "+" if value > before else "−"
    good = (value > before) == (better == HIGHER) if better != NEUTRAL else None
    mark = {True: " ▲", False: " ▼", None: ""}[good]
    return f" ({sign}{fmt(abs(value - before))}{mark})"


def task_table(results: dict, task) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per headline metric, one column per model (with its change)."""
    return side_by_side(results, task, lambda metrics: headline(task.kind, metrics), "metric")


def subject_table(results: dict, task) -> tuple[list[str], list[list[str]]]:
    """A multiple-choice task's accuracy per subject (with its category), one column per model."""

    def subjects(metrics: dict) -> list[tuple[str, float | None, str]]:
        per_subject = metrics.get("per_subject", {})
        return [(f"{s} ({category_of(task.benchmark, s)})", v, HIGHER) for s, v in per_subject.items()]

    return side_by_side(results, task, subjects, "subject (category)")


def side_by_side(results: dict, task, lines_of, first: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per label `lines_of(metrics)` gives, one column per model."""
    models = [m for m in results if task.name in results[m]]
    lines = {m: lines_of(results[m][task.name]) for m in models}
    labels = list(dict.fromkeys(label for m in models for label, _, _ in lines[m]))
    rows = []
    for label in labels:
        row, before = [label], None
        for m in models:
            found = [(v, b) for lab, v, b in lines[m] if lab == label]
            value, better = found[0] if found else (None, NEUTRAL)
            row.append(fmt(value) + _delta(value, before, better))
            before = value
        rows.append(row)
    return [first, *models], rows


def suite_rows(out: Path, models: list[str], task_name: str) -> dict[str, list[dict]]:

    rows = {}
    for model in models:
        path = out / slug(model) / slug(task_name) / "details.jsonl"
        if path.is_file():
            rows[model] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return rows


def suite_changes(rows: dict[str, list[dict]]) -> list[tuple[str, str, list[str], list[str]]]:
    """Per consecutive pair of models: (before, after, query ids newly passed, newly failed)."""
    names = list(rows)
    changes = []
    for before, after in zip(names, names[1:], strict=False):
        was = {r["id"]: r["passed"] for r in rows[before]}
        now = {r["id"]: r["passed"] for r in rows[after]}
        gained = [q for q in now if now[q] is True and was.get(q) is False]
        lost = [q for q in now if now[q] is False and was.get(q) is True]
        changes.append((before, after, gained, lost))
    return changes


def _short(text: str, width: int = 80) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    def clean(cell: str) -> str:
        return cell.replace("|", "\\|")

    lines = ["| " + " | ".join(map(clean, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(clean, row)) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def plotted(task, lines: dict[str, dict[str, float | None]]) -> list[str]:
    """The labels a task's plot shows: perplexity alone for perplexity tasks, else the headline
    metrics in [0, 1] (at most 12), else the first one."""
    if task.kind == "perplexity":
        return ["perplexity"]
    labels = list(dict.fromkeys(lab for values in lines.values() for lab in values))
    bounded = [lab for lab in labels if all(0 <= (values.get(lab) or 0) <= 1 for values in lines.values())]
    return bounded[:12] or labels[:1]


def draw_task(results: dict, task):
    """Grouped bars of the task's plotted metrics, one bar per model (a matplotlib Figure, or None
    when there is nothing to draw); the legend sits right of the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in results if task.name in results[m]]
    lines = {
        m: {lab: v for lab, v, b in headline(task.kind, results[m][task.name]) if b != NEUTRAL}
        for m in models
    }
    labels = plotted(task, lines) if models else []
    if not labels:
        return None
    fig, ax = plt.subplots(
        figsize=(min(12.0, max(4.0, 0.3 * len(labels) * len(models) + 2)) + 1.5, 3.2), layout="constrained"
    )
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        xs = [j + i * width for j in range(len(labels))]
        ax.bar(xs, [lines[m].get(lab) or 0 for lab in labels], width, label=m)
    ax.set_xticks(
        [j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=20, ha="right", fontsize=8
    )
    if task.kind == "perplexity":  # >= 1, so bars rise from 1
        ax.set_yscale("log")
        ax.set_ylim(bottom=1)
    ax.set_title(f"{task.name} ({task.kind})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


def plot_task(results: dict, task, path: Path) -> Path | None:
    """`draw_task`'s figure saved as a PNG at `path` (None when there is nothing to draw)."""
    import matplotlib.pyplot as plt

    fig = draw_task(results, task)
    if fig is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(config: EvalConfig, results: dict, out: Path) -> tuple[Path, Path]:
    from lmforge.artifacts import write_atomic

    models = list(results)
    md = ["# lmforge evaluation report", ""]
    page = ["<h1>lmforge evaluation report</h1>"]
    described = [[m.name, m.path, m.adapter or ""] for m in config.models]
    md += ["## Models (in stage order)", "", md_table(["model", "path", "adapter"], described), ""]
    page += ["<h2>Models (in stage order)</h2>", html_table(["model", "path", "adapter"], described)]
    md.append("Each cell shows the change against the model to its left (▲ better, ▼ worse).\n")
    for task in config.tasks:
        header, rows = task_table(results, task)
        md += [f"## {task.name} ({task.kind})", "", md_table(header, rows), ""]
        page += [f"<h2>{html.escape(task.name)} ({task.kind})</h2>", html_table(header, rows)]
        plot = plot_task(results, task, out / "plots" / f"{slug(task.name)}.png")
        if plot is not None:
            md += [f"![{task.name}](plots/{plot.name})", ""]
            data = base64.b64encode(plot.read_bytes()).decode()
            page.append(f'<p><img alt="{html.escape(task.name)}" src="data:image/png;base64,{data}"></p>')
        if task.kind == "multiple_choice":
            header, rows = subject_table(results, task)
            md += ["Accuracy per subject:", "", md_table(header, rows), ""]
            page += ["<h3>Accuracy per subject</h3>", html_table(header, rows)]
        if task.kind == "reasoning":
            for model in models:
                failures = results[model].get(task.name, {}).get("failures", [])
                if failures:
                    sample = [
                        [
                            _short(f["prompt"], 60),
                            _short(f["output"]),
                            str(f["extracted"]),
                            str(f["reference"]),
                        ]
                        for f in failures
                    ]
                    head = ["prompt", "output", "extracted", "reference"]
                    md += [f"Failures of {model}:", "", md_table(head, sample), ""]
                    page += [f"<h3>Failures of {html.escape(model)}</h3>", html_table(head, sample)]
        if task.kind == "suite":
            rows_by_model = suite_rows(out, models, task.name)
            for before, after, gained, lost in suite_changes(rows_by_model):
                passed, failed = ", ".join(gained[:12]) or "none", ", ".join(lost[:12]) or "none"
                line = (
                    f"**{before} → {after}**: newly passed {len(gained)} ({passed}); "
                    f"newly failed {len(lost)} ({failed})"
                )
                md += [line, ""]
                page.append(f"<p>{html.escape(line.replace('**', ''))}</p>")
            if rows_by_model:
                first = next(iter(rows_by_model.values()))
                head = ["query", "category", *rows_by_model]
                side = []
                for i, query in enumerate(first):
                    cells = [_short(query["prompt"], 50), query["category"]]
                    for rows in rows_by_model.values():
                        mark = {True: "✓ ", False: "✗ ", None: ""}[rows[i]["passed"]]
                        cells.append(mark + _short(rows[i]["output"], 60))
                    side.append(cells)
                md += ["Answers side by side:", "", md_table(head, side), ""]
                page += ["<h3>Answers side by side</h3>", html_table(head, side)]
    md_path, html_path = out / "results.md", out / "report.html"
    write_atomic(md_path, "\n".join(md) + "\n")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}th{background:#f3f3f3}"
    )
    write_atomic(
        html_path,
        f"<!doctype html><html><head><meta charset='utf-8'><title>lmforge evaluation</title>"
        f"<style>{style}</style></head><body>{''.join(page)}</body></html>\n",
    )
    return md_path, html_path
