"""Masked-LM and sequence-classification stages on a tiny random BERT (and a causal classifier on
the tiny Llama): what trains, what stays frozen, saved adapters reproduce the model, learning
tests on synthetic text, and the errors bad records and wrong models get."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from conftest import WORDS, corpus
from lmforge.adapters.build import attach_adapter
from lmforge.artifacts import save_artifact
from lmforge.config import validate_config
from lmforge.config.adapter import AdapterConfig
from lmforge.config.model import ModelConfig
from lmforge.data.files import DataError
from lmforge.data.loader import load_examples
from lmforge.data.templates import get_template
from lmforge.data.tokenize import tokenize_classification
from lmforge.losses.ce import summed_cross_entropy
from lmforge.methods import classify, mlm
from lmforge.models.loading import load_classifier, load_masked_lm
from lmforge.models.tiny import build_tiny_bert, build_tiny_encoder_tokenizer, save_tiny


@pytest.fixture(scope="module")
def encoder_tokenizer():
    return build_tiny_encoder_tokenizer(corpus(), vocab_size=320)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, encoder_tokenizer):
    """A tiny random BERT (2 layers, hidden 64) with its pre-training heads, like bert-base."""
    return save_tiny(
        build_tiny_bert(encoder_tokenizer), encoder_tokenizer, tmp_path_factory.mktemp("tiny-bert")
    )


def window(start: int, length: int) -> str:
    """Consecutive words of the cyclic word list: each word is told by its neighbours."""
    return " ".join(WORDS[(start + j) % len(WORDS)] for j in range(length))


@pytest.fixture(scope="module")
def text_files(tmp_path_factory) -> dict:
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("mlm")
    train = [{"text": window(rng.randrange(len(WORDS)), rng.randint(6, 10))} for _ in range(300)]
    (folder / "train.json").write_text(json.dumps(train))
    # Held out: longer than any training text, so never seen whole.
    heldout = [window(start, 12) for start in range(0, len(WORDS), 2)]
    return {
        "train": folder / "train.json",
        "heldout": heldout,
        "train_texts": [r["text"] for r in train[:20]],
    }


@pytest.fixture(scope="module")
def keyword_file(tmp_path_factory):
    """The keyword task: label `yes` when the text contains "cat", else `no` (chance: 0.5)."""
    rng = random.Random(1)
    others = [w for w in WORDS if w != "cat"]
    records = []
    for i in range(300):
        words = [rng.choice(others) for _ in range(rng.randint(4, 8))]
        if i % 2:
            words.insert(rng.randrange(len(words) + 1), "cat")
        records.append({"text": " ".join(words), "label": "yes" if i % 2 else "no"})
    path = tmp_path_factory.mktemp("keyword") / "keyword.json"
    path.write_text(json.dumps(records))
    return path


def run_config(model_dir, data, output_dir, method: str, adapter: str = "lora", **train) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "method": {"name": method},
        "adapter": {"method": adapter, "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": str(data), "max_length": 32},
        "train": {
            "output_dir": str(output_dir),
            "batch_size": 16,
            "lr": 3e-3,
            "logging_steps": 10,
            "progress": False,
            "tensorboard": False,
            **train,
        },
    }


def masked_scores(model, tokenizer, texts: list[str]) -> tuple[float, float]:
    """(accuracy, mean loss) of predicting each token with it alone masked (deterministic)."""
    correct = total = 0
    loss = 0.0
    model.eval()
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        positions = list(range(1, len(ids) - 1))  # not <s> / </s>
        rows = torch.tensor([ids[:p] + [tokenizer.mask_token_id] + ids[p + 1 :] for p in positions])
        with torch.no_grad():
            logits = model(input_ids=rows).logits[range(len(positions)), positions]
        target = torch.tensor(ids[1:-1])
        correct += (logits.argmax(-1) == target).sum().item()
        loss += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        total += len(positions)
    return correct / total, loss / total


def load_mlm(path, adapter=None):
    from peft import PeftModel

    model, _ = load_masked_lm(ModelConfig(name_or_path=str(path)), quiet=True)
    return PeftModel.from_pretrained(model, adapter) if adapter else model


def test_mlm_lora_trains_only_the_adapter(tmp_path, encoder_tokenizer, bert_dir, text_files):
    base = load_file(bert_dir / "model.safetensors")
    config = run_config(bert_dir, text_files["train"], tmp_path / "run", "mlm", max_steps=40, lr=1e-2)
    result = mlm.run(validate_config(config), quiet=True)

    assert all(torch.equal(base[k], v) for k, v in load_file(bert_dir / "model.safetensors").items())
    adapter = load_file(result.artifact / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter), "only adapter weights train and are saved"
    assert json.loads((result.artifact / "adapter_config.json").read_text())["task_type"] is None
    texts = text_files["train_texts"]
    before = masked_scores(load_mlm(bert_dir), encoder_tokenizer, texts)[1]
    after = masked_scores(load_mlm(bert_dir, result.artifact), encoder_tokenizer, texts)[1]
    print(f"masked-LM loss on training texts (LoRA): {before:.3f} -> {after:.3f}")
    assert after < before - 0.05


def test_mlm_full_finetuning_raises_masked_token_accuracy_on_held_out_text(
    tmp_path, encoder_tokenizer, bert_dir, text_files
):
    config = run_config(
        bert_dir, text_files["train"], tmp_path / "run", "mlm", adapter="none", max_steps=300, lr=5e-3
    )
    config["method"]["mlm_probability"] = 0.2
    config["data"]["val_size"] = 0.1
    result = mlm.run(validate_config(config), quiet=True)
    assert 0 <= result.metrics["eval_accuracy"] <= 1
    before = masked_scores(load_mlm(bert_dir), encoder_tokenizer, text_files["heldout"])[0]
    after = masked_scores(load_mlm(result.artifact), encoder_tokenizer, text_files["heldout"])[0]
    print(f"held-out masked-token accuracy: {before:.3f} -> {after:.3f}")
    assert before <= 0.05
    assert after >= 0.4


@pytest.mark.parametrize("task", ["mlm", "classify"])
def test_a_saved_adapter_gives_identical_logits(tmp_path, encoder_tokenizer, bert_dir, task):
    """peft has no masked-LM task type (task_type None) and a classifier's head is saved beside its
    adapter (SEQ_CLS): both must load back to the same logits."""
    config = ModelConfig(name_or_path=str(bert_dir))

    def load():
        if task == "mlm":
            return load_masked_lm(config, quiet=True)[0]
        return load_classifier(config, ["no", "yes"], quiet=True)[0]

    torch.manual_seed(0)
    model = attach_adapter(
        load(), AdapterConfig(r=4), False, task_type="SEQ_CLS" if task == "classify" else None
    )
    with torch.no_grad():  # as if trained: every trainable tensor (adapter and head) moved
        for param in (p for p in model.parameters() if p.requires_grad):
            param.add_(torch.randn_like(param) * 0.1)
    save_artifact(model, encoder_tokenizer, get_template("plain"), tmp_path / "adapter", "adapter")

    from peft import PeftModel

    torch.manual_seed(1)  # a different fresh head: the saved one must replace it
    loaded = PeftModel.from_pretrained(load(), tmp_path / "adapter")
    batch = encoder_tokenizer(["the cat sat on a mat", "red blue green"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected, got = model.eval()(**batch).logits, loaded.eval()(**batch).logits
    assert torch.equal(expected, got)


def test_classify_lora_learns_a_keyword_and_saves_the_head(
    tmp_path, encoder_tokenizer, bert_dir, keyword_file
):
    base = load_file(bert_dir / "model.safetensors")
    config = run_config(bert_dir, keyword_file, tmp_path / "run", "classify", max_steps=100)
    config["data"]["val_size"] = 0.2
    checked = validate_config(config)
    result = classify.run(checked, quiet=True)
    print(f"keyword task, eval accuracy (chance 0.5): {result.metrics['eval_accuracy']:.3f}")
    assert result.metrics["eval_accuracy"] >= 0.8

    assert all(torch.equal(base[k], v) for k, v in load_file(bert_dir / "model.safetensors").items())
    adapter = load_file(result.artifact / "adapter_model.safetensors")
    assert any("classifier" in k for k in adapter), "the new head trains and is saved with the adapter"
    assert all("lora_" in k or "classifier" in k for k in adapter), "nothing else of the base trains"
    assert "0 = no, 1 = yes" in (result.artifact / "README.md").read_text()

    # The saved adapter + head on the base reproduces the evaluation loss.
    from peft import PeftModel

    torch.manual_seed(7)
    base_model, _ = load_classifier(ModelConfig(name_or_path=str(bert_dir)), ["no", "yes"], quiet=True)
    model = PeftModel.from_pretrained(base_model, result.artifact).eval()
    held = load_examples(checked.data, "classify").eval
    rows, _ = tokenize_classification(held, encoder_tokenizer, 32, {"no": 0, "yes": 1})
    batch = encoder_tokenizer.pad([{"input_ids": r["input_ids"]} for r in rows], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(rows["labels"])).item()
    assert loss == pytest.approx(result.metrics["eval_loss"], rel=1e-4)


def test_classify_a_causal_lm_fully_and_save_the_class_names(tmp_path, base_dir, keyword_file):
    config = run_config(base_dir, keyword_file, tmp_path / "run", "classify", adapter="none", max_steps=60)
    config["data"]["val_size"] = 0.2
    result = classify.run(validate_config(config), quiet=True)
    print(f"keyword task on a causal LM, eval accuracy (chance 0.5): {result.metrics['eval_accuracy']:.3f}")
    assert result.metrics["eval_accuracy"] >= 0.8
    saved = json.loads((result.artifact / "config.json").read_text())
    assert saved["id2label"] == {"0": "no", "1": "yes"}
    assert saved["architectures"] == ["LlamaForSequenceClassification"]


def test_summed_cross_entropy_by_hand():
    """Two rows of three classes; the second row's label is ignored (-100)."""
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, -100])
    nll = -math.log(math.exp(2) / (math.exp(2) + 2))  # 0.2395
    assert summed_cross_entropy({"logits": logits}, labels).item() == pytest.approx(nll)
    # Part of an accumulated batch of 4 labelled items: the sum over this part, divided by 4.
    both = torch.tensor([0, 1])
    expected = (nll - math.log(math.e / (math.e + 2))) / 4
    part = summed_cross_entropy({"logits": logits}, both, num_items_in_batch=4)
    assert part.item() == pytest.approx(expected)


