"""GGUF export: the file read back with gguf's reader matches the Hugging Face weights, config and
tokenizer; Q/K permutation agrees with both rotary conventions; q8_0 stays within its error; bad
inputs are refused; the Ollama Modelfile's Go template renders lmforge's chat format exactly."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from helpers import GPT2_PRE, LLAMA3_PRE, OFFICIAL_SPECIAL, OFFICIAL_TEMPLATES, with_pre_tokenizer
from lmforge.data.templates import TEMPLATES, Conversation, named_equivalent
from lmforge.export.gguf import (
    PRE_TOKENIZER_PROBES,
    export_gguf,
    go_template,
    permute_qk,
    read_gguf_summary,
    unpermute_qk,
    write_modelfile,
)
from lmforge.models.loading import TEMPLATE_FILE
from lmforge.models.tiny import build_tiny_llama, save_tiny

HF_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LAYER = list(HF_LAYER)


def unpermute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Written here independently of the module: rows (pair i, member h) back to (half h, row i)."""
    head_dim = weight.shape[0] // n_head
    return weight.reshape(n_head, head_dim // 2, 2, -1).transpose(0, 2, 1, 3).reshape(weight.shape)


def hf_name(gguf_name: str) -> str:
    if gguf_name.startswith("blk."):
        _, layer, kind, suffix = gguf_name.split(".")
        return f"model.layers.{layer}.{HF_LAYER[kind]}.{suffix}"
    return {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}[
        gguf_name.split(".")[0]
    ] + ".weight"


def read_tensors(path) -> dict[str, tuple[np.ndarray, GGMLQuantizationType]]:
    """name -> (values as float32 in Hugging Face shape, GGML type)."""
    out = {}
    for t in GGUFReader(path).tensors:
        plain = t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16)
        values = t.data if plain else quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (np.asarray(values, dtype=np.float32), t.tensor_type)
    return out


def save_llama(path, tokenizer, **overrides):
    config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 256,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **overrides,
    }
    torch.manual_seed(0)
    return save_tiny(LlamaForCausalLM(LlamaConfig(**config)), tokenizer, path)


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory, tokenizer):
    return save_tiny(
        build_tiny_llama(tokenizer, hidden_size=64, num_heads=4, num_kv_heads=2, seed=1),
        tokenizer,
        tmp_path_factory.mktemp("gqa"),
    )


def check_against_hf(model_dir, gguf_path, n_head, n_head_kv, rtol):
    """Every tensor present with its HF shape and values (Q/K after undoing the permutation)."""
    hf = load_file(model_dir / "model.safetensors")
    tensors = read_tensors(gguf_path)
    for name, (values, _) in tensors.items():
        expected = hf[hf_name(name)].float().numpy()
        assert values.shape == expected.shape, name
        if ".attn_q." in name:
            values = unpermute(values, n_head)
        elif ".attn_k." in name:
            values = unpermute(values, n_head_kv)
        np.testing.assert_allclose(values, expected, rtol=rtol, atol=1e-6, err_msg=name)
    return tensors


