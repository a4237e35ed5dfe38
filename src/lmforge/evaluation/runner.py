"""`lmforge eval`: every task on every model, results saved in the output folder.

    output_dir/
      results.json          all metrics: {model: {task: metrics}}, plus the config and versions
      results.md            the comparison report (markdown)
      report.html           the same with plots (self-contained)
      plots/*.png
      <model>/<task>/metrics.json, details.jsonl   per-item rows (answers, failures, predictions)

A (model, task) result is reused when its folder holds one computed from the same model, task and
generation settings (so adding a model or a task to a config evaluates only what is new);
`force=True` (`--force`) recomputes everything. Files are written to a temporary name and renamed:
an interrupted run never leaves a half-written result that passes for complete.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from lmforge.artifacts import versions, write_atomic
from lmforge.config.data import DatasetSource
from lmforge.config.eval import EvalConfig, EvalModel, GenerationTask
from lmforge.config.loader import load_eval_config
from lmforge.data.formats import Example
from lmforge.evaluation.report import slug

console = Console(stderr=True)
# Tasks that read the `generation:` settings.
GENERATING = ("generation", "reasoning", "multimodal", "suite", "function_calling")


@dataclass
class EvalResults:
    results: dict[str, dict[str, dict]]  # model name -> task name -> metrics
    output_dir: Path

    def metric(self, model: str, task: str, key: str) -> Any:
        return self.results[model][task][key]


def read_task_data(source: DatasetSource, dataset_dir: str, limit: int | None, task=None) -> list[Example]:
    """The task's records, checked before any model generates: a generating task needs prompts with
    reference answers (and options for `match: option`); each problem names its record."""
    from lmforge.data.loader import read_source
    from lmforge.data.registry import resolve
    from lmforge.inference.predict import reference_of

    examples = list(read_source(resolve(source, dataset_dir)))
    if not examples:
        raise ValueError(f"{source.path} has no records")
    examples = examples[:limit] if limit else examples
    if task is not None and task.kind in GENERATING:
        for example in examples:
            if example.kind == "text":
                raise ValueError(
                    f"{example.where}: a plain `text` record has no question for task {task.name}"
                )
            if reference_of(example) is None and task.kind != "function_calling":  # calls are its reference
                raise ValueError(
                    f"{example.where}: no reference answer (an answer/output or an `answer` field) "
                    f"for task {task.name} to compare with"
                )
            if task.kind == "multimodal" and task.match == "option":
                from lmforge.evaluation.multimodal import options_of

                options_of(example)
    return examples


def fingerprint(location: str | None, base: str = ".") -> list:
    """Names, sizes and modification times of a local file or folder's files (a retrained model or an
    edited data file changes it); a hub id or name stands for itself."""
    if not location:
        return []
    path = Path(location)
    if not path.exists() and (Path(base) / location).exists():
        path = Path(base) / location
    if not path.exists():
        return [location]
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())[:5000]
    return [
        (p.name if p == path else str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in files
    ]


def task_inputs(task, dataset_dir: str) -> list:
    """What a task reads besides the model: its data, benchmark folder, suite file or predictions."""
    located = [getattr(task, "data", None) and task.data.path, getattr(task, "predictions", None)]
    if task.kind == "multiple_choice":
        located.append(task.path)
    if task.kind == "suite" and task.suite not in ("general", "quickstart"):
        located.append(task.suite)
    return [fingerprint(p, dataset_dir) for p in located if p]


def _key(*parts: Any) -> str:
    blob = json.dumps(
        [p.model_dump(mode="json") if hasattr(p, "model_dump") else p for p in parts], sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cached(folder: Path, key: str) -> dict | None:
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    return saved["metrics"] if saved.get("key") == key else None


def _save(folder: Path, key: str, metrics: dict, rows: list[dict] | None) -> None:
    if rows is not None:
        write_atomic(
            folder / "details.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        )
    write_atomic(
        folder / "metrics.json", json.dumps({"key": key, "metrics": metrics}, indent=1, ensure_ascii=False)
    )


def run_task(
    engine, model: EvalModel, task, config: EvalConfig, folder: Path, quiet: bool
) -> tuple[dict, list | None]:
    """(metrics, per-item rows) of one task on one loaded model."""
    from lmforge.inference.engine import SamplingParams

    settings = config.generation
    if getattr(engine, "seq2seq", False) and task.kind in ("perplexity", "multiple_choice"):
        raise ValueError(
            f"task {task.name} ({task.kind}) scores a decoder-only model's next-token log-probs; "
            f"{model.name} is an encoder-decoder: evaluate it with generation tasks"
        )
    params = SamplingParams(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=settings.seed,
    )
    if task.kind == "perplexity":
        from lmforge.evaluation.perplexity import perplexity

        examples = read_task_data(task.data, config.dataset_dir, task.limit)
        result = perplexity(
            engine.model,
            engine.tokenizer,
            engine.template,
            examples,
            task.window,
            task.stride,
            task.batch_size,
            quiet,
        )
        return vars(result), None
    if task.kind == "multiple_choice":
        from lmforge.evaluation.choice import evaluate_choices
        from lmforge.evaluation.perplexity import context_length

        result = evaluate_choices(engine, task, quiet)
        note = result.fitting_note(context_length(engine.model, cap=None))
        if note and not quiet:
            console.print(f"[yellow]{model.name} / {task.name}: {note}[/]")
        return {**result.metrics(), "example_prompt": result.example_prompt}, result.rows
    if task.kind == "generation":
        from lmforge.inference.predict import predict

        examples = read_task_data(task.data, config.dataset_dir, task.limit, task)
        if settings.system:
            examples = [replace(e, system=e.system or settings.system) for e in examples]
        predictions = folder / "predictions.jsonl"
        predict(engine, examples, predictions, params, settings.batch_size, quiet=quiet)
        return _generation_metrics(task, predictions), None
    if task.kind == "reasoning":
        from lmforge.evaluation.reasoning import evaluate_reasoning

        examples = read_task_data(task.data, config.dataset_dir, task.limit, task)
        metrics = evaluate_reasoning(
            engine, examples, params, settings.batch_size, task.failures, settings.system
        )
        return metrics, metrics.pop("_rows")
    if task.kind == "function_calling":
        from lmforge.evaluation.tools import evaluate_function_calls

        examples = read_task_data(task.data, config.dataset_dir, task.limit, task)
        metrics = evaluate_function_calls(engine, examples, params, settings.batch_size, settings.system)
        return metrics, metrics.pop("_rows")
    if task.kind == "multimodal":
        from lmforge.evaluation.multimodal import evaluate_multimodal

        examples = read_task_data(task.data, config.dataset_dir, task.limit, task)
        metrics = evaluate_multimodal(
            engine, examples, params, task.match, settings.batch_size, settings.system
        )
        return metrics, metrics.pop("_rows")
    if task.kind == "suite":
        from lmforge.data.templates import Conversation
        from lmforge.evaluation.suite import load_suite, quickstart_suite, score_suite

        queries = quickstart_suite() if task.suite == "quickstart" else load_suite(task.suite)[1]
        queries = queries[: task.limit] if task.limit else queries
        conversations = [Conversation(turns=[(q.prompt, "")], system=settings.system) for q in queries]
        outputs = engine.generate(conversations, params, settings.batch_size)
        score = score_suite(queries, outputs)
        metrics = {
            "pass_rate": score.overall_pass_rate,
            "per_category": score.per_category,
            "paraphrase": score.paraphrase,
        }
        return metrics, score.per_query
    if task.kind == "harness":
        from lmforge.evaluation.harness import run_harness

        return run_harness(model, task), None
    raise ValueError(f"unknown task kind {task.kind}")  # the config schema makes this unreachable


def _generation_metrics(task: GenerationTask, predictions: Path) -> dict:
    from lmforge.evaluation.metrics import generation_metrics, read_predictions

    outputs, references = read_predictions(predictions)
    metrics = generation_metrics(
        outputs, references, list(task.metrics), task.bertscore_model, task.bertscore_layers
    )
    return {**metrics, "items": len(outputs)}


def evaluate(
    config: EvalConfig | str | Path,
    overrides: Sequence[str] = (),
    force: bool = False,
    quiet: bool = False,
) -> EvalResults:
    """Run an eval config (an `EvalConfig` or a YAML path); returns and saves every result."""
    from lmforge.models.loading import quiet_library_bars

    if not isinstance(config, EvalConfig):
        config = load_eval_config(config, overrides)
    out = Path(config.output_dir)
    results: dict[str, dict[str, dict]] = {}
    seconds: dict[str, float] = {}
    scored_only = {
        t.name: Path(t.predictions).stem for t in config.tasks if t.kind == "generation" and t.predictions
    }
    _check_names(config, scored_only)
    # harness tasks first: the harness loads its own copy of the model, so none of ours is in memory
    model_tasks = sorted(
        (t for t in config.tasks if t.name not in scored_only), key=lambda t: t.kind != "harness"
    )
    with quiet_library_bars():
        for model in config.models:
            results[model.name] = {}
            engine = None
            weights = [fingerprint(model.path), fingerprint(model.adapter)]
            for task in model_tasks:
                folder = out / slug(model.name) / slug(task.name)
                settings = config.generation if task.kind in GENERATING else None
                key = _key(
                    model, task, settings, config.dataset_dir, weights, task_inputs(task, config.dataset_dir)
                )
                metrics = None if force else _cached(folder, key)
                if metrics is not None:
                    if not quiet:
                        console.print(f"[dim]{model.name} / {task.name}: reused {folder}/metrics.json[/]")
                    results[model.name][task.name] = metrics
                    continue
                if engine is None and task.kind != "harness":
                    engine = _load(model, quiet)
                if not quiet:
                    console.print(f"[bold]{model.name}[/] / {task.name} ({task.kind})")
                if task.kind == "generation":  # resume predictions only if made for this very key
                    _fresh_predictions(folder, key)
                started = time.perf_counter()
                metrics, rows = run_task(engine, model, task, config, folder, quiet)
                seconds[f"{model.name}/{task.name}"] = round(time.perf_counter() - started, 2)
                _save(folder, key, metrics, rows)
                results[model.name][task.name] = metrics
            del engine
            gc.collect()
    for task in config.tasks:
        if task.name in scored_only:
            results.setdefault(scored_only[task.name], {})[task.name] = _generation_metrics(
                task, Path(task.predictions)
            )
    _write_results(config, results, seconds, out)
    return EvalResults(results, out)


def _check_names(config: EvalConfig, scored_only: dict[str, str]) -> None:
    """Every model and task gets its own folder, and scored prediction files their own column."""
    for what, names in (("model", [m.name for m in config.models]), ("task", [t.name for t in config.tasks])):
        folders = [slug(n) for n in names]
        clash = sorted({n for n, f in zip(names, folders, strict=True) if folders.count(f) > 1})
        if clash:
            raise ValueError(f"{what} names {', '.join(clash)} share a folder name; give them distinct names")
    taken = {m.name for m in config.models}
    for task, column in scored_only.items():
        if column in taken:
            raise ValueError(
                f"task {task}: predictions file {column}.jsonl would share the report column `{column}` with "
                "a model or another predictions file; rename the file"
            )
        taken.add(column)


def _fresh_predictions(folder: Path, key: str) -> None:
    """Keep a predictions file to resume only when it was made for this key; else start over."""
    stamp, predictions = folder / "predictions.key", folder / "predictions.jsonl"
    if not (stamp.is_file() and stamp.read_text(encoding="utf-8") == key):
        predictions.unlink(missing_ok=True)
        write_atomic(stamp, key)


def _load(model: EvalModel, quiet: bool):
    from lmforge.inference.engine import Engine

    if not quiet:
        console.print(
            f"loading [bold]{model.name}[/]: {model.path}" + (f" + {model.adapter}" if model.adapter else "")
        )
    return Engine.load(model.path, model.adapter, model.template, model.device, model.dtype)


def _write_results(config: EvalConfig, results: dict, seconds: dict, out: Path) -> None:
    from lmforge.evaluation.report import write_report

    summary = {
        "config": config.model_dump(mode="json"),
        "versions": versions(),
        "seconds": seconds,
        "results": results,
    }
    write_atomic(out / "results.json", json.dumps(summary, indent=1, ensure_ascii=False, default=str))
    write_report(config, results, out)
