"""GGUF files lmforge exports, run by llama.cpp itself (through llama-cpp-python): its logits and
greedy tokens match transformers' on the same tiny model for f32, f16 and q8_0; GQA Llama and
Qwen2 (biases, halves rotary, tied head) compute as in transformers; llama.cpp's tokenizer, built
from the GGUF vocabulary and `tokenizer.ggml.pre`, gives the Hugging Face tokenizer's ids on a
stress set; and llama.cpp refuses a pre-tokenizer it does not know, so loading a file is the check
that it knows lmforge's.

test_gguf.py reads the file back with gguf's own reader. This file checks what only llama.cpp can:
its loader (keys, shapes, names), its rotary over the permuted Q/K rows, its quantized matmuls and
its tokenizer.

Measured on the tiny model (2 layers, hidden 64, random weights: logits with a spread of about 0.16),
with llama.cpp's KV cache in f32: the largest logit difference from transformers at any position is
2.7e-7 for f32, 3.6e-4 for f16 and 9.0e-3 for q8_0. With llama.cpp's default f16 KV cache, f32 alone
differs by 1.9e-4, which is why the cache is f32 here: the tolerances then measure the export.
"""

from __future__ import annotations

import itertools
from contextlib import closing
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from helpers import GPT2_PRE, LLAMA3_PRE, with_pre_tokenizer
from lmforge.export.gguf import PRE_TOKENIZER_PROBES, export_gguf
from lmforge.models.tiny import build_tiny_llama, save_tiny

llama_cpp = pytest.importorskip(
    "llama_cpp",
    reason=(
        "llama-cpp-python (llama.cpp's binding) is not installed; to run these tests, build it "
        '(about 5 minutes on 2 cores): CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF" '
        "pip install llama-cpp-python==0.3.36"
    ),
)

TYPES = ("f32", "f16", "q8_0")
# Largest |logit difference| from transformers allowed at any position (measured: 2.7e-7, 3.6e-4, 9.0e-3).
LOGIT_TOL = {"f32": 1e-5, "f16": 1e-3, "q8_0": 2e-2}
PROMPTS = ("the cat sat on", "add 4 and 2 is", "Hello! How are you?", "red blue green")
NEW_TOKENS = 16


def load(path) -> llama_cpp.Llama:
    """llama.cpp on one thread, at the context the GGUF says it was trained for (n_ctx=0), with
    its KV cache in f32 so the only rounding left is the exported weights'."""
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=0,
        n_threads=1,
        n_threads_batch=1,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        logits_all=True,
        verbose=False,
    )