@pytest.mark.parametrize("out_type", ["f16", "bf16", "f32"])
def test_export_matches_hf_weights_config_and_tokenizer(tmp_path, base_dir, tokenizer, out_type):
    path = export_gguf(base_dir, tmp_path / "model.gguf", out_type)
    assert path == tmp_path / "model.gguf" and not list(tmp_path.glob(".*tmp*"))
    config = json.loads((base_dir / "config.json").read_text())
    # Rounding to 16 bits: 11 significant bits for f16, 8 for bf16.
    tensors = check_against_hf(base_dir, path, 4, 4, rtol={"f16": 2**-10, "bf16": 2**-7, "f32": 0}[out_type])
    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    names |= {f"blk.{i}.{kind}.weight" for i in range(2) for kind in LAYER}
    assert set(tensors) == names
    float_type = GGMLQuantizationType[out_type.upper()]
    for name, (_, qtype) in tensors.items():
        assert qtype == (GGMLQuantizationType.F32 if "norm" in name else float_type), name

    meta = read_gguf_summary(path)["metadata"]
    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == {"f32": 0, "f16": 1, "bf16": 32}[out_type]
    assert meta["llama.block_count"] == config["num_hidden_layers"]
    assert meta["llama.embedding_length"] == config["hidden_size"]
    assert meta["llama.feed_forward_length"] == config["intermediate_size"]
    assert meta["llama.attention.head_count"] == config["num_attention_heads"]
    assert meta["llama.attention.head_count_kv"] == config["num_key_value_heads"]
    assert meta["llama.context_length"] == config["max_position_embeddings"]
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    assert meta["llama.rope.freq_base"] == config["rope_parameters"]["rope_theta"]
    assert meta["llama.rope.dimension_count"] == config["hidden_size"] // config["num_attention_heads"]
    assert meta["llama.vocab_size"] == config["vocab_size"] == len(tokenizer)

    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    merges = json.loads((base_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert len(meta["tokenizer.ggml.merges"]) == len(merges) > 0
    assert meta["tokenizer.ggml.merges"][0] == " ".join(merges[0])
    types = meta["tokenizer.ggml.token_type"]
    assert types[tokenizer.convert_tokens_to_ids("<|im_end|>")] == 3  # control
    assert types[tokenizer.convert_tokens_to_ids("<think>")] == 4  # user-defined, kept in decoded text
    assert types[tokenizer.convert_tokens_to_ids("Ġa")] == 1
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False  # the tiny tokenizer adds no BOS


def test_qk_permutation_matches_llama_cpp_rotary():
    """Attention scores with HF's rotary (rotate halves) on HF weights equal those with llama.cpp's
    (rotate adjacent pairs) on the permuted weights, for Q with 4 heads and K with 2."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    n_head, n_kv, head_dim, hidden = 4, 2, 8, 16
    rng = np.random.default_rng(0)
    wq, wk = rng.normal(size=(n_head * head_dim, hidden)), rng.normal(size=(n_kv * head_dim, hidden))
    x, positions = rng.normal(size=(5, hidden)), np.arange(5)
    assert np.array_equal(unpermute_qk(permute_qk(wq, n_head), n_head), wq)
    assert np.array_equal(unpermute(permute_qk(wk, n_kv), n_kv), wk)
    assert not np.array_equal(permute_qk(wq, n_head), wq)

    def heads(w, n):  # (seq, n, head_dim)
        return (x @ w.T).reshape(len(x), n, head_dim)

    config = LlamaConfig(hidden_size=hidden, num_attention_heads=n_head, head_dim=head_dim)
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1), torch.tensor(positions)[None])
    q, k = (torch.tensor(heads(w, n)).transpose(0, 1)[None] for w, n in ((wq, n_head), (wk, n_kv)))
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos.double(), sin.double())

    def rope_adjacent(v):  # ggml rope mode 0: rotate (2i, 2i+1) by position * base^(-2i/head_dim)
        theta = 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)
        angle = positions[:, None, None] * theta[None, None, :]
        even, odd = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
        out[..., 1::2] = even * np.sin(angle) + odd * np.cos(angle)
        return out

    q_gg = rope_adjacent(heads(permute_qk(wq, n_head), n_head))
    k_gg = rope_adjacent(heads(permute_qk(wk, n_kv), n_kv))
    for h in range(n_head):  # GQA: query head h reads key head h // (n_head / n_kv)
        kv = h // (n_head // n_kv)
        scores_hf = q_hf[0, h].double().numpy() @ k_hf[0, kv].double().numpy().T
        np.testing.assert_allclose(q_gg[:, h] @ k_gg[:, kv].T, scores_hf, rtol=1e-5, atol=1e-4)


def test_q8_0_within_block_error_norms_f32_odd_rows_f16(tmp_path, tokenizer):
    model_dir = save_llama(tmp_path / "hf", tokenizer, intermediate_size=80)  # ffn_down rows of 80
    path = export_gguf(model_dir, tmp_path / "q8.gguf", "q8_0")
    hf = load_file(model_dir / "model.safetensors")
    tensors = read_tensors(path)
    assert read_gguf_summary(path)["metadata"]["general.file_type"] == 7
    for name, (values, qtype) in tensors.items():
        expected = hf[hf_name(name)].float().numpy()
        if ".attn_q." in name or ".attn_k." in name:
            values = unpermute(values, 4)
        if "norm" in name:
            assert qtype == GGMLQuantizationType.F32
            np.testing.assert_array_equal(values, expected)
        elif "ffn_down" in name:  # 80 is not a multiple of q8_0's 32-value blocks
            assert qtype == GGMLQuantizationType.F16
            np.testing.assert_allclose(values, expected, atol=1e-3, rtol=0)
        else:
            assert qtype == GGMLQuantizationType.Q8_0, name
            blocks, got = expected.reshape(-1, 32), values.reshape(-1, 32)
            # Half a step (max|w|/127 per block) of rounding, plus the step's own f16 rounding.
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            assert (np.abs(got - blocks) <= step * 0.57).all(), name
            assert np.abs(got - blocks).max() > 0, "q8_0 is lossy; equal values would mean it was not applied"


def test_tied_embeddings_have_no_output_tensor(tmp_path, tokenizer, base_dir):
    tied = save_llama(tmp_path / "tied", tokenizer, tie_word_embeddings=True)
    # Some checkpoints store the tied head anyway: it must still not become a second matrix.
    weights = load_file(tied / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, tied / "model.safetensors", metadata={"format": "pt"})
    assert "output.weight" not in read_gguf_summary(export_gguf(tied, tmp_path / "tied.gguf"))["tensors"]
    untied = read_gguf_summary(export_gguf(base_dir, tmp_path / "untied.gguf"))["tensors"]
    assert untied["output.weight"]["shape"] == (len(tokenizer), 64)


def test_gqa_head_count_kv_and_k_shape(tmp_path, gqa_dir):
    path = export_gguf(gqa_dir, tmp_path, "f32")  # a folder: the file is named after the model
    assert path == tmp_path / f"{gqa_dir.name}-f32.gguf"
    summary = read_gguf_summary(path)
    assert summary["metadata"]["llama.attention.head_count"] == 4
    assert summary["metadata"]["llama.attention.head_count_kv"] == 2
    assert summary["tensors"]["blk.0.attn_k.weight"]["shape"] == (32, 64)  # 2 heads x 16 dims
    assert summary["tensors"]["blk.0.attn_q.weight"]["shape"] == (64, 64)
    check_against_hf(gqa_dir, path, 4, 2, rtol=0)  # K unpermuted with 2 heads, not 4


def test_mistral_exports_as_llama(tmp_path, tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=None,
    )
    torch.manual_seed(0)
    model_dir = save_tiny(MistralForCausalLM(config), tokenizer, tmp_path / "mistral")
    path = export_gguf(model_dir, tmp_path / "mistral.gguf", "f32")
    assert read_gguf_summary(path)["metadata"]["general.architecture"] == "llama"
    check_against_hf(model_dir, path, 4, 2, rtol=0)


def test_qwen2_keeps_hf_rotary_layout_and_f32_biases(tmp_path, tokenizer):
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model_dir = save_tiny(Qwen2ForCausalLM(config), tokenizer, tmp_path / "qwen2")
    path = export_gguf(model_dir, tmp_path / "qwen2.gguf", "f16")
    summary = read_gguf_summary(path)
    assert summary["metadata"]["general.architecture"] == "qwen2"
    assert summary["metadata"]["qwen2.attention.head_count_kv"] == 2
    assert summary["tensors"]["blk.0.attn_q.bias"] == {"shape": (64,), "type": "F32"}
    assert "output.weight" not in summary["tensors"]
    hf = load_file(model_dir / "model.safetensors")
    tensors = read_tensors(path)
    # qwen2's GGUF rotary is NeoX-style (halves), like HF's: no permutation.
    np.testing.assert_allclose(
        tensors["blk.1.attn_q.weight"][0], hf["model.layers.1.self_attn.q_proj.weight"].numpy(), atol=1e-3
    )
    np.testing.assert_array_equal(
        tensors["blk.1.attn_k.bias"][0], hf["model.layers.1.self_attn.k_proj.bias"].numpy()
    )


def test_llama3_rope_scaling_writes_rope_freqs(tmp_path, tokenizer):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    model_dir = save_llama(tmp_path / "hf", tokenizer, rope_scaling=scaling, rope_theta=500000.0)
    tensors = read_tensors(export_gguf(model_dir, tmp_path / "m.gguf"))
    config = LlamaConfig.from_pretrained(model_dir)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    factors, qtype = tensors["rope_freqs.weight"]
    assert qtype == GGMLQuantizationType.F32
    np.testing.assert_allclose(factors, (plain / scaled.double()).numpy(), rtol=1e-5)
    assert factors.min() == 1.0 and factors.max() == 8.0  # both ends of the blend are present


def test_llama3_pre_tokenizer_is_recognised(tmp_path, base_dir):
    model_dir = with_pre_tokenizer(base_dir, tmp_path / "llama3-tok", LLAMA3_PRE)
    meta = read_gguf_summary(export_gguf(model_dir, tmp_path / "m.gguf"))["metadata"]
    assert meta["tokenizer.ggml.pre"] == "llama-bpe"
    tiny = read_gguf_summary(export_gguf(base_dir, tmp_path / "b.gguf"))["metadata"]
    assert tiny["tokenizer.ggml.pre"] == "starcoder"  # digits one by one, then GPT-2's regex


def gguf_tokenizer(path):
    """A tokenizer built from the GGUF's own tokenizer metadata (tokens, merges, the pre-tokenizer
    its `tokenizer.ggml.pre` names), as llama.cpp builds its vocabulary from the file."""
    from tokenizers import Tokenizer, models

    from lmforge.export.gguf import _reference_pre_tokenizers

    meta = read_gguf_summary(path)["metadata"]
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = _reference_pre_tokenizers()[meta["tokenizer.ggml.pre"]]
    return tok


STRESS = [
    *PRE_TOKENIZER_PROBES,
    "add 17 and 25 -> 42",
    "Q: what is 12 * 34?\nA: 408",
    "  two leading, two trailing  ",
    "\n\n\t mixed \r\n whitespace \t\t",
    "It's ISN'T they've WE'LL",
    "tab\tseparated\tvalues\t1\t2\t3",
    "emoji \U0001f600 and accents \u00e9\u00e8 and CJK \u4e2d\u6587",
]


@pytest.mark.parametrize(
    "pre_tokenizer",
    [None, GPT2_PRE, LLAMA3_PRE],  # None: lmforge's own tiny tokenizer, Digits(individual) + ByteLevel
    ids=["lmforge-tiny", "gpt-2", "llama-3"],
)
def test_the_gguf_vocabulary_tokenizes_a_stress_set_as_the_hf_tokenizer(tmp_path, base_dir, pre_tokenizer):
    model_dir = (
        base_dir if pre_tokenizer is None else with_pre_tokenizer(base_dir, tmp_path / "m", pre_tokenizer)
    )
    hf = AutoTokenizer.from_pretrained(model_dir)
    ours = gguf_tokenizer(export_gguf(model_dir, tmp_path / "m.gguf"))
    for text in STRESS:
        assert ours.encode(text).ids == hf(text, add_special_tokens=False)["input_ids"], text


def test_a_pre_tokenizer_llama_cpp_cannot_reproduce_is_refused_unless_named(tmp_path, base_dir, capsys):
    # a prefix space before the first word: no llama.cpp BPE pre-tokenizer adds one
    prefixed = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    model_dir = with_pre_tokenizer(base_dir, tmp_path / "m", prefixed)
    out = tmp_path / "m.gguf"
    with pytest.raises(ValueError, match=r"llama.cpp would tokenize.*--pre-tokenizer NAME"):
        export_gguf(model_dir, out)
    assert not out.exists()
    export_gguf(model_dir, out, pre_tokenizer="gpt-2")
    assert read_gguf_summary(out)["metadata"]["tokenizer.ggml.pre"] == "gpt-2"
    said = " ".join(capsys.readouterr().err.split())
    assert "warning" in said and "tokenize some text differently" in said


def byte_fallback_copy(base_dir, path):
    """The tiny model with a Llama-2-style tokenizer.json (byte fallback, no byte-level decoder)."""
    model_dir = shutil.copytree(base_dir, path)
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer_json["model"]["byte_fallback"] = True
    tokenizer_json["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]}
    write_json(model_dir / "tokenizer.json", tokenizer_json)
    return model_dir


def test_sentencepiece_without_the_package_is_refused_with_the_fix(tmp_path, base_dir):
    if importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed: the refusal cannot happen")
    model_dir = byte_fallback_copy(base_dir, tmp_path / "model")
    (model_dir / "tokenizer.model").write_bytes(b"not read: the package is missing")
    with pytest.raises(ValueError, match=r"SentencePiece tokenizer .*pip install sentencepiece"):
        export_gguf(model_dir, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_sentencepiece_tokenizer_exports_pieces_scores_and_types(tmp_path, tokenizer):
    spm = pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer

    words = "the cat sat on a mat and dog ran to hat red blue green add sum of is what".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(8)) for i in range(200)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines))
    spm_dir = tmp_path / "spm"
    spm_dir.mkdir()
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"),
        model_prefix=str(spm_dir / "tokenizer"),
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    write_json(spm_dir / "tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer"})
    spm_tokenizer = AutoTokenizer.from_pretrained(spm_dir)
    spm_tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    spm_tokenizer.add_tokens(["<think>"])
    model_dir = save_llama(tmp_path / "model", spm_tokenizer, vocab_size=304)  # 2 rows of padding
    shutil.copy(spm_dir / "tokenizer.model", model_dir)
    meta = read_gguf_summary(export_gguf(model_dir, tmp_path / "m.gguf"))["metadata"]
    processor = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    assert meta["tokenizer.ggml.model"] == "llama"
    pieces = [processor.IdToPiece(i) for i in range(300)]
    assert meta["tokenizer.ggml.tokens"] == [*pieces, "<|im_end|>", "<think>", "[PAD302]", "[PAD303]"]
    np.testing.assert_allclose(
        meta["tokenizer.ggml.scores"][:300], [processor.GetScore(i) for i in range(300)]
    )
    types = meta["tokenizer.ggml.token_type"]
    assert types[processor.unk_id()] == 2 and types[processor.bos_id()] == 3
    assert types[processor.PieceToId("<0x41>")] == 6  # byte fallback pieces
    assert types[300:] == [3, 4, 5, 5]  # control, user-defined, unused padding


def write_json(path, data):
    path.write_text(json.dumps(data))


def make_adapter(path, base_dir):
    path.mkdir()
    write_json(path / "adapter_config.json", {"peft_type": "LORA", "base_model_name_or_path": str(base_dir)})


def make_quantized(path, base_dir):
    shutil.copytree(base_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    write_json(path / "config.json", config)


def make_gpt2(path, base_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)
    ).save_pretrained(path)


@pytest.mark.parametrize(
    ("make", "out_type", "message"),
    [
        (make_adapter, "f16", r"adapter folder.*merge it first: lmforge merge --base .* --adapter"),
        (make_quantized, "f16", r"stored quantized \(bitsandbytes\).*export the 16-bit merged model"),
        (make_gpt2, "f16", r"GPT2LMHeadModel cannot be exported.*supported: LlamaForCausalLM, Mistral"),
        (None, "q4_k_m", r"unknown GGUF type `q4_k_m`; choose one of f16, bf16, f32, q8_0"),
    ],
    ids=["adapter", "quantized", "unsupported-architecture", "unknown-type"],
)
def test_refused_with_the_fix_and_no_file_left(tmp_path, base_dir, make, out_type, message):
    model_dir = base_dir
    if make is not None:
        model_dir = tmp_path / "model"
        make(model_dir, base_dir)
    out = tmp_path / "out" / "m.gguf"
    with pytest.raises(ValueError, match=message):
        export_gguf(model_dir, out, out_type)
    assert not out.exists()


def test_failure_mid_write_leaves_no_file(tmp_path, base_dir, monkeypatch):
    calls, quantize = [], quants.quantize

    def failing(data, qtype):  # the fifth tensor fails, after four were written
        calls.append(qtype)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return quantize(data, qtype)

    monkeypatch.setattr(quants, "quantize", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(base_dir, tmp_path / "m.gguf", "f16")
    assert len(calls) == 5 and list(tmp_path.iterdir()) == []


def test_failed_reexport_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, base_dir, monkeypatch):
    path = export_gguf(base_dir, tmp_path / "m.gguf", "f16")
    before = path.read_bytes()

    def failing(data, qtype):
        raise RuntimeError("disk full")

    monkeypatch.setattr(quants, "quantize", failing)  # fails at the first tensor, after the header
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(base_dir, path, "f16")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_modelfile_for_chatml(tmp_path, base_dir):
    model_dir = shutil.copytree(base_dir, tmp_path / "model")
    (model_dir / TEMPLATE_FILE).write_text("chatml\n")
    gguf_path = export_gguf(model_dir, tmp_path / "tiny.gguf", "q8_0")
    modelfile = write_modelfile(gguf_path, model_dir).read_text()
    lines = modelfile.splitlines()
    assert "FROM ./tiny.gguf" in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}" in template
    assert "{{ range $i, $m := .Messages }}" in template
    assert "<|im_start|>user\n{{ $m.Content }}<|im_end|>\n<|im_start|>assistant\n" in template
    assert "SYSTEM" not in modelfile  # chatml has no default system prompt; qwen2.5 has one

    (model_dir / TEMPLATE_FILE).write_text("qwen2.5\n")
    assert 'SYSTEM """You are Qwen' in write_modelfile(gguf_path, model_dir).read_text()


def with_jinja(base_dir, path, jinja: str, bos: str | None, eos: str):
    """A copy of the tiny model whose tokenizer has `jinja` as its only chat template."""
    model_dir = shutil.copytree(base_dir, path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.chat_template = bos, eos, jinja
    tokenizer.save_pretrained(model_dir)
    return model_dir, tokenizer


@pytest.mark.parametrize("family", sorted(OFFICIAL_SPECIAL))
def test_a_jinja_only_model_gets_the_template_of_its_family(tmp_path, base_dir, family):
    """Each family's official Jinja template (as its tokenizer ships it) is recognised as the
    named template that renders the same prompts, and the Modelfile gets that template's TEMPLATE
    and stop token instead of a request to write one."""
    jinja = (OFFICIAL_TEMPLATES / f"{family}.jinja").read_text(encoding="utf-8")
    model_dir, tokenizer = with_jinja(base_dir, tmp_path / "model", jinja, *OFFICIAL_SPECIAL[family])
    assert named_equivalent(tokenizer).name == family
    gguf_path = export_gguf(model_dir, tmp_path / "tiny.gguf", "f32")
    modelfile = write_modelfile(gguf_path, model_dir).read_text()
    template = TEMPLATES[family]
    add_bos = read_gguf_summary(gguf_path)["metadata"]["tokenizer.ggml.add_bos_token"]
    expected = go_template(template, tokenizer.bos_token or "", tokenizer.eos_token, add_bos)
    assert modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0] == expected
    assert f"PARAMETER stop {json.dumps(template.stop_token(tokenizer), ensure_ascii=False)}" in modelfile
    assert "by hand" not in modelfile


# ChatML as most ChatML models' tokenizers ship it (and as transformers' chat-template docs write it).
CHATML_JINJA = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_plain_chatml_jinja_template_is_chatml(tmp_path, base_dir):
    model_dir, tokenizer = with_jinja(base_dir, tmp_path / "model", CHATML_JINJA, None, "<|im_end|>")
    assert named_equivalent(tokenizer).name == "chatml"
    modelfile = write_modelfile(export_gguf(model_dir, tmp_path / "m.gguf", "f32"), model_dir).read_text()
    assert "<|im_start|>user\n{{ $m.Content }}<|im_end|>\n<|im_start|>assistant\n" in modelfile


def test_a_jinja_template_of_no_known_family_asks_for_one_by_hand(tmp_path, base_dir):
    jinja = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<bot>{% endif %}"
    )
    model_dir, tokenizer = with_jinja(base_dir, tmp_path / "model", jinja, "<s>", "</s>")
    assert named_equivalent(tokenizer) is None
    (model_dir / TEMPLATE_FILE).write_text("tokenizer\n")
    gguf_path = export_gguf(model_dir, tmp_path / "out" / "tiny.gguf")
    modelfile = write_modelfile(gguf_path, model_dir, tmp_path / "Modelfile").read_text()
    assert f"FROM {gguf_path.resolve()}" in modelfile  # not beside the GGUF: absolute path
    assert "renders as none of lmforge's named templates" in modelfile
    assert "TEMPLATE" not in modelfile.replace("add a TEMPLATE by hand", "")
    assert 'PARAMETER stop "</s>"' in modelfile


