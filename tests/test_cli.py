"""The command line as a user meets it: clear one-line errors, config inspection, train/merge/chat."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from helpers import sft_config
from lmforge.cli import app

runner = CliRunner()


def write_config(tmp_path, config) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def assert_one_clear_error(result, *fragments):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_config_keys_lists_every_key():
    result = runner.invoke(app, ["config", "keys"])
    assert result.exit_code == 0
    for key in ("train.lr", "adapter.preset", "model.quantization", "data.max_length", "train.resume"):
        assert key in result.output
    only_train = runner.invoke(app, ["config", "keys", "train"]).output
    assert "train.lr" in only_train and "adapter.r" not in only_train


def test_config_show_applies_overrides(tmp_path, base_dir, alpaca_file):
    path = write_config(tmp_path, sft_config(base_dir, alpaca_file, tmp_path / "out"))
    result = runner.invoke(app, ["config", "show", path, "train.lr=3e-5", "adapter.r=4"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["train"]["lr"] == pytest.approx(3e-5)
    assert shown["adapter"]["r"] == 4
    assert shown["train"]["scheduler"] == "cosine"  # defaults filled in


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"train": {"lrr": 1}}, ["unknown key `train.lrr`", "did you mean `train.lr`"]),
        ({"train": {"batch_size": "many"}}, ["`train.batch_size`", "'many'"]),
        ({"data": {"path": "missing.json"}}, ["`missing.json` is not a file or folder"]),
    ],
)
def test_bad_config_gives_one_clear_error(tmp_path, base_dir, alpaca_file, change, fragments):
    config = sft_config(base_dir, alpaca_file, tmp_path / "out")
    for section, values in change.items():
        config[section] = {**config[section], **values}
    result = runner.invoke(app, ["train", write_config(tmp_path, config)])
    assert_one_clear_error(result, *fragments)


def test_malformed_record_gives_one_clear_error(tmp_path, base_dir):
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": ["b"]}]))
    result = runner.invoke(app, ["train", write_config(tmp_path, sft_config(base_dir, data, tmp_path / "o"))])
    assert_one_clear_error(result, str(data), "record 1", "`output` is a list, expected a string")


def test_train_merge_chat_end_to_end(tmp_path, base_dir, alpaca_file):
    out = tmp_path / "run"
    config = write_config(tmp_path, sft_config(base_dir, alpaca_file, out, max_steps=3))
    result = runner.invoke(app, ["train", config, "train.max_steps=2"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    # the libraries' per-file bars stay quiet: lmforge's own lines and bar are the output
    assert "Loading weights" not in result.output and "Writing model shards" not in result.output
    assert "memory: estimated peak" in result.output
    # a rerun of the finished run continues it (nothing left to train); --fresh starts over
    again = runner.invoke(app, ["train", config, "train.max_steps=2", "train.save_steps=1"])
    assert again.exit_code == 0, again.output
    assert [c.name for c in sorted(out.glob("checkpoint-*"))] == ["checkpoint-1", "checkpoint-2"]
    resumed = runner.invoke(app, ["train", config, "train.max_steps=2", "train.save_steps=1"])
    said = resumed.output.replace("\n", "")  # rich wraps long paths at the console's width
    assert "resuming from" in said and "checkpoint-2 (train.resume: auto)" in said, resumed.output
    assert "done: 2 steps" in said, "nothing was left to train"
    fresh = runner.invoke(app, ["train", config, "train.max_steps=2", "--fresh"])
    assert fresh.exit_code == 0, fresh.output
    assert not list(out.glob("checkpoint-*")), "--fresh removed the earlier checkpoints"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(1) == 1, "one run in metrics.jsonl"
    merged = tmp_path / "merged"
    result = runner.invoke(
        app, ["merge", "--base", str(base_dir), "--adapter", str(out / "adapter"), "--out", str(merged)]
    )
    assert result.exit_code == 0, result.output
    assert (merged / "model.safetensors").is_file()
    result = runner.invoke(
        app, ["chat", "--model", str(merged), "--max-new-tokens", "4", "--temperature", "0", "add 2 and 2"]
    )
    assert result.exit_code == 0, result.output
    assert "assistant" in result.output
    result = runner.invoke(
        app,
        [
            "chat",
            "--model",
            str(base_dir),
            "--adapter",
            str(out / "adapter"),
            "--max-new-tokens",
            "3",
            "--demo",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("assistant") == 3


def test_interactive_chat_reads_stdin(base_dir):
    result = runner.invoke(
        app,
        [
            "chat",
            "--model",
            str(base_dir),
            "--template",
            "chatml",
            "--max-new-tokens",
            "2",
            "--temperature",
            "0",
        ],
        input="hello\n/reset\nadd 1 and 1\n/exit\n",
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("assistant") == 2
    assert "history cleared" in result.output


def test_missing_model_is_one_clear_error(tmp_path, alpaca_file):
    config = sft_config(tmp_path / "no-such-model", alpaca_file, tmp_path / "out")
    result = runner.invoke(app, ["train", write_config(tmp_path, config)])
    assert_one_clear_error(result, "no-such-model")


def test_chat_system_command_sets_the_system_prompt_and_resets(base_dir, monkeypatch):
    from lmforge.inference.engine import Engine

    seen = []
    original = Engine.stream

    def spy(self, conversation, params=None, images=None, cancel=None):
        seen.append((conversation.system, list(conversation.turns)))
        return original(self, conversation, params, images, cancel)

    monkeypatch.setattr(Engine, "stream", spy)
    args = [
        "chat",
        "--model",
        str(base_dir),
        "--template",
        "chatml",
        "--max-new-tokens",
        "2",
        "--temperature",
        "0",
    ]
    result = runner.invoke(app, args, input="hi\n/system Be terse.\nhello\nmore\n/system\nbye\n/exit\n")
    assert result.exit_code == 0, result.output
    assert [s for s, _ in seen] == [None, "Be terse.", "Be terse.", None]
    assert seen[1][1] == [("hello", "")], "history cleared when the system prompt changes"
    assert len(seen[2][1]) == 2 and seen[3][1] == [("bye", "")]


def test_chat_can_hide_a_reasoning_trace(base_dir, monkeypatch):
    from lmforge.inference.engine import Engine

    raw = "<think>\nsum the digits\n</think>\n\nIt is 5."
    monkeypatch.setattr(
        Engine, "stream", lambda self, *a, **k: iter([raw[i : i + 4] for i in range(0, len(raw), 4)])
    )
    args = ["chat", "--model", str(base_dir), "--template", "chatml", "add 2 and 3"]
    shown = runner.invoke(app, args)
    hidden = runner.invoke(app, [*args, "--hide-reasoning"])
    assert shown.exit_code == 0 and hidden.exit_code == 0, hidden.output
    assert "sum the digits" in shown.output and "It is 5." in shown.output
    assert "sum the digits" not in hidden.output and "It is 5." in hidden.output


KERNEL_FAILURE = "N must be divisible by block_n"  # what bitsandbytes' CPU 4-bit kernel raised


def failing_generate(self, *args, **kwargs):
    raise RuntimeError(KERNEL_FAILURE)


def test_chat_ends_with_one_line_when_generation_fails(base_dir, monkeypatch):
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "generate", failing_generate)
    result = runner.invoke(app, ["chat", "--model", str(base_dir), "--template", "chatml", "add 2 and 2"])
    assert_one_clear_error(result, f"generation failed: RuntimeError: {KERNEL_FAILURE}")
    assert result.stdout.endswith("assistant: \n"), "the answer's line ends, so the error starts its own"


# `lmforge chat` in its own process, reading prompts from stdin, with the model's generate failing.
FAILING_CHAT = f"""
import sys
from transformers import LlamaForCausalLM
def fail(self, *args, **kwargs):
    raise RuntimeError({KERNEL_FAILURE!r})