def test_classify_batch_times_accumulation_is_equivalent(tmp_path, bert_dir, keyword_file):
    saved = []
    for batch_size, grad_accum in ((8, 1), (2, 4)):
        config = run_config(
            bert_dir, keyword_file, tmp_path / f"b{batch_size}", "classify", max_steps=2,
            batch_size=batch_size, grad_accum=grad_accum, lr=1e-2,
        )  # fmt: skip
        result = classify.run(validate_config(config), quiet=True)
        saved.append((load_file(result.artifact / "adapter_model.safetensors"), result.train_loss))
    (a, loss_a), (b, loss_b) = saved
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def write(path, records) -> str:
    path.write_text(json.dumps(records))
    return str(path)


def test_bad_records_and_wrong_models_are_refused_with_the_fix(tmp_path, bert_dir, base_dir):
    def run(records, **data):
        config = run_config(bert_dir, write(tmp_path / "data.json", records), tmp_path / "run", "classify")
        config["data"].update(data)
        return classify.run(validate_config(config), quiet=True)

    good = [{"text": "the cat", "label": 1}, {"text": "a dog", "label": 0}]
    with pytest.raises(DataError, match=r"data.json: record 1 has no `label`.*add `label` \(a class id"):
        run([good[0], {"text": "a dog"}])
    with pytest.raises(DataError, match=r"record 1 has `label` \[0, 1\] \(a list\); expected a class id"):
        run([good[0], {"text": "a dog", "label": [0, 1]}])
    with pytest.raises(
        DataError, match=r"mix class ids \(.*record 0: 1\) and class names \(.*record 1: 'no'\)"
    ):
        run([good[0], {"text": "a dog", "label": "no"}])
    with pytest.raises(DataError, match="only one class"):
        run([good[0], {"text": "a hat", "label": 1}])
    with pytest.raises(DataError, match=r"eval.json: record 0: label 5 is not a class of the training data"):
        run(good, eval_path=write(tmp_path / "eval.json", [{"text": "x", "label": 5}]))
    with pytest.raises(
        DataError, match="is a sft record; classification needs a `text` field and its `label`"
    ):
        run([{"instruction": "hi", "output": "hello"}])

    config = run_config(base_dir, write(tmp_path / "t.json", [{"text": "a"}]), tmp_path / "mlm", "mlm")
    with pytest.raises(ValueError, match=r"model_type llama\) has no masked-LM head.*method.name: pretrain"):
        mlm.run(validate_config(config), quiet=True)
    assert not (tmp_path / "mlm" / "config.yaml").exists(), "refused before anything is written or loaded"
    config["model"]["name_or_path"] = str(bert_dir)
    config["data"]["packing"] = True
    with pytest.raises(ValueError, match="data.packing is for causal SFT"):
        mlm.run(validate_config(config), quiet=True)
