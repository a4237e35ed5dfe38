"""A pipeline file: named stages in order, shared sections, each stage's input from an earlier one.

```yaml
name: llama2-chat
output_dir: runs/pipelines/llama2-chat      # every stage writes to output_dir/<stage name>
shared:                                      # merged into every training stage (stage keys win)
  model: {name_or_path: meta-llama/Llama-2-7b-chat-hf}
  data: {template: llama2}
stages:
  - {name: sft, kind: sft, adapter: {method: adalora}, data: {path: data/sft.json}}
  - {name: sft-merged, kind: merge}               # `from` defaults to the stage before
  - {name: dpo, kind: dpo, from: sft-merged, data: {path: data/pairs.json}}
  - {name: merged, kind: merge, from: dpo}
  - {name: q4, kind: quantize, from: merged, method: bnb-4bit}
  - {name: gguf, kind: export, from: merged, type: q8_0}
  - {name: answers, kind: predict, from: merged, data: data/test.json}
  - {name: eval, kind: eval, models: [sft, dpo, merged], tasks: [{kind: suite}]}
```

What `from` hands over:
* a training stage after an adapter stage continues that adapter (same base, `adapter.path`); with
  another adapter method it needs a merge stage first (said with the fix); after a full model
  (pretrain, full fine-tuning, merge) it trains on that model.
* merge takes an adapter stage and merges into its **16-bit** base (never a quantized one);
* quantize and export take a full 16-bit model (a merge, pretrain or full fine-tuning stage);
* predict takes any model stage; eval's `models` name stages (or give model entries).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, ValidationError

from lmforge.config.base import Section
from lmforge.config.loader import (
    ConfigError,
    closest,
    describe_error,
    load_yaml,
    merge_config,
    validate_config,
    validate_eval_config,
)
from lmforge.config.method import MethodConfig

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*")
RESERVED = {"manifest.json", "report.md", "report.html", "plots"}
TRAINING = get_args(MethodConfig.model_fields["name"].annotation)  # every training method
KINDS = (*TRAINING, "merge", "quantize", "export", "predict", "eval")
RUN_SECTIONS = ("method", "model", "adapter", "data", "train", "hardware")


class MergeOptions(Section):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Merged weights dtype."
    )
    max_shard_size: str = Field("5GB", description="Largest safetensors shard.")


class QuantizeOptions(Section):
    method: Literal["bnb-4bit", "bnb-8bit", "gptq"] = Field("bnb-4bit", description="How to quantize.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="bitsandbytes 4-bit type.")
    bits: int = Field(4, description="GPTQ bits.")
    group_size: int = Field(128, description="GPTQ group size.")
    calibration: str | None = Field(None, description="GPTQ calibration data (a data file).")
    calibration_samples: int = Field(128, gt=0, description="GPTQ calibration records.")


class ExportOptions(Section):
    format: Literal["gguf"] = Field("gguf", description="Export format.")
    type: Literal["f16", "bf16", "f32", "q8_0"] = Field("f16", description="GGUF tensor type.")
    modelfile: bool = Field(True, description="Also write an Ollama Modelfile.")
    pre_tokenizer: str | None = Field(
        None,
        description="llama.cpp pre-tokenizer to write when none splits text as the tokenizer does "
        "(export refuses otherwise; a warning says what differs).",
    )


class PredictOptions(Section):
    data: str = Field(..., description="Records to answer (file, folder, registry name).")
    limit: int | None = Field(None, gt=0, description="Only the first N records.")
    max_new_tokens: int = Field(256, gt=0)
    temperature: float = Field(0.0, ge=0)
    batch_size: int = Field(16, gt=0)


OPTIONS = {
    "merge": MergeOptions,
    "quantize": QuantizeOptions,
    "export": ExportOptions,
    "predict": PredictOptions,
}


@dataclass
class StageSpec:
    index: int
    name: str
    kind: str
    source: str | None  # the stage it takes its input from
    body: dict[str, Any]  # the stage's own keys (sections for training, options otherwise)
    where: str  # "pipeline.yaml: stages[2] (dpo)"
    nproc: int = 1  # a training stage's processes (torch's launcher runs it when more than 1)


@dataclass
class PipelineSpec:
    name: str
    output_dir: Path
    shared: dict[str, Any]
    stages: list[StageSpec]
    source: str
    raw: dict[str, Any] = field(default_factory=dict)

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)


def _did_you_mean(word: str, known: list[str]) -> str:
    close = closest(word, known)
    return f" — did you mean `{close}`?" if close else ""


def load_pipeline(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineSpec:
    """Read a pipeline file; `overrides` (from `a.b=c` arguments) may index stages by position:
    `stages.2.train.lr=2e-4`."""
    raw = _override(load_yaml(path), overrides or {}, str(path))
    return parse_pipeline(raw, str(path))


def _override(base: Any, update: dict[str, Any], source: str, at: str = "") -> Any:
    if isinstance(base, list):
        out = list(base)
        for key, value in update.items():
            if not (key.isdigit() and int(key) < len(out)):
                raise ConfigError(
                    f"{source}: override `{at}{key}`: `{at.rstrip('.')}` has items 0 to {len(out) - 1}"
                )
            index = int(key)
            out[index] = (
                _override(out[index], value, source, f"{at}{key}.") if isinstance(value, dict) else value
            )
        return out
    out = dict(base) if isinstance(base, dict) else {}
    for key, value in update.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict | list)
        out[key] = _override(out[key], value, source, f"{at}{key}.") if nested else value
    return out


def parse_pipeline(raw: dict[str, Any], source: str = "pipeline") -> PipelineSpec:
    """Check the file's shape and the stage graph; every error names the stage and the fix."""
    unknown = set(raw) - {"name", "output_dir", "shared", "stages"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(
            f"{source}: unknown key `{key}`{_did_you_mean(key, ['name', 'output_dir', 'shared', 'stages'])} "
            "(a pipeline has name, output_dir, shared, stages)"
        )
    shared = raw.get("shared") or {}
    bad = set(shared) - set(RUN_SECTIONS)
    if bad:
        key = sorted(bad)[0]
        raise ConfigError(
            f"{source}: unknown section `shared.{key}`{_did_you_mean(key, list(RUN_SECTIONS))} "
            f"(shared sections: {', '.join(RUN_SECTIONS)})"
        )
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError(f"{source}: `stages` must be a non-empty list of stages (name, kind, ...)")
    name = str(raw.get("name") or Path(source).stem)
    stages: list[StageSpec] = []
    for index, entry in enumerate(stages_raw):
        if not isinstance(entry, dict):
            raise ConfigError(f"{source}: stages[{index}] must be a mapping with name and kind")
        entry = dict(entry)
        stage_name = str(entry.pop("name", "") or "")
        where = f"{source}: stages[{index}]" + (f" ({stage_name})" if stage_name else "")
        kind = entry.pop("kind", None)
        if not stage_name:
            raise ConfigError(f"{where}: has no `name`")
        if kind not in KINDS:
            raise ConfigError(
                f"{where}: unknown stage kind `{kind}`{_did_you_mean(str(kind), list(KINDS))} "
                f"(kinds: {', '.join(KINDS)})"
            )
        if any(s.name == stage_name for s in stages):
            raise ConfigError(f"{where}: a stage named `{stage_name}` already exists; names must be unique")
        if not _NAME.fullmatch(stage_name) or stage_name in RESERVED:
            raise ConfigError(
                f"{where}: `{stage_name}` cannot name a stage: it is the stage's folder, so use letters, "
                f"digits, -, _ and inner dots, and none of {', '.join(sorted(RESERVED))}"
            )
        if kind == "eval" and not isinstance(entry.get("models", []), list):
            raise ConfigError(f"{where}: `models` must be a list (e.g. [sft, merged])")
        if kind in TRAINING and "resume" in (entry.get("train") or {}):
            raise ConfigError(f"{where}: drop train.resume: the pipeline resumes interrupted stages itself")
        # the default input: the nearest earlier stage that makes a model or an adapter
        makers = [s.name for s in stages if s.kind in (*TRAINING, "merge", "quantize")]
        default_from = makers[-1] if makers and kind != "eval" else None
        source_name = entry.pop("from", default_from)
        nproc = _nproc(entry.pop("nproc", 1), kind, where)
        stages.append(StageSpec(index, stage_name, kind, source_name, entry, where, nproc))
    names = [s.name for s in stages]
    for stage in stages:
        _check_reference(stage, stages, names)
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"{source}: pipeline name `{name}` must be a plain folder name (letters, digits, -, _, .)"
        )
    output_dir = Path(raw.get("output_dir") or f"runs/pipelines/{name}")
    resolved = output_dir.resolve()
    if resolved == Path.home().resolve() or resolved in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise ConfigError(
            f"{source}: output_dir {output_dir} is this folder, your home or one above: stage folders are "
            "created and replaced there; give the pipeline its own folder (e.g. runs/pipelines/NAME)"
        )
    spec = PipelineSpec(name, output_dir, shared, stages, source, raw)
    for stage in stages:
        _check_body(stage)
    _check_flow(spec)
    return spec


