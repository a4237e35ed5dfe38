"""`lmforge run pipeline.yaml`: run the stages in order, skipping what is done, resuming what was cut.

Each stage has a hash of what decides its result: its resolved config (less display settings),
the hashes of the stages it reads, fingerprints of the files it reads (data, base model,
benchmark folders, suite files) and the code (lmforge's version and a hash of its source, less
the modules that only print). The manifest (output_dir/manifest.json) records per stage the
hash, the status (running/done/failed), the resolved config, the input fingerprints, seconds,
metrics and output, and for the run the library versions and git commit. On a rerun a stage
whose hash matches a `done` record (and whose output is still there) is skipped; a stage whose
hash matches a `running` or `failed` record is resumed from its last complete checkpoint; a
changed stage runs again from scratch, and so does everything after it that reads it. A stage
folder is only ever replaced if the manifest says this pipeline made it. `--from STAGE` reruns
that stage and all after it; `--only STAGE` runs one stage (its inputs must be done);
`--dry-run` prints the plan.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lmforge.artifacts import write_atomic
from lmforge.config.loader import ConfigError, validate_eval_config
from lmforge.evaluation.runner import fingerprint
from lmforge.pipeline.spec import (
    TRAINING,
    ExportOptions,
    MergeOptions,
    Output,
    PipelineSpec,
    PredictOptions,
    QuantizeOptions,
    StageSpec,
    planned_output,
    training_config,
)

console = Console(stderr=True)
USER_ERRORS = (ValueError, OSError, RuntimeError)  # a stage failing for a reason the user can fix
# modules that only print or draw: editing them changes no stage's result
PRESENTATION = {"cli.py", "pipeline/report.py", "evaluation/report.py"}


def code_version() -> str:
    """lmforge's version and a hash of its source files: changed code reruns the stages."""
    from importlib.metadata import version

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).as_posix() in PRESENTATION:
            continue
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return f"{version('lmforge')}+{digest.hexdigest()[:12]}"


def git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


@dataclass
class Step:
    """One stage in a plan: what it will do and why."""

    stage: StageSpec
    hash: str
    action: str  # skip (unchanged), run (new / changed / forced), resume (was interrupted)
    reason: str
    resolved: dict[str, Any]
    inputs: list[Any]  # fingerprints of the files the stage reads
    output: Output


def _resolved(spec: PipelineSpec, stage: StageSpec, upstream: Output | None, outputs: dict[str, Output]):
    """(resolved config as JSON, the local inputs it reads)."""
    if stage.kind in TRAINING:
        config = training_config(spec, stage, upstream)
        dumped = config.model_dump(mode="json")
        dumped["train"].pop("resume", None)  # resuming is the runner's choice, not the stage's
        base = config.data.dataset_dir
        files = [fingerprint(s.path, base) for s in config.data.sources()]
        files.append(fingerprint(config.data.eval_path, base))
        if upstream is None:  # else the upstream stage's hash stands for the model and adapter
            files += [fingerprint(config.model.name_or_path), fingerprint(config.adapter.path)]
        if config.model.arch:  # a new model: its architecture file and the tokenizer it names
            from lmforge.lab.spec import load_arch

            files += [fingerprint(config.model.arch), fingerprint(load_arch(config.model.arch).tokenizer)]
        return dumped, files
    if stage.kind == "eval":
        from lmforge.evaluation.runner import task_inputs

        body = dict(stage.body)
        body["models"] = [_eval_model(ref, outputs) for ref in body.get("models") or [stage.source]]
        body["output_dir"] = str(spec.output_dir / stage.name)
        config = validate_eval_config(body, stage.where)
        files = [f for task in config.tasks for f in task_inputs(task, config.dataset_dir)]
        named = {m for m in stage.body.get("models", []) if isinstance(m, str)}
        for model in config.models:
            if model.name not in named:  # a model entry, not a stage: its files
                files += [fingerprint(model.path), fingerprint(model.adapter)]
        return config.model_dump(mode="json"), files
    options = {
        "merge": MergeOptions,
        "quantize": QuantizeOptions,
        "export": ExportOptions,
        "predict": PredictOptions,
    }[stage.kind].model_validate(stage.body)
    resolved = {**options.model_dump(mode="json"), "input": asdict(upstream) if upstream else None}
    files = [fingerprint(options.data)] if stage.kind == "predict" else []
    if stage.kind == "quantize" and options.calibration:
        files.append(fingerprint(options.calibration))
    return resolved, files


