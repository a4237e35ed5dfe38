"""Quantizing: bitsandbytes checkpoints reload quantized and close to the 16-bit model; GPTQ's
calibration text and plumbing; every refusal names the folder and the fix."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lmforge.config.model import ModelConfig
from lmforge.data.formats import Example
from lmforge.data.templates import get_template
from lmforge.export import quantize
from lmforge.export.quantize import QuantizeError, calibration_texts, cpu_4bit_blockers, quantize_model
from lmforge.inference.predict import read_examples
from lmforge.models.loading import load_causal_lm
from lmforge.models.tiny import build_tiny_llama, save_tiny

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT = "<|im_start|>user\nadd 3 and 4<|im_end|>\n<|im_start|>assistant\n7<|im_end|>\nthe cat sat on a mat"


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory, base_dir):
    """The tiny Llama laid out like a merged lmforge model (with its saved template name)."""
    path = tmp_path_factory.mktemp("quantize-src") / "merged"
    shutil.copytree(base_dir, path)
    (path / "lmforge_template.txt").write_text("chatml\n")
    return path


def cosine_per_position(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


@pytest.mark.parametrize(
    ("method", "flag", "layer", "stored", "min_cos", "min_same_argmax"),
    [
        ("bnb-4bit", "load_in_4bit", "Linear4bit", torch.uint8, 0.95, 0.5),
        ("bnb-8bit", "load_in_8bit", "Linear8bitLt", torch.int8, 0.99, 0.9),
    ],
)
def test_bnb_checkpoint_reloads_quantized_and_close_to_16bit(
    tmp_path, merged_dir, tokenizer, method, flag, layer, stored, min_cos, min_same_argmax
):
    out = quantize_model(merged_dir, tmp_path / "q", method)

    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "bitsandbytes" and quant[flag] is True
    if method == "bnb-4bit":
        assert quant["bnb_4bit_quant_type"] == "nf4" and quant["bnb_4bit_use_double_quant"] is True
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "README.md", "lmforge_template.txt"} <= names
    assert (out / "lmforge_template.txt").read_text().strip() == "chatml"
    card = (out / "README.md").read_text()
    assert f"`{method}`" in card and str(merged_dir) in card
    assert not list(tmp_path.glob(".q.*")), "no temporary folder is left behind"

    # The linear weights are stored packed: 4-bit = two weights per uint8, 8-bit = one int8 each.
    with (
        safe_open(merged_dir / "model.safetensors", "pt") as f16,
        safe_open(out / "model.safetensors", "pt") as q,
    ):
        for i in range(2):
            for name in LINEARS:
                key = next(
                    k for k in f16.keys() if k.startswith(f"model.layers.{i}.") and f".{name}.weight" in k
                )
                weight = q.get_tensor(key)
                assert weight.dtype == stored, key
                expected = f16.get_tensor(key).numel() // (2 if method == "bnb-4bit" else 1)
                assert weight.numel() == expected, key

    model, _ = load_causal_lm(ModelConfig(name_or_path=str(out)), for_training=False, quiet=True)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == layer
    reference = AutoModelForCausalLM.from_pretrained(merged_dir)
    ids = tokenizer([PROMPT], return_tensors="pt")
    with torch.no_grad():
        quantized_logits = model(**ids).logits[0]
        reference_logits = reference(**ids).logits[0]
    # A random model of the same shape scores about 0 on both (checked when writing this test).
    assert cosine_per_position(quantized_logits, reference_logits).min() > min_cos
    same = (quantized_logits.argmax(-1) == reference_logits.argmax(-1)).float().mean()
    assert same >= min_same_argmax


def test_bnb_4bit_options_reach_the_saved_config(tmp_path, merged_dir):
    out = quantize_model(
        merged_dir, tmp_path / "q", quant_type="fp4", double_quant=False, compute_dtype="float32"
    )
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["bnb_4bit_quant_type"] == "fp4"
    assert quant["bnb_4bit_use_double_quant"] is False
    assert quant["bnb_4bit_compute_dtype"] == "float32"


def test_cpu_4bit_check_names_the_layers_the_packed_kernel_cannot_run():
    shapes = {
        f"model.layers.{i}.{name}": shape
        for i in range(2)
        for name, shape in [
            ("self_attn.q_proj", (64, 64, 64)),
            ("mlp.gate_proj", (688, 64, 64)),
            ("mlp.down_proj", (64, 688, 64)),
        ]
    }
    assert cpu_4bit_blockers(shapes) == [
        "model.layers.*.mlp.gate_proj (output size 688 is not a multiple of 32)",
        "model.layers.*.mlp.down_proj (input size 688 is not a multiple of the block size 64)",
    ]
    assert cpu_4bit_blockers({"model.layers.0.mlp.gate_proj": (704, 128, 64)}) == []


@pytest.mark.parametrize(("rows", "columns"), [(688, 64), (64, 688), (48, 64), (64, 96), (96, 64), (64, 128)])
def test_cpu_4bit_check_agrees_with_the_installed_kernel(rows, columns):
    """The check says a layer fails exactly when bitsandbytes' CPU kernel fails on it."""
    bnb = pytest.importorskip("bitsandbytes")
    if not quantize.packed_cpu_4bit("cpu"):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not use its packed 4-bit kernel")
    weight = torch.nn.Linear(columns, rows, bias=False).weight.data
    layer = bnb.nn.Linear4bit(columns, rows, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu").eval()
    state = layer.weight.quant_state
    predicted = cpu_4bit_blockers({"layer": (rows, columns, state.blocksize)})
    try:
        with torch.inference_mode():
            layer(torch.randn(2, columns, dtype=torch.bfloat16))
        failed = False
    except (AssertionError, RuntimeError):
        failed = True
    assert failed == bool(predicted), predicted


@pytest.mark.parametrize("intermediate", [688, 192])
def test_quantizing_4bit_warns_once_when_this_cpu_cannot_run_it(
    tmp_path, tokenizer, capsys, monkeypatch, intermediate
):
    source = save_tiny(build_tiny_llama(tokenizer, intermediate_size=intermediate), tokenizer, tmp_path / "m")
    monkeypatch.setattr(quantize, "packed_cpu_4bit", lambda device: True)  # as on an AVX512-BF16 CPU
    out = quantize_model(source, tmp_path / "q", "bnb-4bit")
    assert (out / "model.safetensors").is_file(), "the model is saved all the same"
    err = capsys.readouterr().err
    if intermediate == 192:  # 192 = 6 x 32 = 3 x 64: every layer runs
        assert "warning" not in err
        return
    assert err.count("warning") == 1, err
    assert "cannot generate on this machine's CPU" in err
    assert "model.layers.*.mlp.gate_proj (output size 688 is not a multiple of 32)" in err
    assert "model.layers.*.mlp.up_proj (output size 688" in err
    assert "model.layers.*.mlp.down_proj (input size 688 is not a multiple of the block size 64)" in err
    assert "q_proj" not in err
    assert "CUDA GPU" in err and "bnb-8bit" in err and "GGUF" in err
    capsys.readouterr()
    quantize_model(source, tmp_path / "q8", "bnb-8bit")
    assert "warning" not in capsys.readouterr().err, "8-bit layers run at any size"


def test_adapter_folder_is_refused_with_merge_fix(tmp_path, base_dir):
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    with pytest.raises(QuantizeError, match="adapter folder.*lmforge merge --base BASE --adapter .*adapter"):
        quantize_model(tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_quantized_model_is_refused(tmp_path, base_dir):
    source = tmp_path / "already"
    shutil.copytree(base_dir, source)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizeError, match=f"{source} is already quantized .*16-bit model it was made from"):
        quantize_model(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "awq"}, "unknown quantization method 'awq'; choose one of bnb-4bit, bnb-8bit, gptq"),
        ({"method": "gptq"}, "gptq needs calibration data"),
        ({"method": "gptq", "calibration": "x.json", "bits": 5}, "gptq bits is 5"),
        ({"calibration": "x.json"}, "bnb-4bit quantizes without data"),
        ({"quant_type": "int4"}, "quant_type is 'int4'; choose nf4 or fp4"),
    ],
)
def test_bad_options_are_refused_before_loading(tmp_path, merged_dir, options, message):
    with pytest.raises(QuantizeError, match=message):
        quantize_model(merged_dir, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_writing_over_the_source_is_refused(merged_dir):
    with pytest.raises(QuantizeError, match="out is the source folder"):
        quantize_model(merged_dir, merged_dir)


def test_gptq_without_gptqmodel_names_the_extra(tmp_path, merged_dir, alpaca_file, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gptqmodel" else real(name, *a)
    )
    with pytest.raises(QuantizeError, match=r"pip install 'lmforge\[gptq\]'.*or use method bnb-4bit"):
        quantize_model(merged_dir, tmp_path / "out", "gptq", calibration=str(alpaca_file))


def test_gptq_without_cuda_says_so(tmp_path, merged_dir, alpaca_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "gptqmodel", fake_gptqmodel({}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(QuantizeError, match="gptq quantization runs on a CUDA GPU and none is visible"):
        quantize_model(merged_dir, tmp_path / "out", "gptq", calibration=str(alpaca_file))


def test_calibration_text_is_what_the_model_reads(tokenizer):
    examples = [
        Example(text="plain pretraining text"),
        Example(turns=(("add 1 and 2", "3"),)),
        Example(turns=(("add 2 and 2", ""),)),  # prompt-only: up to where the answer starts
        Example(text="   "),  # nothing to calibrate on
        Example(text="one too many"),
    ]
    texts = calibration_texts(examples, tokenizer, get_template("chatml"), samples=3)
    assert texts == [
        "plain pretraining text",
        "<|im_start|>user\nadd 1 and 2<|im_end|>\n<|im_start|>assistant\n3<|im_end|>",
        "<|im_start|>user\nadd 2 and 2<|im_end|>\n<|im_start|>assistant\n",
    ]


def fake_gptqmodel(calls: dict, fail: bool = False) -> types.ModuleType:
    """Stands in for gptqmodel's documented API (GPTQModel.load / quantize / save), recording calls."""

    class GPTQModel:
        @classmethod
        def load(cls, model_id, quantize_config):
            calls["load"] = (model_id, quantize_config)
            return cls()

        def quantize(self, texts, batch_size=1):
            if fail:
                raise RuntimeError("CUDA out of memory")
            calls["texts"] = list(texts)

        def save(self, path):
            config = {"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4}}
            (Path(path) / "config.json").write_text(json.dumps(config))
            calls["saved"] = Path(path)

    module = types.ModuleType("gptqmodel")
    module.__spec__ = importlib.machinery.ModuleSpec("gptqmodel", None)
    module.GPTQModel = GPTQModel
    module.QuantizeConfig = lambda **options: options
    return module


def test_gptq_calibrates_on_templated_records_and_saves_atomically(
    tmp_path, base_dir, alpaca_file, tokenizer, monkeypatch
):
    source = tmp_path / "merged"
    shutil.copytree(base_dir, source)
    (source / "lmforge_template.txt").write_text("llama2\n")  # the saved template, not the chatml guess
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "gptqmodel", fake_gptqmodel(calls))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = quantize_model(
        source,
        tmp_path / "q",
        "gptq",
        calibration=str(alpaca_file),
        bits=8,
        group_size=32,
        calibration_samples=5,
    )
    assert calls["load"] == (str(source), {"bits": 8, "group_size": 32})
    expected = calibration_texts(read_examples(str(alpaca_file))[:5], tokenizer, get_template("llama2"), 5)
    assert calls["texts"] == expected and len(expected) == 5
    assert "[INST]" in expected[0] and "add 0 and 0" in expected[0]
    assert calls["saved"].name.startswith(".q.tmp-"), "gptqmodel writes into the temporary folder"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "lmforge_template.txt", "README.md"} <= names
    card = (out / "README.md").read_text()
    assert "`gptq`" in card and "GPTQ 8-bit, group size 32" in card and f"{alpaca_file}` (5 records)" in card
    assert not list(tmp_path.glob(".q.*"))


def test_gptq_failure_leaves_no_folder(tmp_path, merged_dir, alpaca_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "gptqmodel", fake_gptqmodel({}, fail=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="out of memory"):
        quantize_model(merged_dir, tmp_path / "q", "gptq", calibration=str(alpaca_file))
    assert not (tmp_path / "q").exists()
    assert not list(tmp_path.glob(".q.*")), "the half-written temporary folder is removed"