def _nproc(value: Any, kind: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where}: `nproc` must be a whole number of processes, 1 or more (got {value!r})")
    if value > 1 and kind not in TRAINING:
        raise ConfigError(f"{where}: `nproc` applies to training stages; a {kind} stage runs in one process")
    return value


def _check_reference(stage: StageSpec, stages: list[StageSpec], names: list[str]) -> None:
    refs = [stage.source] if stage.source else []
    if stage.kind == "eval":
        refs += [m for m in stage.body.get("models", []) if isinstance(m, str)]
    for ref in refs:
        if ref not in names:
            raise ConfigError(
                f"{stage.where}: refers to a stage `{ref}` that does not exist{_did_you_mean(ref, names)} "
                f"(stages: {', '.join(names)})"
            )
        if ref == stage.name or names.index(ref) > names.index(stage.name):
            chain = _cycle(stage.name, stages)
            what = f"a cycle ({' -> '.join(chain)})" if chain else f"a later stage `{ref}`"
            raise ConfigError(
                f"{stage.where}: takes its input from {what}; a stage can only use stages listed before it"
            )


def _cycle(start: str, stages: list[StageSpec]) -> list[str]:
    by_name = {s.name: s for s in stages}
    path, node = [start], by_name[start].source
    while node is not None and node in by_name:
        path.append(node)
        if node == start:
            return path
        if path.count(node) > 1:
            return []
        node = by_name[node].source
    return []


