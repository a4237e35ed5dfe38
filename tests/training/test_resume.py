"""Resume is the default and no setting loses progress: rotation never leaves the folder without a
complete checkpoint, a rerun continues the same run (one continuous metrics.jsonl, the whole run's
train_loss), another run's folder is refused, `fresh` starts over, the final evaluation runs once."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import sft_config
from lmforge.config import validate_config
from lmforge.methods import sft
from lmforge.training import checkpoints
from lmforge.training.checkpoints import complete_checkpoints, start_run


def rows(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def loss_steps(output_dir) -> list[int]:
    return [row["step"] for row in rows(output_dir) if "loss" in row]


class Killed(Exception):
    """Stands for SIGKILL: nothing after the raise runs, what is on disk stays as it was."""


def test_a_kill_between_saving_and_marking_keeps_a_complete_checkpoint_and_the_rerun_resumes(
    tmp_path, base_dir, alpaca_file, monkeypatch
):
    def config(out):
        return validate_config(sft_config(base_dir, alpaca_file, out, save_steps=2, save_total_limit=1))

    whole = sft.run(config(tmp_path / "whole"), quiet=True)

    real = checkpoints.mark_complete

    def dies_at_six(checkpoint, step, *args):
        if step == 6:  # checkpoint-6 is fully written, not yet marked: the window rotation must respect
            raise Killed
        real(checkpoint, step, *args)

    monkeypatch.setattr(checkpoints, "mark_complete", dies_at_six)
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        sft.run(config(out), quiet=True)
    monkeypatch.setattr(checkpoints, "mark_complete", real)
    kept = [p.name for p in complete_checkpoints(out)]
    assert kept == ["checkpoint-4"], "limit 1 kept the last complete one"
    assert (out / "checkpoint-6").is_dir() and not (out / "checkpoint-2").exists()

    resumed = sft.run(config(out), quiet=True)  # the same config, train.resume left at its default
    assert loss_steps(out) == list(range(1, 9)), "one continuous run: steps 1..8 once each"
    times = [row["time"] for row in rows(out) if "time" in row]
    assert times == sorted(times), "the clock goes on from the kept lines"
    expected = {row["step"]: row["loss"] for row in rows(tmp_path / "whole") if "loss" in row}
    for row in rows(out):
        if "loss" in row:
            assert row["loss"] == pytest.approx(expected[row["step"]], rel=1e-5, abs=1e-6)
    # train_loss covers all 8 steps, not only the 4 run after the resume
    assert resumed.train_loss == pytest.approx(whole.train_loss, rel=1e-5)
    assert resumed.metrics["train_loss"] == pytest.approx(whole.train_loss, rel=1e-5)
    assert [row["train_loss"] for row in rows(out) if "train_loss" in row] == [
        pytest.approx(whole.train_loss, rel=1e-5)
    ]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-8"], "rotated, the cut-off save too"
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_rerun_without_checkpoints_starts_over_instead_of_appending(tmp_path, base_dir, alpaca_file):
    config = validate_config(sft_config(base_dir, alpaca_file, tmp_path / "run", max_steps=3))
    sft.run(config, quiet=True)
    sft.run(config, quiet=True)
    assert loss_steps(tmp_path / "run") == [1, 2, 3]


def test_a_rerun_of_a_finished_run_trains_nothing_more(tmp_path, base_dir, alpaca_file):
    """transformers checks max_steps only after a step: resumed at max_steps it ran a 5th step."""
    out = tmp_path / "run"
    config = validate_config(sft_config(base_dir, alpaca_file, out, max_steps=4, save_steps=2))
    first = sft.run(config, quiet=True)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    again = sft.run(config, quiet=True)
    assert again.steps == 4 and loss_steps(out) == [1, 2, 3, 4]
    assert again.train_loss == pytest.approx(first.train_loss, rel=1e-6)
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    same = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(adapter[k], same[k]) for k in adapter), "the adapter is the finished run's"


def test_a_folder_holding_another_run_is_refused_and_fresh_starts_over(tmp_path, base_dir, alpaca_file):
    out = tmp_path / "run"
    first = sft_config(base_dir, alpaca_file, out, max_steps=4, save_steps=2)
    sft.run(validate_config(first), quiet=True)
    written = (out / "config.yaml").read_text()

    other = sft_config(base_dir, alpaca_file, out, max_steps=4, save_steps=2, lr=5e-3)
    with pytest.raises(ValueError, match=r"holds another run \(its config differs in train\.lr\).*--fresh"):
        sft.run(validate_config(other), quiet=True)
    assert (out / "config.yaml").read_text() == written, "refused before anything was written"

    other["train"]["resume"] = "fresh"
    result = sft.run(validate_config(other), quiet=True)
    assert result.steps == 4 and loss_steps(out) == [1, 2, 3, 4]
    assert "lr: 0.005" in (out / "config.yaml").read_text()
    # the run now recorded is the new one: its own rerun resumes from its last checkpoint
    assert start_run(validate_config(other | {"train": {**other["train"], "resume": "auto"}})).endswith(
        "checkpoint-4"
    )


def test_a_checkpoint_marked_by_another_run_is_not_resumed(tmp_path, base_dir, alpaca_file):
    """Checkpoints copied in, or left by a version that kept no run.json, are checked by their marker."""
    mine = validate_config(sft_config(base_dir, alpaca_file, tmp_path, lr=1e-3))
    theirs = validate_config(sft_config(base_dir, alpaca_file, tmp_path, lr=2e-3))
    (tmp_path / "checkpoint-4").mkdir()
    checkpoints.mark_complete(tmp_path / "checkpoint-4", 4, checkpoints.run_id(theirs))
    with pytest.raises(ValueError, match="checkpoint-4 of another run"):
        start_run(mine)
    checkpoints.mark_complete(tmp_path / "checkpoint-4", 4, checkpoints.run_id(mine))
    assert start_run(mine) == str(tmp_path / "checkpoint-4")


def test_where_files_go_and_how_often_is_not_another_run(tmp_path, base_dir, alpaca_file):
    base = sft_config(base_dir, alpaca_file, tmp_path / "a")
    moved = sft_config(
        base_dir, alpaca_file, tmp_path / "b", save_steps=3, save_total_limit=None, logging_steps=5
    )
    assert checkpoints.run_id(validate_config(base)) == checkpoints.run_id(validate_config(moved))
    for changed in ({"lr": 2e-3}, {"max_steps": 9}, {"seed": 1}):
        other = sft_config(base_dir, alpaca_file, tmp_path / "a", **changed)
        assert checkpoints.run_id(validate_config(other)) != checkpoints.run_id(validate_config(base))


@pytest.mark.parametrize(("eval_steps", "expected"), [(0, [4]), (2, [2, 4])])
def test_the_final_evaluation_runs_once(tmp_path, base_dir, alpaca_file, eval_steps, expected):
    """eval_steps 0 is "at the end only"; an evaluation at the last step is not repeated."""
    config = sft_config(base_dir, alpaca_file, tmp_path / "e", max_steps=4, eval_steps=eval_steps)
    config["data"]["val_size"] = 0.1
    config["train"]["epochs"] = 3
    result = sft.run(validate_config(config), quiet=True)
    evals = [row for row in rows(tmp_path / "e") if "eval_loss" in row]
    assert [row["step"] for row in evals] == expected
    assert result.metrics["eval_loss"] == evals[-1]["eval_loss"]
