"""`lmforge data check`: counts every problem in one pass, shows the prompt/answer split, exit codes."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lmforge.cli import app

runner = CliRunner()


def test_check_reports_every_problem_and_fails(tmp_path, base_dir):
    (tmp_path / "img.png").write_bytes(b"png")
    records = [
        {"instruction": "add 1 and 2", "output": "3"},
        {"instruction": "add 2 and 2"},  # empty response
        {"instruction": "<image> what", "output": "a"},  # placeholder, no image
        {"instruction": "<image> what", "output": "a", "images": ["missing.png"]},  # missing file
        {"instruction": "look", "output": "a", "images": ["img.png"]},  # image, no placeholder
        {"instruction": ["not", "text"], "output": "x"},  # malformed
        {"instruction": "the cat sat on the mat " * 30, "output": "long"},  # truncated, nothing left
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    result = runner.invoke(app, ["data", "check", str(path), "--model", str(base_dir), "--max-length", "64"])
    assert result.exit_code == 1, result.output
    out = result.output
    assert "records in" in out and "7" in out
    for name, count in [
        ("malformed records", 1),
        ("empty responses", 1),
        ("image/placeholder mismatches", 2),
        ("missing image files", 1),
        ("would be truncated", 1),
        ("no trainable token left", 1),
    ]:
        line = next(line for line in out.splitlines() if name in line)
        assert line.split()[-2 if line.rstrip().endswith("│") else -1] == str(count), line
    assert "record 5: `instruction` is a list" in out
    assert "5 error(s)" in out
    assert "add 2 and 2" not in out  # examples shown are usable ones


def test_check_passes_clean_data_and_shows_the_split(tmp_path, base_dir, alpaca_file):
    result = runner.invoke(app, ["data", "check", str(alpaca_file), "--model", str(base_dir)])
    assert result.exit_code == 0, result.output
    assert "every record is usable" in result.output
    assert "length (tokens)" in result.output and "p50" in result.output
    assert "example 1" in result.output and "example 2" in result.output
    # The trained answer is marked; the prompt is not.
    assert "⟦" in result.output and "<|im_start|>user" in result.output.split("⟦")[0]


def test_check_a_config_for_its_stage(tmp_path, base_dir, alpaca_file):
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {{name_or_path: {base_dir}}}\ndata: {{path: {alpaca_file}}}\n"
        f"method: {{name: pretrain}}\ntrain: {{output_dir: {tmp_path / 'o'}}}\n"
    )
    result = runner.invoke(app, ["data", "check", str(config)])
    assert result.exit_code == 1  # alpaca records are not pre-training text
    assert "records of the wrong kind" in result.output
    ok = runner.invoke(app, ["data", "check", str(config), "method.name=sft"])
    assert ok.exit_code == 0, ok.output


def test_check_reads_on_after_a_broken_line(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"instruction": "q", "output": "a"})
    path.write_text("\n".join([good, "{broken", good, good]))
    result = runner.invoke(app, ["data", "check", str(path)])
    assert result.exit_code == 1
    assert "line 2 is not valid JSON" in result.output
    line = next(line for line in result.output.splitlines() if "records in" in line)
    assert "4" in line  # all four lines were read
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert runner.invoke(app, ["data", "check", str(empty)]).exit_code == 1


def llamafactory_folder(root):
    """A LLaMA-Factory style data folder: an alpaca set and a pre-training corpus."""
    root.mkdir()
    (root / "alpaca_demo.json").write_text(json.dumps([{"instruction": "q", "output": "a"}] * 3))
    (root / "c4_demo.jsonl").write_text("".join(json.dumps({"text": f"text {i}"}) + "\n" for i in range(4)))
    (root / "dataset_info.json").write_text(
        json.dumps(
            {
                "alpaca_demo": {"file_name": "alpaca_demo.json"},
                "c4_demo": {"file_name": "c4_demo.jsonl", "columns": {"prompt": "text"}},
            }
        )
    )
    return root


def test_check_a_registry_name_with_overrides(tmp_path):
    folder = llamafactory_folder(tmp_path / "lf")
    ok = runner.invoke(app, ["data", "check", "alpaca_demo", f"data.dataset_dir={folder}"])
    assert ok.exit_code == 0, ok.output
    assert (
        next(line for line in ok.output.splitlines() if "records in alpaca_demo" in line).split()[-2] == "3"
    )
    pretrain = runner.invoke(
        app, ["data", "check", "c4_demo", "--stage", "pretrain", f"data.dataset_dir={folder}"]
    )
    assert pretrain.exit_code == 0, pretrain.output
    assert "text: 4" in pretrain.output and "every record is usable" in pretrain.output
    capped = runner.invoke(
        app,
        [
            "data",
            "check",
            "c4_demo",
            "--stage",
            "pretrain",
            f"data.dataset_dir={folder}",
            "data.max_samples=2",
        ],
    )
    assert "text: 2" in capped.output, capped.output
    # The same name for a stage that learns answers: a prompt column is not an SFT example.
    sft = runner.invoke(app, ["data", "check", "c4_demo", f"data.dataset_dir={folder}"])
    assert sft.exit_code == 1 and "empty response" in sft.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing_name"], "not a registered name"),
        (["alpaca_dem"], "did you mean the registered dataset `alpaca_demo`"),
        (["alpaca_demo", "data.dataset_dri=x"], "did you mean `data.dataset_dir`"),
        (["alpaca_demo", "train.lr=1"], "only data.* overrides apply to a dataset"),
        (["empty"], "dataset `empty` has no records"),
        (["broken"], "broken.json: not valid JSON"),
    ],
)
def test_a_fatal_error_prints_only_the_error(tmp_path, args, message):
    folder = llamafactory_folder(tmp_path / "lf")
    (folder / "empty.jsonl").write_text("")
    (folder / "broken.json").write_text("[{")
    info = json.loads((folder / "dataset_info.json").read_text())
    info |= {"empty": {"file_name": "empty.jsonl"}, "broken": {"file_name": "broken.json"}}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    overrides = [] if any(a.startswith("data.dataset_dri") for a in args) else [f"data.dataset_dir={folder}"]
    result = runner.invoke(app, ["data", "check", *args, *overrides])
    assert result.exit_code == 1
    assert message in result.output, result.output
    assert result.output.startswith("error:") and result.output.count("error:") == 1, result.output
    assert "data check (for a stage" not in result.output and "records in" not in result.output


def test_check_counts_tool_calls_and_reports_malformed_tool_records(tmp_path, base_dir):
    """Tool-use records (docs/tools.md): calls and results counted; arguments that are not JSON,
    a call to a tool the record does not offer and a result with no call reported per record."""
    tools = [{"name": "add", "parameters": {"type": "object"}}]

    def chat(call_arguments, name="add", result=True):
        messages = [
            {"role": "user", "content": "2+3?"},
            {"role": "assistant", "tool_calls": [{"function": {"name": name, "arguments": call_arguments}}]},
        ]
        return {
            "tools": tools,
            "messages": messages
            + ([{"role": "tool", "content": "5"}] if result else [])
            + [{"role": "assistant", "content": "5"}],
        }

    records = [
        chat({"a": 2, "b": 3}),
        chat('{"a": 2, "b": 3}'),
        chat("{a: 2}"),  # not JSON
        chat({"a": 2}, name="mul"),  # not among the tools
        {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "5"}]},  # no call
    ]
    path = tmp_path / "tools.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    command = ["data", "check", str(path), "--model", str(base_dir), "--template", "qwen2.5"]
    result = runner.invoke(app, command)
    assert result.exit_code == 1, result.output
    out = result.output
    flat = " ".join(out.split())  # rich wraps long lines
    assert "3 records · 3 calls · 3 results" in flat
    assert "line 3: messages[1]: `tool_calls[0].arguments` is not valid JSON" in flat
    assert "line 4 calls `mul` (turn 1), which is not among its tools (add)" in flat
    assert "line 5: messages has a tool result with no tool call before it" in flat
    line = next(line for line in out.splitlines() if "calls to a tool not in" in line)
    assert "1" in line.split()


def test_records_a_tool_format_cannot_write_are_reported_and_refused_by_name(tmp_path, base_dir):
    """Llama 3.1's format writes a calling answer as the call alone: a record with text beside its call
    is reported by `data check` and refused by training, naming the record (never trained without
    its text)."""
    from lmforge.data.files import DataError
    from lmforge.data.formats import to_example
    from lmforge.data.templates import get_template
    from lmforge.data.tokenize import tokenize_examples
    from lmforge.models.tiny import build_tiny_tokenizer

    call = {"function": {"name": "add", "arguments": {"a": 2}}}
    records = [
        {
            "tools": [{"name": "add"}],
            "messages": [
                {"role": "user", "content": "2+3?"},
                {"role": "assistant", "content": c, "tool_calls": [call]},
            ],
        }
        for c in ("", "Let me add.")
    ]
    path = tmp_path / "tools.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    result = runner.invoke(
        app, ["data", "check", str(path), "--model", str(base_dir), "--template", "llama3.1"]
    )
    flat = " ".join(result.output.split())
    assert (
        result.exit_code == 1
        and "line 2: llama3.1's format writes an answer that calls as the call alone" in flat
    )
    assert "line 1" not in flat
    examples = [to_example(r, f"tools.jsonl line {i + 1}", "messages") for i, r in enumerate(records)]
    with pytest.raises(DataError, match="tools.jsonl line 2: llama3.1's format writes .* drop the text"):
        tokenize_examples(examples, get_template("llama3.1"), build_tiny_tokenizer(["x"], 300), 512)