def _check_body(stage: StageSpec) -> None:
    if stage.kind in TRAINING:
        bad = set(stage.body) - set(RUN_SECTIONS)
        if bad:
            key = sorted(bad)[0]
            raise ConfigError(
                f"{stage.where}: unknown key `{key}`{_did_you_mean(key, list(RUN_SECTIONS))} "
                f"(a {stage.kind} stage takes {', '.join(RUN_SECTIONS)}, name, kind, from)"
            )
        return
    if stage.kind == "eval":
        body = {k: v for k, v in stage.body.items() if k != "models"}
        if "output_dir" in body:
            raise ConfigError(f"{stage.where}: an eval stage writes to its own folder; drop `output_dir`")
        try:
            validate_eval_config({**body, "models": [], "tasks": body.get("tasks") or []}, stage.where)
        except ConfigError as exc:
            if "need at least one entry under `models`" not in str(exc):
                raise
        return
    try:
        OPTIONS[stage.kind].model_validate(stage.body)
    except ValidationError as exc:
        raise ConfigError(
            "\n".join(describe_error(e, stage.where, OPTIONS[stage.kind]) for e in exc.errors())
        ) from None


@dataclass
class Output:
    """What a stage hands to the next: a full model, an adapter over a base, or a file."""

    kind: Literal["model", "adapter", "file", "folder"]
    path: str
    base: str | None = None  # an adapter's base model
    quantized: bool = False
    adapter_method: str | None = None


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def planned_output(spec: PipelineSpec, stage: StageSpec, upstream: Output | None) -> Output:
    """Where a stage's result will be and what it is (from the configs alone)."""
    folder = spec.output_dir / stage.name
    if stage.kind in TRAINING:
        config = training_config(spec, stage, upstream)
        if config.adapter.method == "none":
            return Output("model", str(folder / "model"))
        return Output(
            "adapter",
            str(folder / "adapter"),
            base=config.model.name_or_path,
            adapter_method=config.adapter.method,
        )
    if stage.kind == "merge":
        return Output("model", str(folder))
    if stage.kind == "quantize":
        return Output("model", str(folder), quantized=True)
    if stage.kind == "export":
        return Output(
            "file", str(folder / f"{spec.name}-{ExportOptions.model_validate(stage.body).type}.gguf")
        )
    if stage.kind == "predict":
        return Output("file", str(folder / "predictions.jsonl"))
    return Output("folder", str(folder))


