"""`lmforge predict`: one jsonl line per record, answers as the engine gives them, exact resume."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.data.templates import Conversation
from lmforge.inference.engine import Engine, SamplingParams


def test_predict_writes_every_record_and_resumes_after_the_last_complete_line(
    tmp_path, base_dir, alpaca_file
):
    out = tmp_path / "preds.jsonl"
    args = ["predict", "--model", str(base_dir), "--data", str(alpaca_file), "--out", str(out)]
    args += ["--limit", "20", "--batch-size", "8", "--max-new-tokens", "6"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(20))
    assert {"prompt", "output", "reference", "prompt_tokens", "completion_tokens", "seconds"} <= set(rows[0])
    records = json.loads(alpaca_file.read_text())[:20]
    assert [r["reference"] for r in rows] == [r["output"] for r in records]
    engine = Engine.load(str(base_dir))
    expected = engine.generate(
        [Conversation(turns=[(r["instruction"], "")]) for r in records], SamplingParams(max_new_tokens=6)
    )
    assert [r["output"] for r in rows] == expected
    # Interrupted mid-write: 7 complete lines and half of the 8th. The rerun keeps the 7 and adds the rest.
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:7]) + "\n" + lines[7][:15])
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "wrote 13 predictions" in again.output
    resumed = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in resumed] == list(range(20))
    assert [r["output"] for r in resumed] == [r["output"] for r in rows]
    missing = CliRunner().invoke(
        app, ["predict", "--model", str(base_dir), "--data", "nope.json", "--out", str(out)]
    )
    assert missing.exit_code == 1 and "nope.json" in missing.output


def test_predict_with_a_static_kv_cache_gives_the_same_outputs(tmp_path, base_dir, alpaca_file):
    outputs = {}
    for cache in ("dynamic", "static"):
        out = tmp_path / f"{cache}.jsonl"
        args = ["predict", "--model", str(base_dir), "--data", str(alpaca_file), "--out", str(out)]
        result = CliRunner().invoke(app, [*args, "--limit", "4", "--max-new-tokens", "5", "--cache", cache])
        assert result.exit_code == 0, result.output
        outputs[cache] = [json.loads(line)["output"] for line in out.read_text().splitlines()]
    assert outputs["static"] == outputs["dynamic"]
    bad = CliRunner().invoke(app, [*args, "--cache", "paged"])
    assert bad.exit_code == 1 and "use dynamic or static" in bad.output


def test_vllm_backend_is_refused_with_the_reason_without_it(tmp_path, base_dir, alpaca_file):
    import importlib.util

    import torch

    args = [
        "predict",
        "--model",
        str(base_dir),
        "--data",
        str(alpaca_file),
        "--out",
        str(tmp_path / "p.jsonl"),
    ]
    result = CliRunner().invoke(app, [*args, "--backend", "vllm"])
    if importlib.util.find_spec("vllm") is None:
        assert result.exit_code == 1 and "needs the vllm package" in result.output
    elif not torch.cuda.is_available():
        assert result.exit_code == 1 and "needs a CUDA GPU" in result.output
    bad = CliRunner().invoke(app, [*args, "--backend", "onnx"])
    assert bad.exit_code == 1 and "use transformers or vllm" in bad.output


@pytest.mark.gpu
def test_vllm_backend_matches_transformers_greedy(tmp_path, base_dir, alpaca_file):
    pytest.importorskip("vllm")
    outputs = {}
    for backend in ("transformers", "vllm"):
        out = tmp_path / f"{backend}.jsonl"
        args = ["predict", "--model", str(base_dir), "--data", str(alpaca_file), "--out", str(out)]
        result = CliRunner().invoke(
            app, [*args, "--limit", "8", "--max-new-tokens", "5", "--backend", backend]
        )
        assert result.exit_code == 0, result.output
        outputs[backend] = [json.loads(line)["output"] for line in out.read_text().splitlines()]
    assert len(outputs["vllm"]) == 8
    # vLLM may run an fp32 checkpoint in fp16, so a near-tie can flip a greedy token.
    assert sum(a == b for a, b in zip(outputs["vllm"], outputs["transformers"], strict=True)) >= 6