def test_the_modelfile_sets_num_ctx_to_the_trained_context(tmp_path, tokenizer):
    """Ollama's default context (2048 or more) would exceed a model trained for 96 positions."""
    model_dir = save_llama(tmp_path / "short", tokenizer, max_position_embeddings=96)
    (model_dir / TEMPLATE_FILE).write_text("chatml\n")
    modelfile = write_modelfile(export_gguf(model_dir, tmp_path / "m.gguf", "f32"), model_dir).read_text()
    assert "PARAMETER num_ctx 96" in modelfile.splitlines()


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct{ Role, Content string }

type Case struct {
	Template, System string
	Messages         []Message
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := []string{}
	for _, c := range cases {
		var b strings.Builder
		t := template.Must(template.New("t").Parse(c.Template))
		if err := t.Execute(&b, map[string]any{"System": c.System, "Messages": c.Messages}); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="needs a Go toolchain to run text/template")
def test_go_templates_render_lmforge_generation_prompts(tmp_path, tokenizer):
    """Each template's Go translation, executed by Go's text/template the way Ollama calls it
    (.System plus .Messages, system messages included), gives lmforge's exact generation prompt."""
    conversations = [
        Conversation([("hi", "")]),
        Conversation([("hi", "yo"), ("more?", "")], system="Be brief."),
        Conversation([("a", "b"), ("c", "d"), ("e", "")]),
    ]
    cases, expected = [], []
    for template in {t.name: t for t in TEMPLATES.values()}.values():
        for runtime_adds_bos in (False, True):
            go = go_template(template, tokenizer.bos_token, tokenizer.eos_token, runtime_adds_bos)
            for conversation in conversations:
                system = conversation.system or template.default_system or ""
                messages = [{"Role": "system", "Content": system}] if system else []
                for user, assistant in conversation.turns:
                    messages.append({"Role": "user", "Content": user})
                    if assistant:
                        messages.append({"Role": "assistant", "Content": assistant})
                cases.append({"Template": go, "System": system, "Messages": messages})
                prompt = template.generation_prompt(conversation, tokenizer)
                if runtime_adds_bos:
                    prompt = prompt.removeprefix(tokenizer.bos_token)
                expected.append((template.name, runtime_adds_bos, prompt))
    (tmp_path / "render.go").write_text(GO_RENDER)
    result = subprocess.run(
        ["go", "run", str(tmp_path / "render.go")],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rendered = json.loads(result.stdout)
    mismatches = [(case, got) for case, got in zip(expected, rendered, strict=True) if case[2] != got]
    assert not mismatches
    assert len(rendered) >= 11 * 2 * 3  # eleven templates, both BOS modes, three conversations


def test_the_cli_refuses_in_one_line_and_exports_with_pre_tokenizer(tmp_path, base_dir):
    from typer.testing import CliRunner

    from lmforge.cli import app

    prefixed = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    model_dir = with_pre_tokenizer(base_dir, tmp_path / "m", prefixed)
    args = ["export", "--model", str(model_dir), "--out", str(tmp_path / "m.gguf"), "--no-modelfile"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code != 0 and "Traceback" not in refused.output
    assert "--pre-tokenizer NAME" in " ".join(refused.output.split())
    forced = CliRunner().invoke(app, [*args, "--pre-tokenizer", "gpt-2"])
    assert forced.exit_code == 0, forced.output
    assert "warning" in forced.output
    assert read_gguf_summary(tmp_path / "m.gguf")["metadata"]["tokenizer.ggml.pre"] == "gpt-2"