def training_config(spec: PipelineSpec, stage: StageSpec, upstream: Output | None):
    """The stage's RunConfig: shared sections, then the stage's, then what `from` hands over."""
    raw = merge_config(spec.shared, stage.body)
    raw = merge_config(
        raw, {"method": {"name": stage.kind}, "train": {"output_dir": str(spec.output_dir / stage.name)}}
    )
    if upstream is not None:
        if upstream.kind == "adapter":
            method = (raw.get("adapter") or {}).get("method", "lora")
            if method != upstream.adapter_method:
                raise ConfigError(
                    f"{stage.where}: continues the {upstream.adapter_method} adapter of `{stage.source}` but "
                    f"trains a {method} adapter; add a merge stage between them (kind: merge) and take "
                    "`from` it, or use the same adapter method"
                )
            raw = merge_config(
                raw, {"model": {"name_or_path": upstream.base}, "adapter": {"path": upstream.path}}
            )
        elif upstream.kind == "model":
            if upstream.quantized:
                raise ConfigError(
                    f"{stage.where}: `{stage.source}` is a quantized checkpoint; train from the 16-bit model "
                    "it was made from (QLoRA quantizes on load: model.quantization: nf4)"
                )
            raw = merge_config(raw, {"model": {"name_or_path": upstream.path}})
        else:
            raise ConfigError(
                f"{stage.where}: `{stage.source}` makes a {upstream.kind}, not a model to train"
            )
    return validate_config(raw, source=stage.where)


def _check_flow(spec: PipelineSpec) -> None:
    """Each stage gets the kind of input it needs (checked on planned outputs, before anything runs)."""
    outputs: dict[str, Output] = {}
    for stage in spec.stages:
        upstream = outputs.get(stage.source) if stage.source else None
        if stage.kind == "merge":
            if upstream is None or upstream.kind != "adapter":
                what = "nothing" if upstream is None else f"a {upstream.kind}"
                if upstream is not None and upstream.quantized:
                    what = "a quantized model"
                raise ConfigError(
                    f"{stage.where}: merge needs an adapter stage as `from`; `{stage.source}` gives {what}. "
                    "Merging into quantized weights would lose the adapter: merge into the 16-bit base"
                )
            if upstream.adapter_method == "moe_dora":
                raise ConfigError(
                    f"{stage.where}: `{stage.source}` trains a MoE-DoRA adapter, which cannot be merged "
                    "(per-token routing has no single weight); use it as base + adapter (chat, serve, eval)"
                )
            if _quantized_base(upstream, outputs):
                raise ConfigError(
                    f"{stage.where}: the adapter's base is a quantized stage; merge into a 16-bit base"
                )
        if stage.kind in ("quantize", "export"):
            if upstream is None or upstream.kind != "model" or upstream.quantized:
                got = (
                    "nothing"
                    if upstream is None
                    else (
                        "a quantized model"
                        if upstream.quantized
                        else f"{_article(upstream.kind)} {upstream.kind}"
                    )
                )
                raise ConfigError(
                    f"{stage.where}: {stage.kind} needs a full 16-bit model as `from` (a merge, pretrain or "
                    f"full fine-tuning stage); `{stage.source}` gives {got}"
                )
        if stage.kind == "predict":
            PredictOptions.model_validate(stage.body)
            if upstream is None or upstream.kind not in ("model", "adapter"):
                raise ConfigError(f"{stage.where}: predict needs a model or adapter stage as `from`")
        if (
            stage.kind == "eval"
            and not stage.body.get("models")
            and (upstream is None or upstream.kind not in ("model", "adapter"))
        ):
            raise ConfigError(
                f"{stage.where}: name the stages to evaluate under `models` (e.g. [sft, merged])"
            )
        if stage.kind == "eval":
            for ref in stage.body.get("models", []):
                if isinstance(ref, str) and outputs[ref].kind not in ("model", "adapter"):
                    raise ConfigError(
                        f"{stage.where}: `{ref}` makes a {outputs[ref].kind}, not a model to evaluate"
                    )
        outputs[stage.name] = planned_output(spec, stage, upstream)


def _quantized_base(adapter: Output, outputs: dict[str, Output]) -> bool:
    return any(o.kind == "model" and o.quantized and o.path == adapter.base for o in outputs.values())
