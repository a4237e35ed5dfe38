"""`lmforge eval` configs: defaults, names, and one clear message per mistake."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import yaml

from lmforge.config import ConfigError
from lmforge.config.eval import EvalModel, HarnessTask
from lmforge.config.loader import load_eval_config, validate_eval_config
from lmforge.evaluation.harness import harness_args, run_harness


def write(tmp_path, config: dict):
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_defaults_and_names(tmp_path) -> None:
    config = load_eval_config(
        write(
            tmp_path,
            {
                "models": [
                    {"path": "runs/q/pretrain/model"},
                    {"path": "runs/q/pretrain/model", "adapter": "runs/q/sft/final"},
                ],
                "tasks": [
                    {"kind": "perplexity", "data": "a.json"},
                    {"kind": "perplexity", "data": "b.json"},
                    {"kind": "suite"},
                ],
            },
        ),
        ["generation.max_new_tokens=8"],
    )
    assert [m.name for m in config.models] == ["model", "sft/final"]
    assert [t.name for t in config.tasks] == ["perplexity", "perplexity-2", "suite"]
    assert config.tasks[0].data.path == "a.json"  # a string is a dataset source
    assert config.generation.max_new_tokens == 8


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"models": [{"path": "m"}], "tasks": [{"kind": "perplexity", "data": "x", "windw": 3}]},
            "unknown key `tasks[0].windw` — did you mean `tasks[0].window`?",
        ),
        (
            {"models": [{"path": "m", "adaptr": "a"}], "tasks": [{"kind": "suite"}]},
            "unknown key `models[0].adaptr` — did you mean `models[0].adapter`?",
        ),
        (
            {"models": [{"path": "m"}], "tasks": [{"kind": "perplexty"}]},
            "does not match any of the expected tags",
        ),
        (
            {"models": [{"path": "m"}], "tasks": [{"kind": "multiple_choice", "benchmark": "mmlu"}]},
            "`tasks[0].path`: Field required",
        ),
        (
            {
                "models": [{"path": "m"}],
                "tasks": [{"kind": "multiple_choice", "benchmark": "arc", "path": "p"}],
            },
            "`tasks[0].benchmark`",
        ),
        (
            {"models": [{"path": "m"}, {"path": "m"}], "tasks": [{"kind": "suite"}]},
            "models named more than once: m",
        ),
        ({"tasks": [{"kind": "suite"}]}, "need at least one entry under `models`"),
        ({"models": [{"path": "m"}], "tasks": [{"kind": "generation"}]}, "exactly one of `data`"),
        (
            {
                "models": [{"path": "m"}],
                "tasks": [{"kind": "generation", "data": "d", "metrics": ["bertscore"]}],
            },
            "bertscore needs bertscore_model",
        ),
        (
            {
                "models": [{"path": "m"}],
                "tasks": [{"kind": "perplexity", "data": "d", "window": 8, "stride": 9}],
            },
            "stride 9 is larger than window 8",
        ),
        ({"models": [{"path": "m"}], "tasks": []}, "`tasks`"),
        ({"models": [{"path": "/"}], "tasks": [{"kind": "suite"}]}, "give it a `name`"),
        (
            {
                "models": [{"path": "m"}],
                "tasks": [{"kind": "multiple_choice", "benchmark": "mmlu", "path": "p", "subjects": []}],
            },
            "`tasks[0].subjects`",
        ),
    ],
)
def test_mistakes_are_explained(config: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        validate_eval_config(config, source="eval.yaml")
    assert message in str(error.value)
    assert str(error.value).startswith("eval.yaml")


def test_scoring_predictions_needs_no_model() -> None:
    config = validate_eval_config({"tasks": [{"kind": "generation", "predictions": "p.jsonl"}]})
    assert config.models == []


def test_harness_arguments_and_results(monkeypatch) -> None:
    model = EvalModel(name="sft", path="base/model", adapter="sft/adapter", dtype="bfloat16", device="cuda")
    task = HarnessTask(kind="harness", tasks=["hellaswag", "arc_easy"], shots=5, limit=20)
    calls = []

    def simple_evaluate(**kwargs):
        calls.append(kwargs)
        return {
            "results": {
                "hellaswag": {"acc,none": 0.5, "acc_stderr,none": 0.01, "alias": "hellaswag"},
                "gsm8k": {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.5},
            }
        }

    monkeypatch.setitem(sys.modules, "lm_eval", SimpleNamespace(simple_evaluate=simple_evaluate))
    assert run_harness(model, task) == {
        "hellaswag": {"acc": 0.5},
        "gsm8k": {"exact_match (strict-match)": 0.25, "exact_match (flexible-extract)": 0.5},
    }
    assert calls == [harness_args(model, task)]
    assert calls[0]["model_args"] == {"pretrained": "base/model", "dtype": "bfloat16", "peft": "sft/adapter"}
    assert (calls[0]["tasks"], calls[0]["num_fewshot"], calls[0]["limit"], calls[0]["device"]) == (
        ["hellaswag", "arc_easy"],
        5,
        20,
        "cuda",
    )


def test_harness_missing_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails
    with pytest.raises(ValueError, match=r"pip install 'lmforge\[harness\]'"):
        run_harness(EvalModel(path="m"), HarnessTask(kind="harness", tasks=["x"]))
