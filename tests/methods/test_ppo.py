"""PPO's driver: the reference is the starting model, only the adapter and critic train, what it
logs and writes, the separate critic, and its own combinations. The math is in tests/losses."""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from helpers import sft_config
from lmforge.config import validate_config
from lmforge.methods import ppo, sft
from lmforge.methods.rewards import RewardError


def ppo_config(base_dir, data, out, ppo_options=None, adapter=None, rewards=None, **train) -> dict:
    raw = sft_config(base_dir, data, out, **{"max_steps": 2, "lr": 5e-3, "batch_size": 4, **train})
    raw["method"] = {
        "name": "ppo",
        "rewards": rewards
        or [{"builtin": "exact_answer"}, {"builtin": "regex", "pattern": r"\d", "weight": 0.5}],
        "sampling": {"num_generations": 2, "max_completion_length": 6},
        "ppo": {"rollout_batch_size": 4, "mini_batch_size": 4, **(ppo_options or {})},
        "samples_every": 1,
    }
    raw["adapter"] = {**raw["adapter"], **(adapter or {})}
    return raw


def all_rows(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def rows(output_dir) -> list[dict]:
    """The updates' lines (the memory report adds one of its own at the end)."""
    return [row for row in all_rows(output_dir) if "loss" in row]


def test_ppo_trains_the_adapter_and_value_head_and_logs_every_stat(tmp_path, base_dir, alpaca_file):
    frozen = load_file(base_dir / "model.safetensors")
    raw = ppo_config(base_dir, alpaca_file, tmp_path, {"kl_target": 0.5, "kl_horizon": 100}, max_steps=3)
    result = ppo.run(validate_config(raw), quiet=True)
    logged = rows(result.output_dir)
    assert [r["step"] for r in logged] == [1, 2, 3]
    first = logged[0]
    # A fresh adapter is the identity: the policy equals its reference, so the first KL is 0 and
    # the first mini-batch's ratio is 1 (dropout is off).
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    expected = {
        "loss", "policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl", "vf_clipfrac", "grad_norm",
        "kl", "explained_variance", "reward", "reward_std", "rewards/exact_answer/mean", "rewards/regex/mean",
        "rewards/regex/std", "completions/mean_length", "kl_coef", "time/generation", "time/scoring",
        "time/optimization", "rollout_tokens_per_s",
    }  # fmt: skip
    assert expected <= set(first), expected - set(first)
    assert all(math.isfinite(r[k]) for r in logged for k in expected)
    assert first["reward"] == pytest.approx(
        first["rewards/exact_answer/mean"] + 0.5 * first["rewards/regex/mean"]
    )
    assert logged[2]["kl_coef"] != logged[0]["kl_coef"], "the adaptive controller moves the KL coefficient"
    samples = [json.loads(line) for line in (result.output_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 8 and {"prompt", "completion", "rewards", "total"} <= set(samples[0])
    after = load_file(base_dir / "model.safetensors")
    assert all(torch.equal(frozen[k], after[k]) for k in frozen), "the base is frozen"
    adapter = load_file(result.artifact / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k), "the adapter trained"
    head = load_file(result.output_dir / "value_head.safetensors")
    assert head["weight"].abs().sum() > 0, "the value head trained (it starts at zero)"


def test_ppo_reports_as_the_other_stages_do(tmp_path, base_dir, alpaca_file, capsys):
    """TensorBoard events and the memory lines (estimate at the start, measured peaks at the end,
    the peaks also in metrics.jsonl), as every Trainer stage writes them."""
    raw = ppo_config(base_dir, alpaca_file, tmp_path, tensorboard=True, progress=False)
    result = ppo.run(validate_config(raw), quiet=False)
    events = list((result.output_dir / "runs").rglob("events.out.tfevents*"))
    assert events and events[0].stat().st_size > 200, "scalars were written"
    err = capsys.readouterr().err
    assert "memory: estimated peak" in err and "memory: measured" in err, err
    peaks = [r for r in all_rows(result.output_dir) if "estimated_peak_mb" in r]
    assert len(peaks) == 1 and peaks[0]["step"] == 2


def test_rollouts_leave_the_saved_tokenizer_padding_as_the_base(tmp_path, base_dir, alpaca_file):
    # Rollouts pad prompts on the left for that call only: the saved tokenizer pads as the base's.
    right = tmp_path / "base"
    shutil.copytree(base_dir, right)
    tokenizer = AutoTokenizer.from_pretrained(right)
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(right)
    result = ppo.run(
        validate_config(ppo_config(right, alpaca_file, tmp_path / "run", max_steps=1)), quiet=True
    )
    assert AutoTokenizer.from_pretrained(result.artifact).padding_side == "right"


def test_ppo_from_an_sft_adapter_takes_it_as_the_reference(tmp_path, base_dir, alpaca_file, monkeypatch):
    sft_out = sft.run(
        validate_config(sft_config(base_dir, alpaca_file, tmp_path / "sft", max_steps=20, lr=5e-3)),
        quiet=True,
    )
    raw = ppo_config(
        base_dir, alpaca_file, tmp_path / "ppo", adapter={"path": str(sft_out.artifact)}, max_steps=1
    )
    result = ppo.run(validate_config(raw), quiet=True)
    # Policy and reference are both base + SFT adapter at the start: KL exactly 0.
    assert rows(result.output_dir)[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    saved = load_file(result.artifact / "adapter_model.safetensors")
    assert not any(".ref." in k for k in saved), "the reference copy is not saved"
    # The check has teeth: with the bare base as the reference (the pitfall) the KL is not 0.
    monkeypatch.setattr(ppo, "keep_reference_copy", lambda model: None)
    raw["train"]["output_dir"] = str(tmp_path / "pitfall")
    pitfall = ppo.run(validate_config(raw), quiet=True)
    assert abs(rows(pitfall.output_dir)[0]["kl"]) > 0.01


def test_ppo_with_a_separate_critic(tmp_path, base_dir, alpaca_file):
    raw = ppo_config(base_dir, alpaca_file, tmp_path, {"critic": "separate", "vf_coef": 0.5})
    result = ppo.run(validate_config(raw), quiet=True)
    assert (result.output_dir / "critic" / "adapter_model.safetensors").is_file()
    assert all(math.isfinite(r["value_loss"]) for r in rows(result.output_dir))


def test_ppo_stops_on_a_broken_reward(tmp_path, base_dir, alpaca_file, monkeypatch):
    module = tmp_path / "bad_rewards.py"
    module.write_text(
        "def negative_inf(prompts, completions, **fields):\n    return [-float('inf')] * len(completions)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("bad_rewards", None)
    raw = ppo_config(
        base_dir, alpaca_file, tmp_path / "out", rewards=[{"function": "bad_rewards:negative_inf"}]
    )
    with pytest.raises(RewardError, match=r"reward negative_inf returned -inf for sample 0 \(prompt 'add"):
        ppo.run(validate_config(raw), quiet=True)


@pytest.mark.parametrize(
    ("ppo_options", "adapter", "message"),
    [
        ({"mini_batch_size": 3}, {}, "not a multiple of ppo.mini_batch_size = 3"),
        ({"critic_model": "x"}, {}, "critic_model applies to ppo.critic: separate"),
        ({}, {"method": "moe_dora"}, "adapter.method moe_dora cannot"),
    ],
)
def test_ppo_checks_its_combinations(tmp_path, base_dir, alpaca_file, ppo_options, adapter, message):
    raw = ppo_config(base_dir, alpaca_file, tmp_path, ppo_options, adapter)
    with pytest.raises(ValueError, match=message):
        ppo.run(validate_config(raw), quiet=True)


def test_ppo_resumed_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, base_dir, alpaca_file):
    import shutil

    raw = ppo_config(
        base_dir, alpaca_file, tmp_path / "full", {"kl_target": 0.5, "kl_horizon": 100}, max_steps=4
    )
    raw["train"]["save_steps"] = 2
    full = ppo.run(validate_config(raw), quiet=True)
    checkpoint = full.output_dir / "checkpoint-2"
    assert (checkpoint / "LMFORGE_COMPLETE").is_file() and not (full.output_dir / "checkpoint-4").exists()
    # An interrupted run: only checkpoint-2 survived.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(checkpoint, resumed_dir / "checkpoint-2")
    raw["train"].update(output_dir=str(resumed_dir), resume="auto")
    resumed = ppo.run(validate_config(raw), quiet=True)
    assert [r["step"] for r in rows(resumed_dir)] == [3, 4]
    last_full, last_resumed = rows(full.output_dir)[-1], rows(resumed_dir)[-1]
    for key in ("loss", "reward", "kl", "kl_coef", "value_loss", "completions/mean_length"):
        assert last_resumed[key] == pytest.approx(last_full[key], rel=1e-5, abs=1e-7), key
    a = load_file(full.artifact / "adapter_model.safetensors")
    b = load_file(resumed.artifact / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