LlamaForCausalLM.generate = fail
from lmforge.cli import app
sys.argv = ["lmforge", *sys.argv[1:]]
app()
"""


def test_interactive_chat_ends_with_one_line_when_generation_fails_instead_of_hanging(base_dir):
    args = ["chat", "--model", str(base_dir), "--template", "chatml", "--max-new-tokens", "2"]
    done = subprocess.run(
        [sys.executable, "-c", FAILING_CHAT, *args],
        input="hello\nadd 1 and 1\n",
        capture_output=True,
        text=True,
        timeout=300,  # a reader left waiting on a failed generation would hang here
        env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"},
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: generation failed: RuntimeError: {KERNEL_FAILURE}"], done.stderr
    assert done.stdout.count("assistant") == 1, "chat stops at the first failed answer"


@pytest.mark.parametrize(
    ("name", "content", "fragments"),
    [
        (
            "pairs.json",
            json.dumps([{"instruction": "add 1 and 2", "chosen": "3", "rejected": "4"}]),
            ["record 0 is a preference pair", "method dpo, orpo or simpo"],
        ),
        (
            "unknown.json",
            json.dumps([{"instruction": "add 1 and 2", "answer": "3"}]),
            ["record 0 has fields `instruction`, `answer`", "columns: {response: answer}"],
        ),
        (
            "quote.csv",
            'instruction,output\n"add 1 and 2,3\nadd 2 and 2,4\n',
            ["row 2 (line 2) opens a quoted cell", "close the quote"],
        ),
    ],
)
def test_bad_training_data_gives_one_clear_error_naming_the_file(
    tmp_path, base_dir, name, content, fragments
):
    data = tmp_path / name
    data.write_text(content)
    result = runner.invoke(app, ["train", write_config(tmp_path, sft_config(base_dir, data, tmp_path / "o"))])
    assert_one_clear_error(result, str(data), *fragments)
