"""`lmforge predict`: one jsonl line per record, answers as the engine gives them, exact resume."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
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


def test_predict_ends_with_one_line_when_generation_fails(tmp_path, base_dir, alpaca_file, monkeypatch):
    from transformers import LlamaForCausalLM

    def failing_generate(self, *args, **kwargs):
        raise RuntimeError("N must be divisible by block_n")

    monkeypatch.setattr(LlamaForCausalLM, "generate", failing_generate)
    out = tmp_path / "preds.jsonl"
    args = ["predict", "--model", str(base_dir), "--data", str(alpaca_file), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--limit", "4"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == ["error: generation failed: RuntimeError: N must be divisible by block_n"], result.output
    assert not out.exists() or out.read_text() == "", "no prediction is written for a failed batch"


def predict_args(model, data, out, *extra) -> list[str]:
    return [
        "predict",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--max-new-tokens",
        "4",
        *extra,
    ]


def generated_prompts(monkeypatch) -> list[str]:
    """The prompts the engine generates for, from now on (one list for the test)."""
    seen: list[str] = []
    original = Engine.generate_detailed

    def spy(self, conversations, *args, **kwargs):
        seen.extend(c.turns[-1][0] for c in conversations)
        return original(self, conversations, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate_detailed", spy)
    return seen


def assert_refused(result, *fragments):
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_predict_resumes_only_what_the_same_settings_made(tmp_path, base_dir, alpaca_file, monkeypatch):
    model, other_model = tmp_path / "model", tmp_path / "other-model"
    shutil.copytree(base_dir, model)  # copies: the test changes a file's time
    shutil.copytree(base_dir, other_model)
    out = tmp_path / "preds.jsonl"
    first = CliRunner().invoke(app, predict_args(model, alpaca_file, out, "--limit", "6"))
    assert first.exit_code == 0, first.output
    written = out.read_text()
    settings = json.loads((tmp_path / "preds.jsonl.settings.json").read_text())
    assert settings["model"]["at"] == str(model.resolve()) and settings["sampling"]["temperature"] == 0.0

    seen = generated_prompts(monkeypatch)
    more = CliRunner().invoke(
        app, predict_args(model, alpaca_file, out, "--limit", "10", "--cache", "static")
    )
    assert more.exit_code == 0, more.output
    assert "wrote 4 predictions" in more.output
    records = json.loads(alpaca_file.read_text())
    assert seen == [r["instruction"] for r in records[6:10]], "the 6 done records are not generated again"
    assert out.read_text().startswith(written)

    refusals = [
        (predict_args(model, alpaca_file, out, "--temperature", "0.5", "--seed", "1"),
         ["other settings", "temperature 0.0 -> 0.5", "seed None -> 1"]),
        (predict_args(other_model, alpaca_file, out), [f"model {model} -> {other_model}"]),
        (predict_args(model, alpaca_file, out, "--template", "llama2"), ["template None -> llama2"]),
    ]  # fmt: skip
    for args, fragments in refusals:
        assert_refused(CliRunner().invoke(app, args), str(out), *fragments, "another --out", "--fresh")
    os.utime(model / "model.safetensors", ns=(1, 1))  # the same folder, retrained: another file time
    result = CliRunner().invoke(app, predict_args(model, alpaca_file, out))
    assert_refused(result, f"model {model} (its files changed since)")
    assert seen == [r["instruction"] for r in records[6:10]], "a refusal generates nothing"
    assert len(out.read_text().splitlines()) == 10

    args = [*predict_args(other_model, alpaca_file, out, "--temperature", "0.5"), "--limit", "3", "--fresh"]
    fresh = CliRunner().invoke(app, args)
    assert fresh.exit_code == 0, fresh.output
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == [0, 1, 2]
    assert seen[4:] == [r["instruction"] for r in records[:3]], "--fresh generates every record again"
    renewed = json.loads((tmp_path / "preds.jsonl.settings.json").read_text())
    assert renewed["model"]["at"] == str(other_model.resolve()) and renewed["sampling"]["temperature"] == 0.5


def test_predict_refuses_a_file_with_no_record_of_its_settings(tmp_path, base_dir, alpaca_file):
    out = tmp_path / "old.jsonl"
    out.write_text(json.dumps({"index": 0, "output": "x"}) + "\n")  # by an lmforge before the key
    result = CliRunner().invoke(app, predict_args(base_dir, alpaca_file, out))
    assert_refused(result, "holds 1 predictions but no old.jsonl.settings.json", "--fresh")
    assert out.read_text().count("\n") == 1


def test_predict_takes_an_adapter_folder_as_the_model(tmp_path, base_dir, alpaca_file):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # not a no-op
    torch.manual_seed(0)
    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora).save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        base_dir
    )

    outputs = {}
    for name, model, extra in [
        ("adapter alone", adapter, []),
        ("base and adapter", base_dir, ["--adapter", str(adapter)]),
        ("base", base_dir, []),
    ]:
        out = tmp_path / f"{name}.jsonl"
        result = CliRunner().invoke(app, [*predict_args(model, alpaca_file, out, "--limit", "4"), *extra])
        assert result.exit_code == 0, result.output
        outputs[name] = [json.loads(line)["output"] for line in out.read_text().splitlines()]
    assert outputs["adapter alone"] == outputs["base and adapter"]
    assert outputs["adapter alone"] != outputs["base"], "the adapter is applied"

    both = CliRunner().invoke(
        app, [*predict_args(adapter, alpaca_file, tmp_path / "x.jsonl"), "--adapter", str(adapter)]
    )
    assert_refused(
        both, f"--model {adapter} is an adapter folder and --adapter", "pass the base model as --model"
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    nameless = CliRunner().invoke(app, predict_args(adapter, alpaca_file, tmp_path / "y.jsonl"))
    assert_refused(nameless, "adapter_config.json names no base model; pass --model BASE --adapter FOLDER")
