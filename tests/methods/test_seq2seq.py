"""Seq2seq SFT on encoder-decoder models (tiny random T5 and MarianMT): what trains and what stays
frozen, the saved adapter reproduces the trained model, a copy task is learned, predict and eval."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq
from typer.testing import CliRunner

from lmforge import methods
from lmforge.adapters.build import target_modules
from lmforge.cli import app
from lmforge.config import validate_config
from lmforge.config.adapter import AdapterConfig
from lmforge.config.loader import validate_eval_config
from lmforge.data.files import DataError
from lmforge.data.formats import to_example
from lmforge.data.templates import Conversation
from lmforge.data.tokenize import seq2seq_source, tokenize_seq2seq
from lmforge.evaluation.runner import evaluate
from lmforge.inference.engine import Engine, SamplingParams
from lmforge.models.tiny import build_tiny_marian, build_tiny_t5, save_tiny

BUILDERS = {"t5": build_tiny_t5, "marian": build_tiny_marian}


@pytest.fixture(scope="module")
def seq2seq_dirs(tmp_path_factory, tokenizer) -> dict:
    """Tiny random T5 and MarianMT (2+2 layers, d_model 64) with the tiny tokenizer."""
    return {
        family: save_tiny(build(tokenizer), tokenizer, tmp_path_factory.mktemp(f"tiny-{family}"))
        for family, build in BUILDERS.items()
    }


@pytest.fixture(scope="module")
def copy_files(tmp_path_factory) -> dict:
    """The copy task: 2-3 digit strings as source and target; held-out strings never trained on."""
    rng = random.Random(0)
    strings = [f"{n:02d}" for n in range(100)] + [f"{n:03d}" for n in range(1000)]
    rng.shuffle(strings)
    folder = tmp_path_factory.mktemp("copy")
    files = {}
    for name, part in (("train", strings[:400]), ("heldout", strings[400:440]), ("eval8", strings[440:448])):
        files[name] = folder / f"{name}.json"
        files[name].write_text(json.dumps([{"source": s, "target": s} for s in part]))
    return files


def seq2seq_config(base_dir, data, output_dir, adapter: str = "lora", **train) -> dict:
    return {
        "model": {"name_or_path": str(base_dir)},
        "adapter": {"method": adapter, "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": str(data), "max_length": 16},
        "train": {
            "output_dir": str(output_dir),
            "batch_size": 8,
            "lr": 5e-3,
            "logging_steps": 1,
            "progress": False,
            "tensorboard": False,
            **train,
        },
    }


def losses(output_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def exact(engine: Engine, path) -> float:
    records = json.loads(path.read_text())
    outputs = engine.generate(
        [Conversation(turns=[(r["source"], "")]) for r in records], SamplingParams(max_new_tokens=6)
    )
    return sum(o == r["target"] for o, r in zip(outputs, records, strict=True)) / len(records)


EXPECTED_TARGETS = {
    "t5": {"q", "k", "v", "o", "wi", "wo"},
    "marian": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
}


@pytest.mark.parametrize("family", ["t5", "marian"])
def test_lora_trains_only_the_adapter_and_the_saved_adapter_reproduces_the_model(
    tmp_path, tokenizer, seq2seq_dirs, copy_files, family
):
    base_dir = seq2seq_dirs[family]
    base = load_file(base_dir / "model.safetensors")
    config = seq2seq_config(base_dir, copy_files["train"], tmp_path / "run", max_steps=12)
    config["data"]["eval_path"] = str(copy_files["eval8"])
    result = methods.run(validate_config(config), quiet=True)

    seen = losses(result.output_dir)
    assert seen[12] < seen[1]
    after = load_file(base_dir / "model.safetensors")
    assert all(torch.equal(base[k], after[k]) for k in base), "the base files are untouched"
    adapter = load_file(result.artifact / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter), "only adapter weights are saved"
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k), "LoRA B moved from zero"
    saved = json.loads((result.artifact / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_2_SEQ_LM"
    assert set(saved["target_modules"]) == EXPECTED_TARGETS[family]

    # The saved adapter on the base is the trained model: the same loss on the evaluation batch.
    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base_dir), result.artifact).eval()
    rows, _ = tokenize_seq2seq(
        [to_example(r, "", "auto") for r in json.loads(copy_files["eval8"].read_text())], tokenizer, 16
    )
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)(list(rows))
    with torch.no_grad():
        loss = model(**batch).loss.item()
    assert loss == pytest.approx(result.metrics["eval_loss"], rel=1e-5)
    assert 0 <= result.metrics["eval_accuracy"] <= 1

    # Merged into the base, the same model: equal loss; and causal-only stages refuse it clearly.
    from lmforge.export.merge import merge_adapter

    merged = AutoModelForSeq2SeqLM.from_pretrained(
        merge_adapter(str(base_dir), result.artifact, tmp_path / "merged")
    )
    with torch.no_grad():
        assert merged(**batch).loss.item() == pytest.approx(loss, rel=1e-4)
    dpo_config = {**config, "method": {"name": "dpo"}}
    from lmforge.training.stage import load_model_for_training

    with pytest.raises(ValueError, match="encoder-decoder model"):
        load_model_for_training(validate_config(dpo_config), quiet=True)


def test_batch_times_accumulation_is_equivalent(tmp_path, seq2seq_dirs, copy_files):
    """Target tokens weigh the same however the batch is split (see `summed_cross_entropy`)."""
    saved = []
    for batch_size, grad_accum in ((8, 1), (2, 4)):
        config = seq2seq_config(
            seq2seq_dirs["t5"], copy_files["train"], tmp_path / f"b{batch_size}", max_steps=2,
            batch_size=batch_size, grad_accum=grad_accum, lr=1e-2,
        )  # fmt: skip
        result = methods.run(validate_config(config), quiet=True)
        saved.append((load_file(result.artifact / "adapter_model.safetensors"), result.train_loss))
    (a, loss_a), (b, loss_b) = saved
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_from_a_checkpoint_matches_the_uninterrupted_run(tmp_path, seq2seq_dirs, copy_files):

    def run(output_dir, resume: str = "none"):
        config = seq2seq_config(
            seq2seq_dirs["marian"], copy_files["train"], output_dir, max_steps=4, batch_size=4,
            save_steps=2, save_total_limit=None, resume=resume,
        )  # fmt: skip
        return methods.run(validate_config(config), quiet=True)

    run(tmp_path / "full")
    (tmp_path / "killed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "killed" / "checkpoint-2")
    run(tmp_path / "killed", resume="auto")
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "killed")
    assert min(resumed) == 3
    assert [resumed[s] for s in (3, 4)] == pytest.approx([full[s] for s in (3, 4)], rel=1e-6)


def test_presets_name_t5_and_marian_layers(tokenizer):
    t5, gated, marian = (
        build_tiny_t5(tokenizer),
        build_tiny_t5(tokenizer, gated=True),
        build_tiny_marian(tokenizer),
    )

    def targets(model, preset: str) -> set[str]:
        return set(target_modules(AdapterConfig(preset=preset), model))

    assert targets(t5, "all") == {"q", "k", "v", "o", "wi", "wo"}
    assert targets(gated, "ffn_only") == {"wi_0", "wi_1", "wo"}
    assert targets(t5, "attention_only") == {"q", "k", "v", "o"}
    assert targets(t5, "minimal") == {"q", "v"}
    assert targets(marian, "attention_only") == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert targets(marian, "ffn_only") == {"fc1", "fc2"}
    assert "lm_head" not in targets(marian, "all")


@pytest.fixture(scope="module")
def copy_run(tmp_path_factory, seq2seq_dirs, copy_files):
    """Full fine-tuning of the tiny T5 on the copy task through the real driver."""
    out = tmp_path_factory.mktemp("copy-run") / "run"
    config = seq2seq_config(
        seq2seq_dirs["t5"], copy_files["train"], out, adapter="none", max_steps=400, batch_size=32, lr=2e-3
    )
    config["train"]["logging_steps"] = 50
    return methods.run(validate_config(config), quiet=True)


def test_full_finetuning_learns_to_copy_held_out_strings(seq2seq_dirs, copy_files, copy_run):
    before = exact(Engine.load(str(seq2seq_dirs["t5"])), copy_files["heldout"])
    after = exact(Engine.load(str(copy_run.artifact)), copy_files["heldout"])
    print(f"held-out exact match: {before:.3f} -> {after:.3f}")
    assert before <= 0.05
    assert after >= 0.3
    assert (copy_run.artifact / "model.safetensors").is_file()
    assert "plain text (no chat template)" in (copy_run.artifact / "README.md").read_text()


def test_predict_and_eval_generation_score_a_seq2seq_model(tmp_path, copy_files, copy_run):
    out = tmp_path / "preds.jsonl"
    args = ["predict", "--model", str(copy_run.artifact), "--data", str(copy_files["heldout"])]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    records = json.loads(copy_files["heldout"].read_text())
    assert [r["prompt"] for r in rows] == [r["source"] for r in records]  # the source, untemplated
    assert [r["reference"] for r in rows] == [r["target"] for r in records]
    engine = Engine.load(str(copy_run.artifact))
    expected = engine.generate(
        [Conversation(turns=[(r["source"], "")]) for r in records], SamplingParams(max_new_tokens=6)
    )
    assert [r["output"] for r in rows] == expected
    predicted = sum(r["output"] == r["reference"] for r in rows) / len(rows)

    config = {
        "output_dir": str(tmp_path / "eval"),
        "models": [{"name": "t5", "path": str(copy_run.artifact)}],
        "generation": {"max_new_tokens": 6},
        "tasks": [{"kind": "generation", "data": str(copy_files["heldout"])}],
    }
    metrics = evaluate(validate_eval_config(config), quiet=True).results["t5"]["generation"]
    assert metrics["exact_match"] == pytest.approx(predicted)
    assert metrics["exact_match"] > 0
    assert {"rouge1", "rouge2", "rougeL", "bleu"} <= set(metrics)

    config["tasks"] = [{"kind": "perplexity", "data": str(copy_files["heldout"])}]
    with pytest.raises(ValueError, match="encoder-decoder: evaluate it with generation tasks"):
        evaluate(validate_eval_config(config), quiet=True, force=True)


def test_qlora_on_a_4bit_t5(tmp_path, seq2seq_dirs, copy_files):
    pytest.importorskip("bitsandbytes")
    config = seq2seq_config(seq2seq_dirs["t5"], copy_files["train"], tmp_path / "run", max_steps=3)
    config["model"]["quantization"] = "4bit"
    result = methods.run(validate_config(config), quiet=True)
    assert torch.isfinite(torch.tensor(result.train_loss))
    adapter = load_file(result.artifact / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)


def test_source_target_records_and_the_source_text():
    example = to_example({"source": "Hallo Welt", "target": "Hello world"}, "pairs.json: record 0", "auto")
    assert (example.prompt, example.response, example.kind) == ("Hallo Welt", "Hello world", "sft")
    assert seq2seq_source("The cat sat.", "summarize:") == "summarize: The cat sat."
    assert seq2seq_source("The cat sat.", None) == "The cat sat."


def test_seq2seq_refuses_packing_and_multi_turn_records(tmp_path, seq2seq_dirs):
    chats = tmp_path / "chats.json"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] * 2
    chats.write_text(json.dumps([{"messages": turns}]))
    config = seq2seq_config(seq2seq_dirs["t5"], chats, tmp_path / "run", max_steps=1)
    with pytest.raises(DataError, match=r"chats.json: record 0: has 2 turns.*single-turn records"):
        methods.run(validate_config(config), quiet=True)
    config["data"]["packing"] = True
    with pytest.raises(ValueError, match="set data.packing: false"):
        methods.run(validate_config(config), quiet=True)
