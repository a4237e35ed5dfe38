"""lm-evaluation-harness as an optional backend (`pip install 'lmforge[harness]'`).

For users who have the harness's data sets (downloaded once, or in the HF cache with
HF_DATASETS_OFFLINE=1): lmforge hands the model (and adapter) to `lm_eval.simple_evaluate` with
its `hf` model type and keeps each task's numeric metrics. Everything else in `lmforge eval`
works without the harness. `device: auto` is resolved here, as lmforge's own tasks resolve it
(cuda when visible, else cpu): lm-eval's `hf` model has no `auto` and falls back to cuda.
"""

from __future__ import annotations

import importlib

from lmforge.config.eval import EvalModel, HarnessTask
from lmforge.config.model import ModelConfig
from lmforge.models.hardware import choose_hardware


def harness_args(model: EvalModel, task: HarnessTask) -> dict:
    """The `simple_evaluate` keyword arguments for one model and task."""
    model_args = {"pretrained": model.path, "dtype": model.dtype}
    if model.adapter:
        model_args["peft"] = model.adapter
    return {
        "model": "hf",
        "model_args": model_args,
        "tasks": list(task.tasks),
        "num_fewshot": task.shots,
        "batch_size": task.batch_size,
        "limit": task.limit,
        "device": harness_device(model),
    }


def harness_device(model: EvalModel) -> str:
    """The model's device, with `auto` resolved by lmforge's hardware choice (cuda or cpu)."""
    if model.device != "auto":
        return model.device
    return choose_hardware(ModelConfig(name_or_path=model.path)).device


def run_harness(model: EvalModel, task: HarnessTask) -> dict:
    """{harness task: {metric: value}} for the numeric metrics the harness reports."""
    try:
        lm_eval = importlib.import_module("lm_eval")
    except ImportError:
        raise ValueError(
            "task kind harness needs lm-evaluation-harness: pip install 'lmforge[harness]' "
            "(and its data sets available offline)"
        ) from None
    output = lm_eval.simple_evaluate(**harness_args(model, task))
    if not output or "results" not in output:
        raise RuntimeError("lm-evaluation-harness returned no results")
    return {name: _numeric(metrics) for name, metrics in output["results"].items()}


def _numeric(metrics: dict) -> dict[str, float]:
    """`acc,none` -> `acc`; a filtered metric keeps its filter (`exact_match (strict-match)`), so
    GSM8K's strict and flexible scores stay apart; standard errors are left out."""
    out = {}
    for key, value in metrics.items():
        metric, _, filter_name = key.partition(",")
        if isinstance(value, int | float) and not isinstance(value, bool) and not metric.endswith("_stderr"):
            out[metric if filter_name in ("", "none") else f"{metric} ({filter_name})"] = value
    return out
