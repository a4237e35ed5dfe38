"""`kind: harness`: lm-evaluation-harness runs lmforge's model on the device lmforge chose."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.config.eval import EvalModel, HarnessTask
from lmforge.evaluation.harness import harness_args, run_harness

QUESTIONS = [
    {"question": "the cat sat on the", "choices": [" mat", " dog", " the"], "answer": 0},
    {"question": "add 2 and 3:", "choices": [" 5", " 6"], "answer": 0},
]


def write_choice_task(folder) -> None:
    """A loglikelihood (multiple-choice) harness task `lmforge_choice` over a local JSONL file."""
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "choice.yaml").write_text(
        "task: lmforge_choice\noutput_type: multiple_choice\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {folder / 'cache'}\n"
        'test_split: test\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n"
    )


def test_device_auto_is_resolved_before_the_harness_sees_it() -> None:
    """lm-eval's `hf` model has no `auto`: given None it takes cuda, which a CPU machine lacks."""
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert harness_args(EvalModel(path="m"), HarnessTask(kind="harness", tasks=["x"]))["device"] == expected
    assert (
        harness_args(EvalModel(path="m", device="cuda:1"), HarnessTask(kind="harness", tasks=["x"]))["device"]
        == "cuda:1"
    )


def test_a_harness_task_runs_the_tiny_model_with_device_auto(base_dir, tmp_path, monkeypatch) -> None:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    write_choice_task(tmp_path)
    evaluate = lm_eval.simple_evaluate  # run_harness names no task folder: this test adds its own
    monkeypatch.setattr(
        lm_eval,
        "simple_evaluate",
        lambda **kwargs: evaluate(**kwargs, task_manager=TaskManager(include_path=str(tmp_path))),
    )
    results = run_harness(
        EvalModel(path=str(base_dir)), HarnessTask(kind="harness", tasks=["lmforge_choice"])
    )
    assert set(results) == {"lmforge_choice"}
    assert set(results["lmforge_choice"]) == {"acc", "sample_len"}
    assert results["lmforge_choice"]["acc"] in (0.0, 0.5, 1.0)
