"""Export a merged llama-family model to one GGUF file, and write an Ollama Modelfile for it.

Follows llama.cpp's `convert_hf_to_gguf.py` for the `llama` architecture (LlamaForCausalLM,
MistralForCausalLM) and the `qwen2` architecture (Qwen2ForCausalLM): the same tensor names,
metadata keys and tokenizer metadata, and Q/K rows permuted for llama, whose GGUF rotary
embedding rotates adjacent pairs where Hugging Face's rotates the two halves of each head.
Departures from it:

- Output types are f32, f16, bf16 and q8_0 only, written with `gguf.quants`. The k-quants
  (q4_K_M and friends) need llama.cpp's `llama-quantize`, run on the f16 file.
- Tensors are streamed: the header is written from the safetensors metadata, then one tensor
  is loaded, converted and written at a time, so memory stays near the largest tensor.
- `tokenizer.ggml.pre` is the llama.cpp pre-tokenizer that splits a set of probe texts
  (`PRE_TOKENIZER_PROBES`) exactly as the tokenizer's own pre-tokenizer does, whatever its JSON
  form: llama-bpe (Llama-3, DeepSeek-R1-Distill-Llama), qwen2 (Qwen2/2.5, Qwen2-VL, R1-Distill-Qwen),
  gpt-2 (GPT-2, GPT-NeoX, OLMo, Phi-2) and starcoder (StarCoder, SmolLM, lmforge's own tokenizer:
  digits one by one). llama.cpp's converter hashes a tokenized test string instead. A tokenizer
  none of them reproduces is refused, as llama.cpp's converter refuses it, unless the caller names
  the pre-tokenizer to write (`--pre-tokenizer`), which is then written with a warning.

Checked against llama.cpp itself where llama-cpp-python is installed (`make test` builds it):
tests/export/test_llama_cpp.py loads f32, f16 and q8_0 files and compares logits and greedy tokens
with transformers, and llama.cpp's tokenizer with the Hugging Face one on a stress set. Ollama is
not run: the Modelfile's TEMPLATE is rendered with Go's own text/template (where Go is installed)
against lmforge's chat templates. tests/export/test_gguf.py also reads every file back with
gguf's reader and compares it with the Hugging Face weights, config and tokenizer.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, SentencePieceVocab, TokenType, quants
from rich.console import Console
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from lmforge.artifacts import atomic_file, write_atomic
from lmforge.data.templates import ChatTemplate, get_template, named_equivalent
from lmforge.models.loading import saved_template_name

console = Console(stderr=True)

GGUF_TYPES = ("f16", "bf16", "f32", "q8_0")
# Hugging Face architecture -> (GGUF architecture, whether Q/K rows are permuted for its rotary layout)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
}
MODELFILE = "Modelfile"

# Per-layer tensors: Hugging Face suffix after `model.layers.N.` -> GGUF suffix after `blk.N.`.
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_REQUIRED_LAYER_TENSORS = [k for k in _LAYER_TENSORS if k.endswith(".weight")]
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")

# llama.cpp's byte-level BPE pre-tokenizers lmforge writes, each as the Hugging Face
# pre-tokenizer that splits text as llama.cpp's does (its regex list in src/llama-vocab.cpp).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Text that tells the pre-tokenizers apart: digit runs, contractions in both cases, runs of
# spaces, tabs and newlines, punctuation runs, arrows, formulas, code, accents, CJK, emoji.
PRE_TOKENIZER_PROBES = (
    "x^2 + 3x - 5 = 0",
    "a -> b  ->  c\t->\n->",
    "1234567 and 3.14159, 2024-12-04; 1,000,000",
    "I'm sure you've seen it, DON'T you? We'll, they'd, it's",
    "   leading spaces, trailing spaces   ",
    "line one\nline two\r\n\n\n  indented\ttab\t\tdone",
    "def f(x):\n    return x**2  # square!!!",
    "caf\u00e9 na\u00efve \u00c5ngstr\u00f6m \u0441\u043b\u043e\u0432\u043e",
    "\u4f60\u597d\u4e16\u754c \U0001f600\U0001f680 \u00bd \u2167",
    "abc123def 45ghi ...?!  ---  ''\"\"",
    "add 4 and 2 -> 6",
)


def _reference_pre_tokenizers() -> dict:
    from tokenizers import Regex, pre_tokenizers

    def split_then_bytes(regex: str):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return {
        "llama-bpe": split_then_bytes(_LLAMA3_SPLIT),
        "qwen2": split_then_bytes(_LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")),
        "gpt-2": gpt2,
        # StarCoder, SmolLM, Command-R and lmforge's own tiny tokenizer: digits one by one, then GPT-2.
        "starcoder": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2]),
    }


def _pieces(pre_tokenizer, text: str) -> list[str]:
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)] if pre_tokenizer else [text]


def llama_cpp_pre_tokenizer(tokenizer) -> str | None:
    """llama.cpp's name for the pre-tokenizer that splits every probe text exactly as this fast
    tokenizer's own does, or None when none of those lmforge knows does."""
    own = tokenizer.backend_tokenizer.pre_tokenizer
    for name, reference in _reference_pre_tokenizers().items():
        if all(_pieces(own, text) == _pieces(reference, text) for text in PRE_TOKENIZER_PROBES):
            return name
    return None


