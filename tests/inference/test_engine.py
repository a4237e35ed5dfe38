"""The generation engine: batching with left padding, streaming, stopping at the template's stop token."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import corpus
from lmforge.data.templates import Conversation, get_template
from lmforge.inference.engine import Engine, SamplingParams, decode_after, token_pieces
from lmforge.models.tiny import build_tiny_llama
from tokenizer_families import FAMILIES, build_family

PROMPTS = [Conversation(turns=[("add 3 and 4", "")]), Conversation(turns=[("the cat sat on a mat and", "")])]


def bias_head(engine: Engine, token_id: int, value: float = 5.0) -> torch.nn.Linear:
    """Replace the LM head by one that always prefers `token_id` (returned, to bias further)."""
    lm_head = engine.model.lm_head
    biased = torch.nn.Linear(lm_head.in_features, lm_head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.zero_()
        biased.bias.zero_()
        biased.bias[token_id] = value
    engine.model.lm_head = biased
    return biased


def test_batched_equals_one_by_one_and_stream(base_dir):
    engine = Engine.load(str(base_dir), template="chatml")
    params = SamplingParams(max_new_tokens=6)
    batched = engine.generate(PROMPTS, params)
    singles = [engine.generate([p], params)[0] for p in PROMPTS]
    assert batched == singles
    assert "".join(engine.stream(PROMPTS[1], params)).strip() == singles[1]
    assert engine.model.config.use_cache is True


def test_generation_stops_at_template_stop_token(base_dir, tokenizer):
    engine = Engine.load(str(base_dir), template="chatml")
    stop_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    word_id = tokenizer.convert_tokens_to_ids("cat")
    biased = bias_head(engine, word_id)
    assert engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=3)) == ["catcatcat"]
    with torch.no_grad():
        biased.bias[stop_id] = 10.0  # now the stop token wins at once
    assert engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=50)) == [""]
    assert engine.stop_ids == sorted({stop_id, tokenizer.eos_token_id})


def test_seeded_sampling_is_reproducible(base_dir):
    engine = Engine.load(str(base_dir), template="chatml")
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert engine.generate(PROMPTS, params) == engine.generate(PROMPTS, params)


def test_prompt_uses_template(base_dir, tokenizer):
    engine = Engine.load(str(base_dir), template="llama2")
    assert engine.prompt_text(PROMPTS[0]) == "<s>[INST] add 3 and 4 [/INST]"
    assert engine.template is get_template("llama2")


def test_static_kv_cache_gives_the_same_answers(base_dir):
    engine = Engine.load(str(base_dir), template="chatml")
    dynamic = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6))
    assert engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, cache="static")) == dynamic
    assert engine._generate_kwargs(SamplingParams(cache="static"))["cache_implementation"] == "static"


def test_sampling_settings_reach_generate(base_dir):
    engine = Engine.load(str(base_dir), template="chatml")
    kwargs = engine._generate_kwargs(
        SamplingParams(temperature=0.7, top_p=0.9, top_k=5, repetition_penalty=1.3)
    )
    assert (kwargs["temperature"], kwargs["top_p"], kwargs["top_k"], kwargs["repetition_penalty"]) == (
        0.7,
        0.9,
        5,
        1.3,
    )
    greedy = engine._generate_kwargs(SamplingParams(repetition_penalty=1.3))
    assert greedy["do_sample"] is False and greedy["repetition_penalty"] == 1.3
    plain = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12))
    penalised = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, repetition_penalty=5.0))
    assert plain != penalised, "the penalty changes what greedy decoding picks"


def test_completion_keeps_the_continuations_leading_space(base_dir, tokenizer):
    """`/v1/completions` returns raw text: a continuation starting with a space keeps it."""
    engine = Engine.load(str(base_dir), template="chatml")
    space_the = tokenizer.convert_tokens_to_ids("Ġthe")
    bias_head(engine, space_the)
    assert engine.complete(["the cat"], SamplingParams(max_new_tokens=2))[0].text == " the the"
    assert engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2)) == ["the the"]  # chat: stripped


def test_a_tokenizers_own_template_is_used_when_none_is_saved(base_dir, tokenizer, tmp_path):
    """serve, chat and predict share one resolution: a model folder with no saved lmforge template and
    no known family name uses the tokenizer's own chat_template (not a guessed chatml); --template wins."""
    import shutil

    from lmforge.inference.server import load_served

    folder = tmp_path / "my-model"
    shutil.copytree(base_dir, folder)
    assert not (folder / "lmforge_template.txt").exists()
    own = tokenizer.__class__.from_pretrained(str(folder))
    own.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    own.save_pretrained(str(folder))
    engine = Engine.load(str(folder))
    assert engine.template.name == "tokenizer"
    prompt = engine.prompt_text(Conversation(turns=[("hi", "")]))
    ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids  # one special token, not 7 pieces
    assert load_served(str(folder), {}).engine.template.name == "tokenizer"
    assert load_served(str(folder), {}, template="llama3").engine.template.name == "llama3"
    plain = tmp_path / "plain-model"
    shutil.copytree(base_dir, plain)
    assert Engine.load(str(plain)).template.name == "chatml"  # no template anywhere: chatml


