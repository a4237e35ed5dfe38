"""GRPO: rewards (built-ins, user functions, reward models with their own tokenizer), the trainer
path, logging and samples, and the errors a broken reward raises."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from helpers import sft_config
from lmforge.config import validate_config
from lmforge.config.rl import RewardSpec
from lmforge.methods import grpo
from lmforge.methods.rewards import RewardError, build_rewards
from lmforge.models.loading import TEMPLATE_FILE
from lmforge.models.tiny import build_tiny_llama, build_tiny_tokenizer

USER_MODULE = '''
def digits(prompts, completions, **fields):
    """Share of the completion's characters that are digits."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

def boom(prompts, completions, **fields):
    for c in completions:
        if "7" in c:
            raise ZeroDivisionError("no sevens")
    return [0.0] * len(completions)

def nan_on_second(prompts, completions, **fields):
    return [float("nan") if i == 1 else 0.0 for i in range(len(completions))]

def too_few(prompts, completions, **fields):
    return [0.0]
'''


@pytest.fixture(scope="module")
def user_rewards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user-rewards")
    (folder / "my_rewards.py").write_text(USER_MODULE)
    sys.path.insert(0, str(folder))
    yield "my_rewards"
    sys.path.remove(str(folder))
    sys.modules.pop("my_rewards", None)


def grpo_config(base_dir, data, out, rewards, grpo_options=None, **train) -> dict:
    raw = sft_config(base_dir, data, out, **{"max_steps": 2, "lr": 5e-3, "batch_size": 8, **train})
    raw["method"] = {
        "name": "grpo",
        "rewards": rewards,
        "sampling": {"num_generations": 4, "max_completion_length": 8},
        "grpo": grpo_options or {},
        "samples_every": 1,
    }
    return raw


def test_builtin_rewards_score_by_hand():
    sources = {
        s.spec.label: s
        for s in build_rewards(
            [
                RewardSpec(builtin="exact_answer"),
                RewardSpec(builtin="think_format"),
                RewardSpec(builtin="length", target_tokens=4),
                RewardSpec(builtin="regex", pattern=r"^\d+$"),
            ]
        )
    }
    completions = ["<think>\n2+3\n</think>\n\nThe answer is 5.", "5", "<think></think>6", "\\boxed{5}"]
    fields = {"answer": ["5", "5", "5", "5"], "completion_ids": [[1] * 2, [1] * 4, [1] * 6, [1] * 9]}
    prompts = ["add 2 and 3"] * 4
    assert sources["exact_answer"].score(prompts, completions, **fields) == [1.0, 1.0, 0.0, 1.0]
    assert sources["think_format"].score(prompts, completions, **fields) == [1.0, 0.0, 0.0, 0.0]
    assert sources["length"].score(prompts, completions, **fields) == [0.0, 0.0, -0.5, -1.0]
    assert sources["regex"].score(prompts, completions, **fields) == [0.0, 1.0, 0.0, 0.0]
    with pytest.raises(RewardError, match="no `answer` field"):
        sources["exact_answer"].score(prompts, completions, completion_ids=fields["completion_ids"])


def test_broken_user_rewards_stop_with_the_function_and_sample(user_rewards):
    prompts, completions = ["a", "b", "c"], ["12", "17", "3"]
    raising = build_rewards([RewardSpec(function=f"{user_rewards}:boom")])[0]
    with pytest.raises(
        RewardError, match=r"reward boom raised ZeroDivisionError: no sevens on sample 1 .*'17'"
    ):
        raising.score(prompts, completions)
    nan = build_rewards([RewardSpec(function=f"{user_rewards}:nan_on_second")])[0]
    with pytest.raises(RewardError, match=r"reward nan_on_second returned nan for sample 1 .*'b'"):
        nan.score(prompts, completions)
    few = build_rewards([RewardSpec(function=f"{user_rewards}:too_few")])[0]
    with pytest.raises(RewardError, match="returned 1 values for 3 completions"):
        few.score(prompts, completions)
    with pytest.raises(ValueError, match="cannot import no_such_module"):
        build_rewards([RewardSpec(function="no_such_module:f")])
    with pytest.raises(ValueError, match="has no function missing"):
        build_rewards([RewardSpec(function=f"{user_rewards}:missing")])


def test_grpo_trains_logs_every_reward_and_writes_samples(tmp_path, base_dir, alpaca_file, user_rewards):
    rewards = [
        {"builtin": "exact_answer", "weight": 1.0},
        {"builtin": "think_format", "weight": 0.5},
        {"builtin": "length", "target_tokens": 4, "weight": 0.1},
        {"builtin": "regex", "pattern": r"\d", "weight": 0.2},
        {"function": f"{user_rewards}:digits", "weight": 0.3},
    ]
    raw = grpo_config(base_dir, alpaca_file, tmp_path, rewards, {"beta": 0.04})
    frozen = load_file(base_dir / "model.safetensors")
    result = grpo.run(validate_config(raw), quiet=True)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    step = next(row for row in rows if row.get("step") == 2 and "loss" in row)
    for name in ("exact_answer", "think_format", "length", "regex", "digits"):
        assert f"rewards/{name}/mean" in step and f"rewards/{name}/std" in step
    for key in ("reward", "reward_std", "kl", "entropy", "completions/mean_length", "clip_ratio/region_mean"):
        assert math.isfinite(step[key]), key
    samples = [json.loads(line) for line in (result.output_dir / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and len(samples) == 16  # 8 completions per step
    weights = {"exact_answer": 1.0, "think_format": 0.5, "length": 0.1, "regex": 0.2, "digits": 0.3}
    for sample in samples:
        assert sample["prompt"].startswith("add ")
        assert sample["total"] == pytest.approx(sum(weights[k] * v for k, v in sample["rewards"].items()))
    # Only the adapter trained; the base is untouched and no reference copy is saved.
    after = load_file(base_dir / "model.safetensors")
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    adapter = load_file(result.artifact / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert not any(".ref." in k for k in adapter)


def test_grpo_stops_on_a_broken_reward(tmp_path, base_dir, alpaca_file, user_rewards):
    raw = grpo_config(base_dir, alpaca_file, tmp_path, [{"function": f"{user_rewards}:nan_on_second"}])
    with pytest.raises(RewardError, match="reward nan_on_second returned nan for sample 1"):
        grpo.run(validate_config(raw), quiet=True)


def test_grpo_checks_its_combinations(tmp_path, base_dir, alpaca_file):
    raw = grpo_config(base_dir, alpaca_file, tmp_path, [{"builtin": "exact_answer"}], batch_size=6)
    with pytest.raises(ValueError, match="not a multiple of method.sampling.num_generations = 4"):
        grpo.run(validate_config(raw), quiet=True)
    raw = grpo_config(base_dir, alpaca_file, tmp_path, [{"builtin": "exact_answer"}], {"beta": 0.1})
    raw["adapter"]["method"] = "moe_dora"
    with pytest.raises(ValueError, match="set method.grpo.beta: 0"):
        grpo.run(validate_config(raw), quiet=True)


@pytest.fixture(scope="module")
def foreign_reward_model(tmp_path_factory):
    """A one-output classifier with its own, different tokenizer (another vocabulary and size)."""
    words = "good bad answer right wrong number zero one two three four five six seven eight nine".split()
    lines = [" ".join(words[(i * 5 + j) % len(words)] for j in range(6)) for i in range(100)]
    lines += [f"{a} {b} {a + b}" for a in range(10) for b in range(10)]
    tokenizer = build_tiny_tokenizer(lines, vocab_size=200)
    causal = build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=3)
    config = causal.config
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_config(config)
    path = tmp_path_factory.mktemp("foreign-reward")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / TEMPLATE_FILE).write_text("chatml")
    return path, tokenizer


def test_reward_model_with_another_tokenizer_scores_decoded_text(
    tmp_path, base_dir, alpaca_file, tokenizer, foreign_reward_model
):
    path, foreign = foreign_reward_model
    assert foreign.get_vocab() != tokenizer.get_vocab()
    source = build_rewards([RewardSpec(model=str(path))])[0]
    prompts, completions = ["add 2 and 3", "add 4 and 4"], ["5", "9"]
    scores = source.score(prompts, completions)
    # The same text, tokenized by the reward model's own tokenizer and template, scored directly.
    from lmforge.data.templates import Conversation, get_template

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    for prompt, completion, score in zip(prompts, completions, scores, strict=True):
        segments = get_template("chatml").encode(Conversation(turns=[(prompt, completion)]), foreign)
        ids = torch.tensor([[t for p, r in segments for t in p + r]])
        with torch.no_grad():
            assert model(input_ids=ids).logits[0, 0].item() == pytest.approx(score, abs=1e-5)
    # And GRPO trains a policy with another tokenizer against it.
    raw = grpo_config(base_dir, alpaca_file, tmp_path, [{"model": str(path)}])
    result = grpo.run(validate_config(raw), quiet=True)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/reward_model/mean" in row for row in rows)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert isinstance(PeftModel.from_pretrained(base, result.artifact), PeftModel)


def test_grpo_kl_is_measured_against_the_sft_adapter_it_continues(tmp_path, base_dir, alpaca_file):
    from lmforge.methods import sft

    sft_raw = sft_config(base_dir, alpaca_file, tmp_path / "sft", max_steps=20, lr=5e-3)
    sft_out = sft.run(validate_config(sft_raw), quiet=True)
    raw = grpo_config(base_dir, alpaca_file, tmp_path / "grpo", [{"builtin": "exact_answer"}], {"beta": 0.1})
    raw["adapter"]["path"] = str(sft_out.artifact)
    raw["train"]["max_steps"] = 1
    result = grpo.run(validate_config(raw), quiet=True)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    # At the first step the policy is base + SFT adapter, and so is the reference: KL 0.
    assert next(r for r in rows if "kl" in r)["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ({"name": "grpo"}, "method.name grpo needs method.rewards"),
        ({"name": "dpo", "rewards": [{"builtin": "exact_answer"}]}, "method.rewards applies to grpo/ppo"),
        ({"name": "sft", "grpo": {"beta": 0.1}}, "method.grpo applies to grpo, not method.name sft"),
        ({"name": "grpo", "rewards": [{"builtin": "regex"}]}, "builtin regex needs `pattern`"),
        (
            {"name": "grpo", "rewards": [{"builtin": "regex", "pattern": "("}]},
            "not a valid regular expression",
        ),
        ({"name": "grpo", "rewards": [{"function": "no_colon"}]}, "must look like package.module:function"),
        ({"name": "ppo", "rewards": [{"builtin": "exact_answer", "model": "m"}]}, "exactly one of builtin"),
        (
            {"name": "grpo", "rewards": [{"builtin": "exact_answer"}, {"builtin": "exact_answer"}]},
            "names repeat",
        ),
    ],
)
def test_rl_config_errors_name_the_key_and_the_fix(tmp_path, base_dir, alpaca_file, method, message):
    raw = sft_config(base_dir, alpaca_file, tmp_path)
    raw["method"] = method
    with pytest.raises(ValueError, match=message):
        validate_config(raw)


def test_grpo_resumes_from_its_latest_complete_checkpoint(tmp_path, base_dir, alpaca_file):
    import shutil

    rewards = [{"builtin": "length", "target_tokens": 4}, {"builtin": "regex", "pattern": r"\d"}]  # they vary
    raw = grpo_config(base_dir, alpaca_file, tmp_path / "full", rewards)
    raw["train"]["save_steps"] = 1
    full = grpo.run(validate_config(raw), quiet=True)
    assert (full.output_dir / "checkpoint-1" / "LMFORGE_COMPLETE").is_file()
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(full.output_dir / "checkpoint-1", resumed_dir / "checkpoint-1")
    raw["train"].update(output_dir=str(resumed_dir), resume="auto")
    resumed = grpo.run(validate_config(raw), quiet=True)
    steps = [json.loads(line)["step"] for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert resumed.steps == 2 and 1 not in steps and 2 in steps, "only step 2 ran after resuming"
    # the resumed run equals the uninterrupted one: same step-2 loss, same final adapter
    from safetensors.torch import load_file

    def step_2(folder):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return next(r["loss"] for r in rows if r.get("step") == 2 and "loss" in r)

    assert step_2(resumed_dir) == pytest.approx(step_2(full.output_dir), abs=1e-6)
    whole, again = (load_file(run.artifact / "adapter_model.safetensors") for run in (full, resumed))
    assert whole.keys() == again.keys() and any(v.abs().sum() > 0 for k, v in whole.items() if "lora_B" in k)
    assert all(torch.allclose(whole[k], again[k], atol=1e-6) for k in whole)