class GGUFExportError(ValueError):
    """The export cannot be done as asked; the message names the folder and the fix."""


@dataclass(frozen=True)
class _HParams:
    arch: str
    permute: bool
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rms_eps: float
    rope_theta: float
    rope: dict[str, Any]  # rope_type and its parameters ({"rope_type": "default"} when unscaled)
    vocab_size: int
    tied: bool


@dataclass(frozen=True)
class _Tensor:
    name: str  # GGUF name
    source: str  # Hugging Face name ("" for a generated tensor)
    shape: tuple[int, ...]
    qtype: Q


# --------------------------------------------------------------------------- checks


def _read_config(model_dir: Path) -> dict[str, Any]:
    """Refuse what cannot be exported, before any weight is read."""
    if not model_dir.is_dir():
        raise GGUFExportError(f"{model_dir} is not a folder; pass a merged model folder (with config.json)")
    if (model_dir / "adapter_config.json").is_file():
        adapter = json.loads((model_dir / "adapter_config.json").read_text(encoding="utf-8"))
        base = adapter.get("base_model_name_or_path") or "BASE"
        raise GGUFExportError(
            f"{model_dir} is an adapter folder, not a full model: merge it first: "
            f"lmforge merge --base {base} --adapter {model_dir} --out MERGED, then export MERGED"
        )
    if not (model_dir / "config.json").is_file():
        raise GGUFExportError(f"{model_dir} has no config.json; pass a merged model folder")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else str(quant)
        raise GGUFExportError(
            f"{model_dir} is stored quantized ({method}); GGUF export needs the 16-bit weights: "
            "export the 16-bit merged model (lmforge merge writes one), and choose the GGUF type "
            "with out_type (e.g. q8_0)"
        )
    architecture = (config.get("architectures") or ["(none)"])[0]
    if architecture not in ARCHITECTURES:
        raise GGUFExportError(
            f"{model_dir}: architecture {architecture} cannot be exported to GGUF by lmforge; "
            f"supported: {', '.join(ARCHITECTURES)}. For others use llama.cpp's convert_hf_to_gguf.py"
        )
    return config


def _hparams(model_dir: Path, raw: dict[str, Any]) -> _HParams:
    config = AutoConfig.from_pretrained(model_dir)
    arch, permute = ARCHITECTURES[raw["architectures"][0]]
    # transformers 5 keeps rope_theta and the scaling in `rope_parameters`; 4.x in two attributes.
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if not rope:
        rope = dict(getattr(config, "rope_scaling", None) or {})
        rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    if rope["rope_type"] not in ("default", "linear", "llama3", "yarn"):
        raise GGUFExportError(
            f"{model_dir}: rope scaling `{rope['rope_type']}` is not exported by lmforge (supported: "
            "none, linear, llama3, yarn); use llama.cpp's convert_hf_to_gguf.py"
        )
    n_head = config.num_attention_heads
    return _HParams(
        arch=arch,
        permute=permute,
        n_layer=config.num_hidden_layers,
        n_embd=config.hidden_size,
        n_ff=config.intermediate_size,
        n_head=n_head,
        n_head_kv=getattr(config, "num_key_value_heads", None) or n_head,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // n_head,
        n_ctx=config.max_position_embeddings,
        rms_eps=config.rms_norm_eps,
        rope_theta=float(rope["rope_theta"]),
        rope=rope,
        vocab_size=config.vocab_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
    )