def _eval_model(ref, outputs: dict[str, Output]) -> dict:
    if not isinstance(ref, str):
        return ref
    out = outputs[ref]
    if out.kind == "adapter":
        return {"name": ref, "path": out.base, "adapter": out.path}
    return {"name": ref, "path": out.path}


def plan(spec: PipelineSpec, manifest: dict, start: str | None = None, only: str | None = None) -> list[Step]:
    """What each stage will do on this run (nothing is run or written)."""
    names = [s.name for s in spec.stages]
    if start is not None and only is not None:
        raise ConfigError("--from and --only do not go together: --from reruns a stage and all after it")
    for flag, value in (("--from", start), ("--only", only)):
        if value is not None and value not in names:
            raise ConfigError(f"{flag} {value}: no such stage (stages: {', '.join(names)})")
    code = code_version()
    outputs: dict[str, Output] = {}
    hashes: dict[str, str] = {}
    steps: list[Step] = []
    actions: dict[str, str] = {}
    forced = False
    for stage in spec.stages:
        upstream = outputs.get(stage.source) if stage.source else None
        resolved, files = _resolved(spec, stage, upstream, outputs)
        model_refs = (
            [m for m in stage.body.get("models", []) if isinstance(m, str)] if stage.kind == "eval" else []
        )
        refs = ([stage.source] if stage.source else []) + model_refs
        upstream_hashes = [hashes[n] for n in refs]
        hashed = _without_display(stage, resolved)
        blob = json.dumps([stage.kind, hashed, upstream_hashes, files, code], sort_keys=True, default=str)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
        hashes[stage.name] = digest
        output = planned_output(spec, stage, upstream)
        outputs[stage.name] = output
        record = manifest.get("stages", {}).get(stage.name, {})
        same = record.get("hash") == digest
        done = (
            same
            and record.get("status") == "done"
            and Path(record.get("output", {}).get("path", "")).exists()
        )
        cut = same and record.get("status") in ("running", "failed")
        forced = forced or stage.name == start
        reran = [r for r in refs if actions.get(r) in ("run", "resume")]
        if only is not None and stage.name != only:
            action, reason = ("skip", "not selected (--only)") if done else ("missing", "not done")
        elif only is not None:
            action, reason = ("resume", "selected, was interrupted") if cut else ("run", "selected (--only)")
        elif forced:
            action, reason = "run", "forced (--from)" if stage.name == start else f"after --from {start}"
        elif done and not reran:
            action, reason = "skip", "unchanged"
        elif cut and not reran:
            action, reason = "resume", f"{record['status']} before: resume from its last checkpoint"
        elif not record:  # a first run: its inputs run too, but nothing runs "again"
            action, reason = "run", "new"
        elif reran:
            action, reason = "run", f"its input {reran[0]} runs again"
        elif same:
            action, reason = "run", "its output is missing"
        else:
            action, reason = "run", "changed (config, input or code)"
        actions[stage.name] = action
        steps.append(Step(stage, digest, action, reason, resolved, files, output))
    missing = [s for s in steps if s.action == "missing"]
    if only is not None and any(s.stage.name in _needed(spec, only) for s in missing):
        needed = [s.stage.name for s in missing if s.stage.name in _needed(spec, only)]
        raise ConfigError(
            f"--only {only}: its inputs {', '.join(needed)} are not done; run without --only first"
        )
    return steps


