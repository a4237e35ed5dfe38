"""Preference stages (DPO, ORPO, SimPO, KTO): the reference, the losses at step 1, learning, bad data."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import sft_config
from lmforge.adapters.moe_dora import MoeDoraModel
from lmforge.config import validate_config
from lmforge.data.files import DataError
from lmforge.data.formats import Example
from lmforge.data.templates import get_template
from lmforge.methods import dpo, kto, sft
from lmforge.models.loading import load_tokenizer
from lmforge.training.preference import score_pairs


def pair_records(pairs) -> list[dict]:
    """add a and b: the right sum is chosen, the sum off by one (a plausible slip) rejected."""
    return [
        {"instruction": f"add {a} and {b}", "chosen": str(a + b), "rejected": str(a + b + 1)}
        for a, b in pairs
    ]


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, base_dir, alpaca_file):
    """A LoRA SFT adapter on the addition task: the starting point of every preference stage."""
    out = tmp_path_factory.mktemp("sft")
    config = sft_config(base_dir, alpaca_file, out, max_steps=40, lr=5e-3, batch_size=16)
    return sft.run(validate_config(config), quiet=True).artifact


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.json"
    path.write_text(json.dumps(pair_records([(a, b) for a in range(10) for b in range(10)])))
    return path


def pref_config(base_dir, data, out, method, adapter=None, **train) -> dict:
    raw = sft_config(base_dir, data, out, **{"max_steps": 4, "lr": 5e-3, "batch_size": 8, **train})
    raw["method"] = method if isinstance(method, dict) else {"name": method}
    raw["adapter"] = {**raw["adapter"], **(adapter or {})}
    return raw


def logged(output_dir, key="loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row[key] for row in rows if key in row}


@pytest.mark.parametrize(
    ("loss_type", "extra", "expected"),
    [
        ("sigmoid", {}, math.log(2)),  # -log sigmoid(0)
        ("ipo", {"beta": 0.1}, (1 / (2 * 0.1)) ** 2),  # (0 - 1/(2 beta))^2
        ("hinge", {}, 1.0),  # relu(1 - 0)
        ("robust", {"label_smoothing": 0.2}, math.log(2)),  # ((1-e) log2 - e log2) / (1 - 2e)
    ],
)
def test_dpo_loss_types_start_at_their_formula(tmp_path, base_dir, pairs_file, loss_type, extra, expected):
    # A fresh adapter: policy == reference, so every margin is 0 and the loss is the formula at 0.
    method = {"name": "dpo", "loss_type": loss_type, **extra}
    config = validate_config(pref_config(base_dir, pairs_file, tmp_path, method, max_steps=2))
    frozen = load_file(base_dir / "model.safetensors")
    result = dpo.run(config, quiet=True)
    assert logged(result.output_dir)[1] == pytest.approx(expected, rel=1e-4)
    adapter = load_file(result.artifact / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k), "the adapter trained"
    assert not list(result.artifact.glob("ref")), "trl's reference copy is not saved"
    after = load_file(base_dir / "model.safetensors")
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)


# What each method logs per step, beside the loss (trl's names; logratio/* is lmforge's).
LOGGED = {
    "dpo": {"rewards/accuracies", "logps/chosen", "logps/rejected", "logratio/chosen", "logratio/rejected"},
    "orpo": {"rewards/accuracies", "logps/chosen", "logps/rejected", "log_odds_ratio", "nll_loss"},
    "simpo": {"rewards/accuracies", "logps/chosen", "logps/rejected"},
    "kto": {"kl", "logps/chosen", "logps/rejected"},
}


@pytest.mark.parametrize("method", list(LOGGED))
def test_each_method_logs_rewards_margins_and_log_ratios(tmp_path, base_dir, pairs_file, method):
    raw = pref_config(
        base_dir, pairs_file, tmp_path, {"name": method, "beta": 0.25}, max_steps=2, warmup_ratio=0.0
    )
    result = (kto if method == "kto" else dpo).run(validate_config(raw), quiet=True)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    step = next(row for row in rows if row.get("step") == 2 and "loss" in row)
    expected = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins"} | LOGGED[method]
    assert expected <= set(step), expected - set(step)
    assert step["rewards/margins"] == pytest.approx(
        step["rewards/chosen"] - step["rewards/rejected"], abs=1e-5
    )
    if method == "dpo":  # the policy moved at step 2, and logratio is the reward in beta-free units
        assert step["logratio/chosen"] != 0
        assert step["logratio/chosen"] == pytest.approx(step["rewards/chosen"] / 0.25, rel=1e-5)


@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_from_an_sft_adapter_uses_base_plus_that_adapter_as_reference(
    tmp_path, base_dir, pairs_file, sft_adapter, precompute
):
    # The policy starts as base + SFT adapter. Against that reference the first loss is exactly
    # log 2; against the bare base (the peers' pitfall) it would not be.
    method = {"name": "dpo", "precompute_ref": precompute}
    raw = pref_config(base_dir, pairs_file, tmp_path, method, {"path": str(sft_adapter)}, max_steps=1)
    result = dpo.run(validate_config(raw), quiet=True)
    assert logged(result.output_dir)[1] == pytest.approx(math.log(2), rel=1e-4)
    assert logged(result.output_dir, "rewards/margins")[1] == pytest.approx(0.0, abs=1e-4)
    # The check has teeth: against the bare base the same pairs have clearly non-zero margins.
    examples = [
        Example(turns=((r["instruction"], r["chosen"]),), rejected=r["rejected"])
        for r in json.loads(pairs_file.read_text())[:16]
    ]
    tokenizer = load_tokenizer(validate_config(raw).model)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    bare = score_pairs(base, tokenizer, get_template("chatml"), examples, 64)
    with_sft = score_pairs(
        PeftModel.from_pretrained(base, sft_adapter), tokenizer, get_template("chatml"), examples, 64
    )
    margins = 0.1 * ((with_sft.chosen - bare.chosen) - (with_sft.rejected - bare.rejected))
    assert margins.abs().mean() > 0.01


def test_bad_preference_data_is_named(tmp_path, base_dir, alpaca_file):
    def run(records):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(records))
        return dpo.run(validate_config(pref_config(base_dir, path, tmp_path / "out", "dpo")), quiet=True)

    with pytest.raises(DataError, match="no chosen/rejected pair"):
        dpo.run(validate_config(pref_config(base_dir, alpaca_file, tmp_path / "o", "dpo")), quiet=True)
    same = pair_records([(1, 2)] * 3)
    same[1]["rejected"] = same[1]["chosen"]
    with pytest.raises(DataError, match=r"bad\.json.*identical chosen and rejected"):
        run(same)
    empty = pair_records([(1, 2)] * 3)
    empty[2]["instruction"] = " "
    with pytest.raises(DataError, match="empty prompt"):
        run(empty)
    with pytest.raises(ValueError, match="method.gamma applies to simpo"):
        validate_config(pref_config(base_dir, alpaca_file, tmp_path, {"name": "dpo", "gamma": 1.0}))
    with pytest.raises(ValueError, match="no full fine-tuning"):
        dpo.run(validate_config(pref_config(base_dir, alpaca_file, tmp_path, "dpo", {"method": "none"})))


def test_reward_model_trains_saves_and_scores(tmp_path, base_dir, pairs_file):
    from typer.testing import CliRunner

    from lmforge.cli import app
    from lmforge.inference.reward import RewardModel
    from lmforge.methods import reward

    raw = pref_config(base_dir, pairs_file, tmp_path / "run", "reward", max_steps=6, lr=5e-3)
    result = reward.run(validate_config(raw), quiet=True)
    adapter = load_file(result.artifact / "adapter_model.safetensors")
    assert any("score" in k for k in adapter), "the score head is saved with the adapter"
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert logged(result.output_dir)  # losses logged per step
    model = RewardModel.load(result.artifact)
    scores = model.score([("add 1 and 2", "3"), ("add 1 and 2", "4")])
    assert len(scores) == 2 and scores[0] != scores[1]
    # Scoring renders a pair as training did (trl applies the saved chat template to the messages).
    messages = [{"role": "user", "content": "add 1 and 2"}, {"role": "assistant", "content": "3"}]
    rendered = model.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert model.encode("add 1 and 2", "3") == list(rendered)
    cli = CliRunner().invoke(
        app,
        [
            "reward",
            "score",
            "--model",
            str(result.artifact),
            "--data",
            str(pairs_file),
            "--out",
            str(tmp_path / "s.jsonl"),
        ],
    )
    assert cli.exit_code == 0, cli.output
    assert "chosen scored above rejected in" in cli.output
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 100 and {"score", "rejected_score"} <= set(rows[0])
    one = CliRunner().invoke(
        app,
        ["reward", "score", "--model", str(result.artifact), "--prompt", "add 1 and 2", "--response", "3"],
    )
    assert one.exit_code == 0 and float(one.output.strip()) == pytest.approx(scores[0], abs=1e-3)
    bad = CliRunner().invoke(app, ["reward", "score", "--model", str(result.artifact), "--prompt", "x"])
    assert bad.exit_code == 1 and "--prompt with --response" in bad.output


@pytest.mark.parametrize("method", ["dpo", "orpo", "simpo", "kto"])
@pytest.mark.parametrize(
    "variant", ["qlora", "dora", "adalora", "ia3", "oft", "vera", "fourierft", "moe_dora"]
)
def test_method_trains_every_adapter_kind(tmp_path, base_dir, pairs_file, method, variant):
    adapter = {"method": "lora" if variant == "qlora" else variant, "r": 4}
    raw = pref_config(base_dir, pairs_file, tmp_path, method, adapter, max_steps=2, lr=LR.get(variant, 5e-3))
    if variant == "qlora":
        pytest.importorskip("bitsandbytes")
        raw["model"]["quantization"] = "4bit"
    result = (kto if method == "kto" else dpo).run(validate_config(raw), quiet=True)
    assert all(math.isfinite(v) for v in logged(result.output_dir).values())
    if method == "dpo":  # the reference is the starting model for every kind (MoE-DoRA: precomputed)
        assert logged(result.output_dir, "rewards/margins")[1] == pytest.approx(0.0, abs=1e-5)
        aux = 0.01 * logged(result.output_dir, "moe_aux_loss")[1] if variant == "moe_dora" else 0.0
        assert logged(result.output_dir)[1] == pytest.approx(math.log(2) + aux, rel=1e-4)
    if variant == "moe_dora":  # its load-balancing loss is part of every preference loss
        assert logged(result.output_dir, "moe_aux_loss")
    # The saved adapter changed the model (every kind starts as the identity on the base).
    batch = {"input_ids": torch.tensor([[5, 17, 42, 99, 3, 8]])}
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        before = base(**batch).logits
        loader = MoeDoraModel if variant == "moe_dora" else PeftModel
        after = loader.from_pretrained(base, result.artifact).eval()(**batch).logits
    assert (after - before).abs().max() > 1e-5


# Vector-only adapters need larger steps to move in two steps (as in the adapter tests).
LR = {"ia3": 5e-2, "vera": 1e-1, "fourierft": 5e-2}


def test_kto_reads_unpaired_labels(tmp_path, base_dir):
    records = [
        {"instruction": f"add {a} and {b}", "output": str(a + b + (a + b) % 2), "label": (a + b) % 2 == 0}
        for a in range(6)
        for b in range(6)
    ]
    path = tmp_path / "kto.json"
    path.write_text(json.dumps(records))
    method = {"name": "kto", "desirable_weight": 1.0, "undesirable_weight": 1.5}
    result = kto.run(
        validate_config(pref_config(base_dir, path, tmp_path / "out", method, max_steps=3)), quiet=True
    )
    assert all(math.isfinite(v) for v in logged(result.output_dir).values())
    with pytest.raises(ValueError, match="batch_size >= 2"):
        kto.run(validate_config(pref_config(base_dir, path, tmp_path / "o", "kto", batch_size=1)))


def test_every_preference_stage_counts_the_tokens_it_trains_on(tmp_path, base_dir, pairs_file):
    """The progress bar's tokens/s reads state.num_input_tokens_seen: transformers counts DPO's
    batches; ORPO, SimPO, KTO and reward batches (no `input_ids`, or not asked) are counted by
    lmforge from their attention masks. Each pair is the same prompt + chosen and prompt + rejected
    rows in every stage, so the counts agree with DPO's."""
    from lmforge.methods import reward

    counts = {}
    for method in ("dpo", "orpo", "simpo", "kto", "reward"):
        raw = pref_config(base_dir, pairs_file, tmp_path / method, method, max_steps=2, batch_size=4)
        stage = {"kto": kto, "reward": reward}.get(method, dpo)
        stage.run(validate_config(raw), quiet=True)
        counts[method] = logged(tmp_path / method, "num_input_tokens_seen")
    for method, seen in counts.items():
        assert seen[2] > seen[1] > 0, method
    for method in ("orpo", "simpo", "reward"):
        assert counts[method][2] == pytest.approx(counts["dpo"][2], rel=0.15), counts
