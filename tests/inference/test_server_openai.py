"""`lmforge serve`'s scoring and sampling fields as OpenAI's API reference defines them, through the
real `openai` client: `echo`, `logprobs` (completions and chat), token-id prompts, `max_tokens: 0`,
`n`, `seed` and streamed completions; and hostile values of each."""

from __future__ import annotations

import json
import threading

import openai
import pytest
import torch

from helpers import http, serving
from lmforge.data.templates import Conversation
from lmforge.evaluation.perplexity import score_windows
from lmforge.inference.engine import SamplingParams
from lmforge.inference.server import create_app, load_served

KEY = "test-key"
ASK = [{"role": "user", "content": "add 2 and 3"}]


@pytest.fixture(scope="module")
def served(base_dir):
    return load_served(str(base_dir), {}, name="tiny")


@pytest.fixture(scope="module")
def server(served):
    with serving(create_app(served, KEY, 12)) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def model_logprobs(served, ids: list[int]) -> list[float]:
    """log p(token i | tokens before it), i >= 1, straight from the model (the definition)."""
    with torch.inference_mode():
        logits = served.engine.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_echo_with_max_tokens_0_scores_the_prompt(client, served, tokenizer):
    ids = tokenizer("the cat sat on the mat", add_special_tokens=True)["input_ids"]
    reply = client.completions.create(model="tiny", prompt=[ids], echo=True, max_tokens=0, logprobs=3)
    choice = reply.choices[0]
    logprobs = choice.logprobs
    assert choice.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert len(logprobs.tokens) == len(ids) and "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(len(ids))]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # nothing predicts it
    assert logprobs.token_logprobs[1:] == pytest.approx(model_logprobs(served, ids), abs=1e-4)
    for token, value, top in zip(
        logprobs.tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:], strict=True
    ):
        assert 3 <= len(top) <= 4 and top[token] == value  # the 3 likeliest, and the token itself
        assert max(top.values()) >= value
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 0
    # the sum equals lmforge's perplexity scorer (another code path) on the same tokens
    nll, count = score_windows(served.engine.model, [(ids, [-100] + ids[1:])], pad_id=0)
    assert count == len(ids) - 1 and sum(logprobs.token_logprobs[1:]) == pytest.approx(-nll, abs=1e-3)


def test_echo_with_an_answer_lists_prompt_and_answer_tokens(client, tokenizer):
    prompt = "the cat"
    plain = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=1
    ).choices[0]
    echoed = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=1
    )
    choice = echoed.choices[0]
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    assert choice.text == prompt + plain.text
    assert len(choice.logprobs.tokens) == len(prompt_ids) + echoed.usage.completion_tokens
    assert choice.logprobs.tokens[len(prompt_ids) :] == plain.logprobs.tokens
    assert choice.logprobs.token_logprobs[len(prompt_ids) :] == pytest.approx(plain.logprobs.token_logprobs)
    # greedy: each answer token is the likeliest at its position (what lm-eval's is_greedy checks)
    for value, top in zip(plain.logprobs.token_logprobs, plain.logprobs.top_logprobs, strict=True):
        assert value == max(top.values())
    assert plain.logprobs.text_offset[0] == 0 and choice.logprobs.text_offset[len(prompt_ids)] == len(prompt)


def test_token_id_prompts_equal_their_text(client, tokenizer):
    texts = ["the cat", "a dog ran"]
    rows = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    by_text = client.completions.create(model="tiny", prompt=texts, max_tokens=5, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=rows, max_tokens=5, temperature=0)
    one = client.completions.create(
        model="tiny", prompt=rows[1], max_tokens=5, temperature=0
    )  # a flat list: one prompt
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    assert [c.index for c in by_ids.choices] == [0, 1]
    assert one.choices[0].text == by_text.choices[1].text and len(one.choices) == 1
    assert by_ids.usage.prompt_tokens == sum(map(len, rows))