def _without_display(stage: StageSpec, resolved: dict) -> dict:
    """The resolved config less what only changes the display (progress bars, log cadence)."""
    if stage.kind not in TRAINING:
        return resolved
    train = {
        k: v for k, v in resolved["train"].items() if k not in ("progress", "logging_steps", "tensorboard")
    }
    return {**resolved, "train": train}


def _needed(spec: PipelineSpec, name: str) -> set[str]:
    stage = spec.stage(name)
    refs = [stage.source] if stage.source else []
    if stage.kind == "eval":
        refs += [m for m in stage.body.get("models", []) if isinstance(m, str)]
    found = set(refs)
    for ref in refs:
        found |= _needed(spec, ref)
    return found


def print_plan(steps: list[Step]) -> None:
    table = Table(title="pipeline plan")
    for column in ("stage", "kind", "from", "action", "why", "output"):
        table.add_column(column)
    for step in steps:
        table.add_row(
            step.stage.name,
            step.stage.kind,
            step.stage.source or "",
            step.action,
            step.reason,
            step.output.path,
        )
    Console().print(table)


def load_manifest(spec: PipelineSpec) -> dict:
    path = spec.output_dir / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"stages": {}}


def _save_manifest(spec: PipelineSpec, manifest: dict) -> None:
    write_atomic(
        spec.output_dir / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False, default=str)
    )


def run_pipeline(
    spec: PipelineSpec,
    start: str | None = None,
    only: str | None = None,
    dry_run: bool = False,
    quiet: bool = False,
) -> dict:
    """Run (or plan) the pipeline; returns the manifest."""
    from lmforge.artifacts import versions

    manifest = load_manifest(spec)
    steps = plan(spec, manifest, start, only)
    if not quiet or dry_run:
        print_plan(steps)
    if dry_run:
        return manifest
    manifest.update(
        pipeline=spec.name,
        file=spec.source,
        output_dir=str(spec.output_dir),
        code=code_version(),
        git_commit=git_commit(),
        versions=versions(),
        order=[s.name for s in spec.stages],
    )
    manifest.setdefault("stages", {})
    from lmforge.models.loading import quiet_library_bars
    from lmforge.pipeline.report import write_pipeline_report

    try:
        with quiet_library_bars():
            _run_steps(spec, steps, manifest, quiet)
    finally:
        write_pipeline_report(spec, manifest)
    return manifest