def llama_logits(llm, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `tokens`, evaluated as one batch."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)])


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    """n tokens decoded one at a time from llama.cpp's greedy sampler (temp 0)."""
    return list(itertools.islice(llm.generate(prompt, temp=0.0, reset=True), n))


def top2_gap(logits: np.ndarray) -> np.ndarray:
    top = np.sort(logits, axis=-1)[..., -2:]
    return top[..., 1] - top[..., 0]


@dataclass(frozen=True)
class GreedyPath:
    """transformers' greedy continuation of one prompt, and its logits along prompt + continuation."""

    text: str
    prompt: list[int]
    continuation: list[int]
    logits: np.ndarray

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.continuation

    def step_gaps(self) -> np.ndarray:
        """transformers' top-2 logit gap at each step that chose a continuation token."""
        return top2_gap(self.logits[len(self.prompt) - 1 : -1])


@pytest.fixture(scope="module")
def gguf_files(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {out_type: export_gguf(base_dir, out / f"tiny-{out_type}.gguf", out_type) for out_type in TYPES}


@pytest.fixture(scope="module")
def hf_paths(base_dir, tokenizer) -> list[GreedyPath]:
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    paths = []
    for text in PROMPTS:
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
            logits = model(out).logits[0].numpy()
        paths.append(GreedyPath(text, prompt, out[0, len(prompt) :].tolist(), logits))
    return paths


@pytest.mark.parametrize("out_type", TYPES)
def test_logits_match_transformers_at_every_position(gguf_files, hf_paths, out_type):
    with closing(load(gguf_files[out_type])) as llm:
        for path in hf_paths:
            diff = np.abs(llama_logits(llm, path.tokens) - path.logits).max()
            assert diff <= LOGIT_TOL[out_type], (path.text, diff)


@pytest.mark.parametrize("out_type", ["f32", "f16"])
def test_greedy_continuations_are_those_of_transformers(gguf_files, hf_paths, out_type):
    """llama.cpp's own greedy decoding, one token at a time, gives transformers' 16 tokens for every
    prompt. Not luck: transformers' smallest top-2 gap on these paths (1.5e-3) is 4 times the largest
    f16 logit error (3.6e-4). q8_0's error (9.0e-3) exceeds many gaps of this random model; measured,
    3 prompts of 4 still agree on all 16 tokens and "add 4 and 2 is" on the first 5."""
    with closing(load(gguf_files[out_type])) as llm:
        for path in hf_paths:
            assert llama_greedy(llm, path.prompt, NEW_TOKENS) == path.continuation, path.text


@pytest.mark.parametrize("out_type", TYPES)
def test_each_greedy_choice_is_that_of_transformers_where_rounding_cannot_flip_it(
    gguf_files, hf_paths, out_type
):
    """transformers' greedy path is fed to llama.cpp one token at a time; at every step whose top-2
    gap exceeds 2 x LOGIT_TOL, llama.cpp's most likely next token is transformers' choice. The steps
    left out are near ties that the type's rounding may honestly flip (q8_0 flips two, at gaps of
    2.1e-3 and 1.6e-3). Checked steps, measured: f32 64 of 64, f16 60, q8_0 30."""
    checked = 0
    with closing(load(gguf_files[out_type])) as llm:
        for path in hf_paths:
            llm.reset()
            llm.eval(path.prompt)
            for step, (theirs, gap) in enumerate(zip(path.continuation, path.step_gaps(), strict=True)):
                if gap > 2 * LOGIT_TOL[out_type]:
                    assert np.argmax(llm.scores[llm.n_tokens - 1]) == theirs, (path.text, step)
                    checked += 1
                llm.eval([theirs])
    assert checked >= len(hf_paths) * NEW_TOKENS // 4  # else the near ties leave too little to test


def llama_gqa(tokenizer):
    return build_tiny_llama(tokenizer, num_kv_heads=2, seed=1)


def qwen2_tied(tokenizer):
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
    return Qwen2ForCausalLM(config)


@pytest.mark.parametrize(
    "build",
    [llama_gqa, qwen2_tied],
    ids=["llama-gqa", "qwen2-tied"],
)
def test_gqa_llama_and_qwen2_compute_as_in_transformers(tmp_path, tokenizer, build):
    """K permuted with its own 2 heads (not Q's 4); Qwen2's Q/K/V biases, unpermuted rows and tied head."""
    model = build(tokenizer).eval()
    model_dir = save_tiny(model, tokenizer, tmp_path / "model")
    tokens = tokenizer("the cat sat on a mat and dog ran to hat red blue green", add_special_tokens=False)
    tokens = tokens["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0].numpy()
    with closing(load(export_gguf(model_dir, tmp_path / "m.gguf", "f32"))) as llm:
        assert np.abs(llama_logits(llm, tokens) - expected).max() <= LOGIT_TOL["f32"]


STRESS = [
    *PRE_TOKENIZER_PROBES,
    " ->",
    "don't I'll",
    "DON'T we'LL",
    "a  b   c    d",
    "\n\n\n",
    " \n \n",
    "  \t\n  x",
    "for i in range(10):\n\tprint(i)  # loop\n",
    "café naïve",
    "你好世界",
    "🙂 👍🏽 🇫🇷",
    "12345678901",
    "hello    world\n\n\nbye",
    " leading",
    "trailing ",
    " ",
]
CHAT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\nreason\n</think>\n\nanswer<|im_end|>"


@pytest.mark.parametrize(
    ("pre_tokenizer", "llama_cpp_name"),
    [(None, "starcoder"), (GPT2_PRE, "gpt-2"), (LLAMA3_PRE, "llama-bpe")],
    ids=["lmforge-tiny", "gpt-2", "llama-3"],
)
def test_llama_cpp_tokenizes_as_the_hf_tokenizer(tmp_path, base_dir, pre_tokenizer, llama_cpp_name):
    """Token ids and decoded bytes on the stress set, and chat markers (control tokens, and the
    user-defined <think>) as single tokens when llama.cpp parses special tokens."""
    model_dir = (
        base_dir if pre_tokenizer is None else with_pre_tokenizer(base_dir, tmp_path / "m", pre_tokenizer)
    )
    hf = AutoTokenizer.from_pretrained(model_dir)
    with closing(load(export_gguf(model_dir, tmp_path / "m.gguf", "f32"))) as llm:
        assert llm.metadata["tokenizer.ggml.pre"] == llama_cpp_name
        for text in STRESS:
            ids = llm.tokenize(text.encode(), add_bos=False, special=False)
            assert ids == hf(text, add_special_tokens=False)["input_ids"], text
            assert llm.detokenize(ids) == text.encode(), text
        chat = llm.tokenize(CHAT.encode(), add_bos=False, special=True)
        assert chat == hf(CHAT, add_special_tokens=False)["input_ids"]


def test_llama_cpp_refuses_a_pre_tokenizer_it_does_not_know(tmp_path, base_dir):
    """So that loading the files above is what shows llama.cpp knows the names lmforge writes."""
    path = export_gguf(base_dir, tmp_path / "m.gguf", "f32", pre_tokenizer="no-such-pre-tokenizer")
    with pytest.raises(ValueError, match="Failed to load model"):
        load(path)
