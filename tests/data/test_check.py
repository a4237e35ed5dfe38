"""`lmforge data check`: counts every problem in one pass, shows the prompt/answer split, exit codes."""

from __future__ import annotations

import json

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
