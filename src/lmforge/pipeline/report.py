"""The pipeline report (output_dir/report.md and report.html): per stage its kind, status, time
and metrics side by side, the loss curves of the training stages, and each eval stage's tables
(with every subject's accuracy for multiple-choice tasks)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from lmforge.artifacts import write_atomic
from lmforge.evaluation.report import fmt, html_table, md_table, subject_table, task_table
from lmforge.pipeline.spec import TRAINING, PipelineSpec


def loss_curves(spec: PipelineSpec) -> dict[str, tuple[list[int], list[float]]]:
    curves = {}
    for stage in spec.stages:
        path = spec.output_dir / stage.name / "metrics.jsonl"
        if stage.kind not in TRAINING or not path.is_file():
            continue
        by_step: dict[int, float] = {}  # a resumed run logs its steps again: the last one counts
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off when the run was killed
            if "loss" in row and "step" in row:
                by_step[row["step"]] = row["loss"]
        if by_step:
            steps = sorted(by_step)
            curves[stage.name] = (steps, [by_step[s] for s in steps])
    return curves


def plot_losses(curves: dict, path: Path) -> Path | None:
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(min(4 * len(curves), 16), 3), squeeze=False)
    for ax, (name, (steps, losses)) in zip(axes[0], curves.items(), strict=True):
        ax.plot(steps, losses)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_pipeline_report(spec: PipelineSpec, manifest: dict) -> tuple[Path, Path]:
    from lmforge.config.loader import validate_eval_config

    records = manifest.get("stages", {})
    header = ["stage", "kind", "from", "status", "seconds", "train loss", "steps", "output"]
    rows = []
    for stage in spec.stages:
        record = records.get(stage.name, {})
        metrics = record.get("metrics") or {}
        rows.append(
            [
                stage.name,
                stage.kind,
                stage.source or "",
                record.get("status", "not run"),
                fmt(record.get("seconds")),
                fmt(metrics.get("train_loss")) if "train_loss" in metrics else "",
                str(metrics.get("steps", "")),
                (record.get("output") or {}).get("path", ""),
            ]
        )
    md = [f"# Pipeline {spec.name}", "", md_table(header, rows), ""]
    page = [f"<h1>Pipeline {html.escape(spec.name)}</h1>", html_table(header, rows)]
    plot = plot_losses(loss_curves(spec), spec.output_dir / "plots" / "losses.png")
    if plot is not None:
        md += ["## Loss curves", "", "![losses](plots/losses.png)", ""]
        data = base64.b64encode(plot.read_bytes()).decode()
        page += ["<h2>Loss curves</h2>", f'<p><img alt="losses" src="data:image/png;base64,{data}"></p>']
    for stage in spec.stages:
        record = records.get(stage.name, {})
        if stage.kind != "eval" or record.get("status") != "done":
            continue
        config = validate_eval_config(record["config"], stage.where)
        md += [f"## {stage.name} (eval)", ""]
        page.append(f"<h2>{html.escape(stage.name)} (eval)</h2>")
        for task in config.tasks:
            head, table = task_table(record["metrics"], task)
            md += [f"### {task.name}", "", md_table(head, table), ""]
            page += [f"<h3>{html.escape(task.name)}</h3>", html_table(head, table)]
            if task.kind == "multiple_choice":
                head, table = subject_table(record["metrics"], task)
                md += ["Accuracy per subject:", "", md_table(head, table), ""]
                page += [f"<h4>{html.escape(task.name)}: accuracy per subject</h4>", html_table(head, table)]
        md.append(f"Full report: {stage.name}/report.html\n")
    md_path, html_path = spec.output_dir / "report.md", spec.output_dir / "report.html"
    write_atomic(md_path, "\n".join(md) + "\n")
    style = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
    style += "td,th{border:1px solid #ccc;padding:3px 8px}"
    write_atomic(
        html_path,
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(spec.name)}</title>"
        f"<style>{style}table{{border-collapse:collapse}}</style></head><body>{''.join(page)}</body></html>\n",
    )
    return md_path, html_path