def test_n_answers_per_prompt_and_seed(client):
    ask = {"model": "tiny", "prompt": ["the cat", "a dog"], "max_tokens": 8, "temperature": 1.0}
    first = client.completions.create(**ask, n=3, seed=7)
    again = client.completions.create(**ask, n=3, seed=7)
    other = client.completions.create(**ask, n=3, seed=8)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == list(range(6))  # prompt 0's three, then prompt 1's
    assert texts == [c.text for c in again.choices]  # the seed decides
    assert texts != [c.text for c in other.choices]
    assert len(set(texts[:3])) > 1  # sampled apart
    greedy = client.completions.create(model="tiny", prompt="the cat", max_tokens=6, n=2, temperature=0)
    assert greedy.choices[0].text == greedy.choices[1].text
    chat = [
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=8, n=3, seed=s) for s in (1, 1)
    ]
    answers = [[c.message.content for c in reply.choices] for reply in chat]
    assert answers[0] == answers[1] and len(set(answers[0])) > 1 and len(answers[0]) == 3
    assert chat[0].usage.completion_tokens > chat[0].choices[0].message.content.count(" ")


def test_a_seeded_request_is_not_changed_by_requests_beside_it(client):
    """Requests that arrive together are batched; a seeded one is answered alone, so its sampled
    answer is the one it gets when it is the only request."""
    ask = {"model": "tiny", "messages": ASK, "max_tokens": 8, "temperature": 1.0}
    alone = client.chat.completions.create(**ask, seed=3).choices[0].message.content
    barrier, answers = threading.Barrier(4), {}

    def send(k: int) -> None:
        barrier.wait()
        reply = client.chat.completions.create(**ask, seed=3 if k == 0 else None)
        answers[k] = reply.choices[0].message.content

    workers = [threading.Thread(target=send, args=(k,)) for k in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert answers[0] == alone


def test_streamed_chat_with_n_equals_plain(client):
    ask = {"model": "tiny", "messages": ASK, "max_tokens": 8, "temperature": 1.0, "n": 2, "seed": 5}
    plain = client.chat.completions.create(**ask)
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in client.chat.completions.create(**ask, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert [texts[0].strip(), texts[1].strip()] == [c.message.content for c in plain.choices]
    assert finishes == {c.index: c.finish_reason for c in plain.choices}


def test_streamed_completions_equal_plain(client, tokenizer):
    ask = {"model": "tiny", "prompt": ["the cat", "a dog"], "max_tokens": 8}
    plain = client.completions.create(**ask, n=2, temperature=1.0, seed=4)
    texts, finishes, usage = {}, {}, None
    stream = client.completions.create(
        **ask, n=2, temperature=1.0, seed=4, stream=True, stream_options={"include_usage": True}
    )
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert [texts[i] for i in range(4)] == [c.text for c in plain.choices]
    assert finishes == {c.index: c.finish_reason for c in plain.choices}
    assert usage.prompt_tokens == plain.usage.prompt_tokens
    assert usage.completion_tokens == plain.usage.completion_tokens
    one = {"model": "tiny", "prompt": "the cat", "max_tokens": 8, "temperature": 0}
    echoed = "".join(c.choices[0].text for c in client.completions.create(**one, echo=True, stream=True))
    assert echoed == "the cat" + client.completions.create(**one).choices[0].text


def test_a_stop_string_ends_a_streamed_completion_as_a_plain_one(client):
    full = (
        client.completions.create(model="tiny", prompt="the cat", max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    stop = full[3:6]  # a stop string that occurs in the answer
    plain = client.completions.create(
        model="tiny", prompt="the cat", max_tokens=12, temperature=0, stop=[stop]
    ).choices[0]
    chunks = client.completions.create(
        model="tiny", prompt="the cat", max_tokens=12, temperature=0, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].text for c in chunks) == plain.text == full[: full.find(stop)]


def test_chat_logprobs(client, served):
    reply = client.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert "".join(t.token for t in content).strip() == choice.message.content
    assert len(content) == reply.usage.completion_tokens - (choice.finish_reason == "stop")
    for token in content:
        assert len(token.top_logprobs) == 2 and token.top_logprobs[0].logprob == token.logprob  # greedy
        assert token.bytes == list(token.token.encode()) and token.logprob <= 0
    plain = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == choice.message.content
    # the same generation through /v1/completions (the chat prompt's token ids) reports the same
    # numbers; the completions test checks those against the model itself
    engine = served.engine
    prompt = engine.tokenizer(
        engine.prompt_text(Conversation(turns=[(ASK[0]["content"], "")])), add_special_tokens=False
    )["input_ids"]
    raw = client.completions.create(model="tiny", prompt=[prompt], max_tokens=8, temperature=0, logprobs=2)
    assert [t.logprob for t in content] == raw.choices[0].logprobs.token_logprobs[: len(content)]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": [[1, 2, 10**9]]}, "outside the vocabulary"),
        ({"prompt": [[1, -1]]}, "outside the vocabulary"),
        ({"prompt": [[]]}, "prompt 0 is empty"),
        ({"prompt": ""}, "prompt 0 is empty"),
        ({"prompt": ["a", ""]}, "prompt 1 is empty"),
        ({"prompt": []}, "prompt is empty"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": "hi", "n": 9}, "n"),
        ({"prompt": ["hi"] * 33, "n": 2}, "at most 64 answers"),
        ({"prompt": "hi", "logprobs": 6}, "logprobs"),
        ({"prompt": "hi", "max_tokens": 0}, "with echo it scores"),
        ({"prompt": "hi", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "hi", "logprobs": 1, "stream": True}, "not streamed"),
        ({"prompt": "hi", "model": "nope"}, "not served"),
    ],
)
def test_bad_completion_requests_get_4xx_with_a_message(server, body, message):
    status, text = http("POST", f"{server}/v1/completions", {"model": "tiny", **body}, key=KEY)
    assert 400 <= status < 500, text
    assert message in json.loads(text)["error"]["message"] and "Traceback" not in text


QUESTIONS = [
    {"question": "the cat sat on the", "choices": [" mat", " dog", " the"], "answer": 0},
    {"question": "add 2 and 3:", "choices": [" 5", " 6"], "answer": 0},
    {"question": "a dog ran", "choices": [" away", " home", " and the cat"], "answer": 1},
]


def harness_tasks(folder, data) -> None:
    """Two lm-evaluation-harness tasks over a local JSONL file: one loglikelihood (multiple choice),
    one generate_until."""
    data_file = folder / "questions.jsonl"
    data_file.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    common = (
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data_file}\n  cache_dir: {folder / 'cache'}\n"
        "test_split: test\n"
        'doc_to_text: "{{question}}"\n'
    )
    (folder / "choice.yaml").write_text(
        "task: lmforge_choice\noutput_type: multiple_choice\n" + common + 'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n"
    )
    (folder / "until.yaml").write_text(
        "task: lmforge_until\noutput_type: generate_until\n"
        + common
        + 'doc_to_target: "{{choices[answer]}}"\n'
        'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )


def test_lm_evaluation_harness_local_completions_runs_against_serve(
    server, served, base_dir, tmp_path, monkeypatch
):
    """lm-evaluation-harness's `local-completions` model (token-id prompts, echo + logprobs for
    loglikelihoods, stop strings for generate_until) against `lmforge serve`: its loglikelihoods equal
    lmforge's own perplexity scorer on the same tokens, its generations equal `Engine.complete`."""
    import lm_eval  # a dev dependency (lm-eval[api])
    from lm_eval.tasks import TaskManager

    harness_tasks(tmp_path, QUESTIONS)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    model_args = {
        "model": "tiny",
        "base_url": f"{server}/v1/completions",
        "tokenizer": str(base_dir),
        "tokenizer_backend": "huggingface",
        "tokenized_requests": True,
        "max_retries": 1,
        "max_length": 256,
    }
    output = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=model_args,
        tasks=["lmforge_choice", "lmforge_until"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    engine, tokenizer = served.engine, served.engine.tokenizer
    scored = 0
    for sample in output["samples"]["lmforge_choice"]:
        for (context, continuation), [(loglikelihood, _)] in zip(
            sample["arguments"], sample["resps"], strict=True
        ):
            whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
            context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
            labels = [-100] * len(context_ids) + whole[len(context_ids) :]
            nll, count = score_windows(engine.model, [(whole, labels)], pad_id=0)
            assert count == len(whole) - len(context_ids)
            assert loglikelihood == pytest.approx(-nll, abs=1e-4), (context, continuation)
            scored += 1
    assert scored == sum(len(q["choices"]) for q in QUESTIONS)
    assert 0 <= output["results"]["lmforge_choice"]["acc,none"] <= 1
    generations = output["samples"]["lmforge_until"]
    assert len(generations) == len(QUESTIONS)
    for sample in generations:
        context, kwargs = sample["arguments"][0]
        prompt = tokenizer(context, add_special_tokens=False)["input_ids"]
        params = SamplingParams(max_new_tokens=6, stop=tuple(kwargs["until"]))
        assert sample["resps"][0][0] == engine.complete([prompt], params)[0].text