@pytest.fixture(scope="module", params=FAMILIES)
def family_engine(request):
    """A tiny random Llama over each tokenizer family (byte-level BPE, SentencePiece BPE legacy and
    not, Unigram)."""
    tokenizer = build_family(request.param, corpus())
    return Engine(
        build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2),
        tokenizer,
        get_template("chatml"),
    )


def test_a_continuation_keeps_its_leading_space_on_every_tokenizer_family(family_engine):
    """Decoding the answer's tokens alone drops a SentencePiece token's leading `▁`: "the cat" went on
    "the the" instead of " the the". The continuation is the text its tokens add after the prompt."""
    tokenizer = family_engine.tokenizer
    vocabulary = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    word = next(i for i, t in enumerate(vocabulary) if re.fullmatch("[▁Ġ][a-z]{2,}", t or ""))  # " the"
    bias_head(family_engine, word)
    prompt = tokenizer("the cat", add_special_tokens=True)["input_ids"]
    answer = family_engine.complete(["the cat"], SamplingParams(max_new_tokens=2))[0]
    assert list(answer.token_ids) == [word, word]
    whole = tokenizer.decode(prompt + [word, word], skip_special_tokens=True)
    assert answer.text == whole[len(tokenizer.decode(prompt, skip_special_tokens=True)) :]
    assert answer.text.startswith(" ") and answer.text.count(" ") == 2
    assert [g.text for g in family_engine.complete([prompt], SamplingParams(max_new_tokens=2))] == [
        answer.text
    ]


@pytest.mark.parametrize("text", ["the cat sat", "  two  spaces\nand a line", "héllo wörld 世界 🙂 ok"])
def test_token_pieces_join_to_the_decoded_text_on_every_family(family_engine, text):
    tokenizer = family_engine.tokenizer
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    pieces = token_pieces(tokenizer, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    after = decode_after(tokenizer, ids[:2], ids[2:])  # a character cut at the context's end is after's
    before = tokenizer.decode(ids[:2], skip_special_tokens=True).rstrip("\ufffd")
    assert before + after == tokenizer.decode(ids, skip_special_tokens=True)


def test_logprobs_of_a_generation_are_the_models_scores_of_its_tokens(base_dir):
    """`Generation.logprobs` (read off generate's logits) equal `score` (one forward pass over
    prompt + answer), and greedy tokens are each position's likeliest."""
    engine = Engine.load(str(base_dir), template="chatml")
    prompt = engine.prompt_ids(["the cat"])[0]
    answer = engine.complete([prompt], SamplingParams(max_new_tokens=6, logprobs=2))[0]
    scored = engine.score([prompt + list(answer.token_ids)], top=2)[0][len(prompt) :]
    assert [t.token for t in answer.logprobs] == list(answer.token_ids) == [t.token for t in scored]
    assert [t.logprob for t in answer.logprobs] == pytest.approx([t.logprob for t in scored], abs=1e-4)
    assert all(t.top[0] == (t.token, t.logprob) and len(t.top) == 2 for t in answer.logprobs)


def test_n_answers_per_prompt_follow_one_another(base_dir):
    engine = Engine.load(str(base_dir), template="chatml")
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=0, n=3)
    answers = engine.complete(["the cat", "a dog"], params)
    assert len(answers) == 6 and answers == engine.complete(["the cat", "a dog"], params)
    assert len({a.text for a in answers[:3]}) > 1
    chats = engine.generate_detailed(PROMPTS[:2], params)
    assert len(chats) == 6 and chats == engine.generate_detailed(PROMPTS[:2], params)