# --------------------------------------------------------------------------- tensors


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of each head from Hugging Face's rotary layout (rotate the two halves) to
    llama.cpp's for `llama` (rotate adjacent pairs): row i of half h goes to row 2i + h."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def unpermute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute_qk`."""
    return (
        weight.reshape(n_head, weight.shape[0] // n_head // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("model*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
    if not files:
        raise GGUFExportError(f"{model_dir} has no model*.safetensors (or pytorch_model*.bin) weights")
    return files


class _Weights:
    """Tensor shapes without loading; one tensor at a time as float32 numpy on demand."""

    def __init__(self, model_dir: Path) -> None:
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._loaded: dict[Path, dict[str, Any]] = {}
        for path in _weight_files(model_dir):
            if path.suffix == ".safetensors":
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        self.where[key] = path
                        self.shapes[key] = tuple(f.get_slice(key).get_shape())
            else:
                for key, value in self._torch_load(path).items():
                    self.where[key] = path
                    self.shapes[key] = tuple(value.shape)

    def _torch_load(self, path: Path) -> dict[str, Any]:
        if path not in self._loaded:  # keep one shard open at a time
            self._loaded = {path: torch.load(path, map_location="cpu", mmap=True, weights_only=True)}
        return self._loaded[path]

    def load(self, name: str) -> np.ndarray:
        path = self.where[name]
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                tensor = f.get_tensor(name)
        else:
            tensor = self._torch_load(path)[name]
        return tensor.float().numpy()  # bf16 has no numpy dtype: go through float32


def _tensor_type(name: str, shape: tuple[int, ...], out_type: str) -> Q:
    # As llama.cpp: norms, biases (all 1-D here) stay f32 in every type.
    if len(shape) < 2 or not name.endswith(".weight"):
        return Q.F32
    if out_type == "q8_0" and shape[-1] % 32 != 0:  # q8_0 blocks are 32 values of one row
        return Q.F16
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[out_type]


def _plan(model_dir: Path, weights: _Weights, hp: _HParams, out_type: str) -> list[_Tensor]:
    mapped: dict[str, str] = {}
    unknown = []
    for source in weights.shapes:
        if source.endswith("rotary_emb.inv_freq") or (source == "lm_head.weight" and hp.tied):
            continue
        if source in _GLOBAL_TENSORS:
            mapped[source] = _GLOBAL_TENSORS[source]
        elif (m := _LAYER_NAME.fullmatch(source)) and m.group(2) in _LAYER_TENSORS:
            mapped[source] = f"blk.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}"
        else:
            unknown.append(source)
    if unknown:
        raise GGUFExportError(
            f"{model_dir}: tensors with no GGUF name for {hp.arch}: {', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''}; is this a plain (merged) causal LM?"
        )
    expected = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if hp.tied else ["lm_head.weight"])
    expected += [f"model.layers.{i}.{k}" for i in range(hp.n_layer) for k in _REQUIRED_LAYER_TENSORS]
    missing = [name for name in expected if name not in mapped]
    if missing:
        raise GGUFExportError(
            f"{model_dir}: weights missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
            "the checkpoint is incomplete (re-save or re-merge it)"
        )

    def order(source: str) -> tuple[int, int]:  # embeddings, blocks in order, then output norm/head
        m = _LAYER_NAME.fullmatch(source)
        if m:
            return (1 + int(m.group(1)), list(_LAYER_TENSORS).index(m.group(2)))
        return (
            (0, 0)
            if source == "model.embed_tokens.weight"
            else (hp.n_layer + 1, int(source == "lm_head.weight"))
        )

    plan = []
    if hp.rope["rope_type"] == "llama3":
        plan.append(_Tensor("rope_freqs.weight", "", (hp.head_dim // 2,), Q.F32))
    for source in sorted(mapped, key=order):
        shape = weights.shapes[source]
        plan.append(_Tensor(mapped[source], source, shape, _tensor_type(mapped[source], shape, out_type)))
    return plan


def _llama3_rope_factors(hp: _HParams) -> np.ndarray:
    """Llama 3.1's frequency-dependent rope scaling as per-dimension divisors (llama.cpp's
    `rope_freqs` tensor): 1 for short wavelengths, `factor` for long ones, blended between."""
    rope = hp.rope
    factor, low, high = (
        rope.get("factor", 8.0),
        rope.get("low_freq_factor", 1.0),
        rope.get("high_freq_factor", 4.0),
    )
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float64) / hp.head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = np.where(
        wavelen < old_ctx / high,
        1.0,
        np.where(wavelen > old_ctx / low, factor, 1 / ((1 - smooth) / factor + smooth)),
    )
    return factors.astype(np.float32)


def _tensor_data(tensor: _Tensor, weights: _Weights, hp: _HParams) -> np.ndarray:
    if tensor.name == "rope_freqs.weight":
        return _llama3_rope_factors(hp)
    data = weights.load(tensor.source)
    if hp.permute and tensor.name.endswith(("attn_q.weight", "attn_q.bias")):
        data = permute_qk(data, hp.n_head)
    elif hp.permute and tensor.name.endswith(("attn_k.weight", "attn_k.bias")):
        data = permute_qk(data, hp.n_head_kv)
    return quants.quantize(np.ascontiguousarray(data, dtype=np.float32), tensor.qtype)


# --------------------------------------------------------------------------- metadata


def _add_hparams(writer: gguf.GGUFWriter, hp: _HParams, name: str, out_type: str) -> None:
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[out_type]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim != hp.n_embd // hp.n_head:  # e.g. Mistral Nemo: heads narrower than hidden / heads
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    if hp.rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(hp.rope["factor"])
    elif hp.rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(hp.rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(hp.rope.get("original_max_position_embeddings", hp.n_ctx))
    writer.add_vocab_size(hp.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _merges(tokenizer_json: dict[str, Any]) -> list[str]:
    merges = tokenizer_json["model"].get("merges") or []
    if merges and not isinstance(merges[0], str):  # [left, right] pairs (tokenizers >= 0.20)
        # A space inside a token would split the "left right" line; llama.cpp reads it as U+0120.
        merges = [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]
    return merges


def _chosen_pre_tokenizer(tokenizer, model_dir: Path, forced: str | None) -> str:
    """The `tokenizer.ggml.pre` to write: the one that splits as the tokenizer does; an explicit
    `forced` name is written as given, with a warning when it is not that one."""
    found = llama_cpp_pre_tokenizer(tokenizer)
    if forced is None and found is None:
        raise GGUFExportError(
            f"{model_dir}: its tokenizer's pre-tokenizer splits text like none of llama.cpp's that "
            f"lmforge maps ({', '.join(_reference_pre_tokenizers())}), so llama.cpp would tokenize "
            "text differently from the model's training (llama.cpp's own converter refuses too). To "
            "export anyway, name the llama.cpp pre-tokenizer to write: --pre-tokenizer NAME (e.g. default)"
        )
    if forced is not None and forced != found:
        like = f"splits text like {found!r}" if found else "splits text like none lmforge maps"
        console.print(
            f"[yellow]warning[/]: writing tokenizer.ggml.pre = {forced!r} for {model_dir}, whose "
            f"tokenizer {like}: llama.cpp will tokenize some text differently from the model's training"
        )
    return forced or found


def _add_tokenizer(
    writer: gguf.GGUFWriter, model_dir: Path, hp: _HParams, pre_tokenizer: str | None = None
) -> None:
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise GGUFExportError(
            f"{model_dir}: no usable tokenizer ({exc}); save the tokenizer beside the model"
        ) from None
    tokenizer_json_path = model_dir / "tokenizer.json"
    tokenizer_json = (
        json.loads(tokenizer_json_path.read_text(encoding="utf-8")) if tokenizer_json_path.is_file() else {}
    )
    model = tokenizer_json.get("model", {})
    byte_level = (
        model.get("type") == "BPE"
        and not model.get("byte_fallback", False)
        and (tokenizer_json.get("decoder") or {}).get("type") == "ByteLevel"
    )
    if byte_level:
        tokens, types = _bpe_vocab(tokenizer, hp.vocab_size, model_dir)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_chosen_pre_tokenizer(tokenizer, model_dir, pre_tokenizer))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(_merges(tokenizer_json))
    elif (model_dir / "tokenizer.model").is_file():
        tokens, scores, types = _sentencepiece_vocab(tokenizer, hp.vocab_size, model_dir)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
    else:
        raise GGUFExportError(
            f"{model_dir}: tokenizer is neither byte-level BPE (tokenizer.json) nor SentencePiece "
            "(tokenizer.model); lmforge cannot write its GGUF vocabulary"
        )
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    # Whether the tokenizer itself adds BOS/EOS: llama.cpp repeats that when it tokenizes a prompt.
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id])
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        writer.add_chat_template(template)


def _tokens_by_id(tokenizer, vocab_size: int, model_dir: Path) -> dict[int, str]:
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise GGUFExportError(
            f"{model_dir}: the tokenizer has token id {max(by_id)} but the model's vocab_size is "
            f"{vocab_size}; resize the embeddings to the tokenizer before exporting"
        )
    return by_id


def _bpe_vocab(tokenizer, vocab_size: int, model_dir: Path) -> tuple[list[str], list[int]]:
    by_id = _tokens_by_id(tokenizer, vocab_size, model_dir)
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows past the tokenizer (padded vocab)
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _sentencepiece_vocab(
    tokenizer, vocab_size: int, model_dir: Path
) -> tuple[list[bytes], list[float], list[int]]:
    """Pieces, scores and types from tokenizer.model (llama.cpp's `llama` tokenizer needs the
    scores), then the tokens added on top of it (chat markers) from the Hugging Face tokenizer."""
    _tokens_by_id(tokenizer, vocab_size, model_dir)
    try:
        vocab = SentencePieceVocab(model_dir)
    except RuntimeError:
        raise GGUFExportError(
            f"{model_dir} has a SentencePiece tokenizer (tokenizer.model): exporting it needs the "
            "sentencepiece package: pip install sentencepiece"
        ) from None
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores, types = [-1000.0] * vocab_size, [int(TokenType.UNUSED)] * vocab_size
    for i, (text, score, kind) in enumerate(vocab.all_tokens()):
        if i < vocab_size:
            tokens[i], scores[i], types[i] = text, score, int(kind)
    for i, added in tokenizer.added_tokens_decoder.items():
        kind = TokenType.CONTROL if added.special else TokenType.USER_DEFINED
        if i >= vocab.vocab_size_base:  # added after training, e.g. <|im_start|>
            tokens[i], scores[i], types[i] = added.content.encode(), -1000.0, int(kind)
        elif types[i] == TokenType.NORMAL and added.special:  # <unk>, <s>, </s> keep their own types
            types[i] = int(TokenType.CONTROL)
    return tokens, scores, types


# --------------------------------------------------------------------------- export


def export_gguf(
    model_dir: str | Path,
    out: str | Path,
    out_type: str = "f16",
    quiet: bool = True,
    pre_tokenizer: str | None = None,
) -> Path:
    """Write a merged Hugging Face llama/mistral/qwen2 model folder as one GGUF file (atomically).

    `out` is the .gguf path, or an existing folder to write `<model>-<out_type>.gguf` into.
    `pre_tokenizer`: llama.cpp's pre-tokenizer name to write instead of the one found to split as
    the tokenizer does (needed, with a warning, when none does).
    """
    if out_type not in GGUF_TYPES:
        raise GGUFExportError(f"unknown GGUF type `{out_type}`; choose one of {', '.join(GGUF_TYPES)}")
    model_dir = Path(model_dir).expanduser()
    raw = _read_config(model_dir)
    hp = _hparams(model_dir, raw)
    weights = _Weights(model_dir)
    plan = _plan(model_dir, weights, hp, out_type)
    name = model_dir.resolve().name
    out = Path(out).expanduser()
    if out.is_dir():
        out = out / f"{name}-{out_type}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        console.print(f"exporting {model_dir} ({hp.arch}, {len(plan)} tensors) to {out} as {out_type}")

    with atomic_file(out) as tmp:  # a failure anywhere below leaves no file at `out`
        writer = gguf.GGUFWriter(tmp, hp.arch)
        try:
            _add_hparams(writer, hp, name, out_type)
            _add_tokenizer(writer, model_dir, hp, pre_tokenizer)
            sizes = {}
            for tensor in plan:
                block, type_size = gguf.GGML_QUANT_SIZES[tensor.qtype]
                sizes[tensor.name] = math.prod(tensor.shape) // block * type_size
                if tensor.qtype in (Q.F32, Q.F16):
                    dtype = np.float32 if tensor.qtype == Q.F32 else np.float16
                    writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(dtype), sizes[tensor.name])
                else:
                    byte_shape = gguf.quant_shape_to_byte_shape(tensor.shape, tensor.qtype)
                    writer.add_tensor_info(
                        tensor.name,
                        byte_shape,
                        np.dtype(np.uint8),
                        sizes[tensor.name],
                        raw_dtype=tensor.qtype,
                    )
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for tensor in plan:  # one tensor in memory at a time, in the order of the header
                data = _tensor_data(tensor, weights, hp)
                assert data.nbytes == sizes[tensor.name], tensor.name
                writer.write_tensor_data(data)
        finally:
            writer.close()
    if not quiet:
        console.print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return out


def read_gguf_summary(path: str | Path) -> dict[str, Any]:
    """Metadata (key -> value; strings decoded, arrays as lists) and tensors (name -> {"shape": in
    Hugging Face / numpy order, "type": GGML type name}) of a GGUF file, e.g. for `export --info`."""
    reader = GGUFReader(path)
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the header (version, counts), not metadata
            continue
        metadata[key] = field.contents()
    tensors = {
        t.name: {"shape": tuple(int(n) for n in reversed(t.shape.tolist())), "type": t.tensor_type.name}
        for t in reader.tensors
    }
    return {"metadata": metadata, "tensors": tensors}


# --------------------------------------------------------------------------- Ollama Modelfile


def _go_text(text: str) -> str:
    """Literal text in a Go template; text that looks like an action is quoted as a string."""
    if "{{" in text or "}}" in text:
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"
    return text


def _go_fill(pattern: str, bos: str, eos: str, **content: str) -> str:
    """A template pattern as Go template text: literals kept, `{content}`-style slots replaced by
    the given Go expressions, {bos}/{eos} by the tokenizer's strings."""
    slots = {"bos": _go_text(bos), "eos": _go_text(eos), **content}
    pieces = re.split(r"\{(content|system|bos|eos)\}", pattern)
    return "".join(slots[p] if i % 2 else _go_text(p) for i, p in enumerate(pieces))


def go_template(template: ChatTemplate, bos: str, eos: str, drop_leading_bos: bool = False) -> str:
    """An Ollama TEMPLATE (Go text/template over .System and .Messages) equivalent to an lmforge
    ChatTemplate's generation prompt. Written without `{{-` trimming, which would eat the
    templates' own newlines; messages are not stripped of surrounding whitespace (Go templates
    have no such function), and tools, calls and results are not written. `drop_leading_bos`: the
    runtime adds BOS itself (the GGUF says add_bos_token), so the template must not write it again
    at the very start."""
    prefix = template.prefix.replace("{bos}", bos)
    user = template.user.replace("{bos}", bos)
    bos_between_turns = False  # llama2 opens every user turn with BOS: keep it on later turns
    if drop_leading_bos and bos and prefix.startswith(bos):
        prefix = prefix[len(bos) :]
    elif drop_leading_bos and bos and not prefix and user.startswith(bos):
        user, bos_between_turns = user[len(bos) :], True
    out = _go_fill(prefix, bos, eos)
    if template.system_head:  # a system block always written (Llama 3.1's dates first)
        head = _go_text(template.system_head) + "{{ .System }}"
        out += _go_fill(template.system, bos, eos, content=head)
    elif template.system:
        out += "{{ if .System }}" + _go_fill(template.system, bos, eos, content="{{ .System }}") + "{{ end }}"
    content = "{{ $m.Content }}"
    if not template.system:  # a system prompt folded into the first (or last) user turn, as lmforge does
        folded = _go_fill(template.system_in_user, bos, eos, system="{{ $.System }}", content=content)
        turn = "$first" if template.system_turn == "first" else "$last"
        content = f"{{{{ if and {turn} $.System }}}}" + folded + "{{ else }}{{ $m.Content }}{{ end }}"
    head, _, tail = template.assistant.partition("{content}")
    out += (
        "{{ $first := true }}{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
    )
    out += '{{ if eq $m.Role "user" }}'
    if template.separator or bos_between_turns:
        out += "{{ if not $first }}" + _go_fill(template.separator, bos, eos)
        out += (_go_text(bos) if bos_between_turns else "") + "{{ end }}"
    out += _go_fill(user, bos, eos, content=content)
    if template.generation_suffix:
        out += "{{ if $last }}" + _go_text(template.generation_suffix) + "{{ end }}"
    out += "{{ $first = false }}"
    # An assistant message last in the list is a reply to continue: leave its end-of-turn off.
    out += '{{ else if eq $m.Role "assistant" }}' + _go_fill(head, bos, eos) + "{{ $m.Content }}"
    out += "{{ if not $last }}" + _go_fill(tail, bos, eos) + "{{ end }}"
    return out + "{{ end }}{{ end }}"


def _quoted_block(keyword: str, text: str, where: Path) -> str:
    if '"""' in text:
        raise GGUFExportError(f'{where}: the {keyword} contains """, which a Modelfile cannot quote')
    return f'{keyword} """{text}"""'


def write_modelfile(gguf_path: Path, model_dir: Path, out: Path | None = None) -> Path:
    """An Ollama Modelfile beside the GGUF file: FROM, TEMPLATE (translated from the model's lmforge
    chat template, or from the named template its Jinja `chat_template` renders exactly as),
    SYSTEM for a template's default system prompt, PARAMETER num_ctx (the context the model was
    trained for, from the GGUF) and PARAMETER stop."""
    gguf_path, model_dir = Path(gguf_path), Path(model_dir)
    if not gguf_path.is_file():
        raise GGUFExportError(f"{gguf_path} does not exist; export the model first (export_gguf)")
    out = Path(out) if out is not None else gguf_path.with_name(MODELFILE)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    metadata = read_gguf_summary(gguf_path)["metadata"]
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
    n_ctx = metadata.get(f"{metadata.get('general.architecture', 'llama')}.context_length")
    beside = gguf_path.resolve().parent == out.resolve().parent
    source = f"./{gguf_path.name}" if beside else str(gguf_path.resolve())
    lines = [f"# Ollama Modelfile written by lmforge for {model_dir}", f"FROM {source}"]
    template = _modelfile_template(model_dir, tokenizer)
    if isinstance(template, ChatTemplate):
        lines.append(_quoted_block("TEMPLATE", go_template(template, bos, eos, add_bos), model_dir))
        if template.default_system:
            lines.append(_quoted_block("SYSTEM", template.default_system, model_dir))
        stops = [template.stop_token(tokenizer)]
    else:
        why = (
            "its own Jinja chat template, which renders as none of lmforge's named templates"
            if tokenizer.chat_template
            else "no chat template"
        )
        lines += [
            f"# The model has {why}, so lmforge cannot translate it to Ollama's Go template:",
            "# add a TEMPLATE by hand (Go template syntax: see Ollama's docs/template.md).",
        ]
        stops = [eos]
    if n_ctx:  # Ollama's default (2048 or 4096) may exceed what the model was trained for
        lines.append(f"PARAMETER num_ctx {int(n_ctx)}")
    lines += [
        f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in dict.fromkeys(stops) if stop
    ]
    write_atomic(out, "\n".join(lines) + "\n")
    return out


def _modelfile_template(model_dir: Path, tokenizer) -> ChatTemplate | None:
    """The lmforge template saved with the model; for a model that names none, or names the
    tokenizer's own Jinja template, the named template that renders as that Jinja does."""
    name = saved_template_name(str(model_dir))
    template = get_template(name) if name else None
    if isinstance(template, ChatTemplate):
        return template
    return named_equivalent(tokenizer)