def _run_steps(spec: PipelineSpec, steps: list[Step], manifest: dict, quiet: bool) -> None:
    for step in steps:
        if step.action in ("skip", "missing"):
            continue
        name = step.stage.name
        folder = spec.output_dir / name
        for leftover in spec.output_dir.glob(f".{name}.*-*"):  # temp folders of a killed merge/quantize
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        if step.action == "run" and folder.exists():
            if name not in manifest["stages"] and any(folder.iterdir()):
                raise ConfigError(
                    f"{step.stage.where}: {folder} exists and was not made by this pipeline; "
                    "remove it or rename the stage"
                )
            shutil.rmtree(folder)  # stale checkpoints of another config must not be resumed
        if not quiet:
            console.rule(f"[bold]{name}[/] ({step.stage.kind}) — {step.reason}")
        record = {
            "hash": step.hash,
            "status": "running",
            "kind": step.stage.kind,
            "from": step.stage.source,
            "config": step.resolved,
            "inputs": step.inputs,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        manifest["stages"][name] = record
        _save_manifest(spec, manifest)
        started = time.perf_counter()
        try:
            metrics = execute(spec, step, manifest, quiet)
        except USER_ERRORS as exc:
            record.update(status="failed", error=str(exc), seconds=round(time.perf_counter() - started, 2))
            _save_manifest(spec, manifest)
            raise ConfigError(f"{step.stage.where}: {exc}") from exc
        record.update(
            status="done",
            seconds=round(time.perf_counter() - started, 2),
            metrics=metrics,
            output=asdict(step.output),
        )
        _save_manifest(spec, manifest)


def launched(config, nproc: int, folder: Path) -> dict:
    """A training stage run by torch's launcher in `nproc` processes (`lmforge train`, as a user
    would launch it); its metrics from the result file the main process writes."""
    from lmforge.config import dump_config
    from lmforge.distributed import launch_command

    folder.mkdir(parents=True, exist_ok=True)
    config_path, result_path = folder / ".launch.yaml", folder / ".launch-result.json"
    result_path.unlink(missing_ok=True)
    write_atomic(config_path, dump_config(config))
    command = launch_command(
        nproc, 1, 0, "127.0.0.1", 0, [str(config_path), "--result-file", str(result_path)]
    )
    if subprocess.call(command) != 0 or not result_path.is_file():
        raise RuntimeError(f"the stage's {nproc} processes failed (their errors are above)")
    result = json.loads(result_path.read_text(encoding="utf-8"))
    return {"train_loss": result["train_loss"], "steps": result["steps"], **result["metrics"]}


def execute(spec: PipelineSpec, step: Step, manifest: dict, quiet: bool) -> dict:
    """Run one stage; returns its metrics."""
    stage, folder = step.stage, spec.output_dir / step.stage.name
    upstream = Output(**manifest["stages"][stage.source]["output"]) if stage.source else None
    if stage.kind in TRAINING:
        from lmforge import methods
        from lmforge.config.loader import validate_config
        from lmforge.training.checkpoints import resolve_resume

        raw = dict(step.resolved)
        raw["train"] = {**raw["train"], "resume": "auto" if step.action == "resume" else "none"}
        resumed_from = resolve_resume(folder, "auto") if step.action == "resume" else None
        if stage.nproc > 1:
            metrics = launched(validate_config(raw, stage.where), stage.nproc, folder)
        else:
            result = methods.run(validate_config(raw, stage.where))
            metrics = {"train_loss": result.train_loss, "steps": result.steps, **result.metrics}
        return {**metrics, "resumed_from": Path(resumed_from).name} if resumed_from else metrics
    if stage.kind == "merge":
        from lmforge.export.merge import merge_adapter

        options = MergeOptions.model_validate(stage.body)
        merge_adapter(
            upstream.base, upstream.path, folder, dtype=options.dtype, max_shard_size=options.max_shard_size
        )
        return {}
    if stage.kind == "quantize":
        from lmforge.export.quantize import quantize_model

        options = QuantizeOptions.model_validate(stage.body)
        quantize_model(
            upstream.path,
            folder,
            options.method,
            quant_type=options.quant_type,
            calibration=options.calibration,
            bits=options.bits,
            group_size=options.group_size,
            calibration_samples=options.calibration_samples,
        )
        return {}
    if stage.kind == "export":
        from lmforge.export.gguf import export_gguf, write_modelfile

        options = ExportOptions.model_validate(stage.body)
        path = export_gguf(upstream.path, step.output.path, options.type, pre_tokenizer=options.pre_tokenizer)
        if options.modelfile:
            write_modelfile(path, Path(upstream.path))
        return {"bytes": path.stat().st_size}
    if stage.kind == "predict":
        from lmforge.inference.engine import Engine, SamplingParams
        from lmforge.inference.predict import predict, read_examples

        options = PredictOptions.model_validate(stage.body)
        model, adapter = (
            (upstream.base, upstream.path) if upstream.kind == "adapter" else (upstream.path, None)
        )
        engine = Engine.load(model, adapter=adapter)
        examples = read_examples(options.data)[: options.limit]
        params = SamplingParams(max_new_tokens=options.max_new_tokens, temperature=options.temperature)
        predict(engine, examples, Path(step.output.path), params, options.batch_size, quiet=quiet)
        return {"predictions": len(examples)}
    from lmforge.evaluation.runner import evaluate

    result = evaluate(validate_eval_config(step.resolved, stage.where), quiet=quiet)
    return result.results
