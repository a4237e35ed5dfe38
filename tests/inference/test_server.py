"""`lmforge serve` through the real `openai` client, against a server on 127.0.0.1 in this process."""

from __future__ import annotations

import json
import threading
import time

import openai
import pytest

from helpers import http, serving, sft_config
from lmforge.config import validate_config
from lmforge.data.templates import Conversation
from lmforge.inference.engine import Engine, SamplingParams, StreamEnd, cut_at_stop
from lmforge.inference.server import create_app, load_served
from lmforge.methods import sft

KEY = "test-key"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, base_dir, alpaca_file):
    out = {}
    for name, lr in (("add", 5e-3), ("add-strong", 2e-2)):
        config = sft_config(base_dir, alpaca_file, tmp_path_factory.mktemp(name), max_steps=15, lr=lr)
        out[name] = str(sft.run(validate_config(config), quiet=True).artifact)
    return out


@pytest.fixture(scope="module")
def server(base_dir, adapters):
    served = load_served(str(base_dir), adapters, name="tiny")
    with serving(create_app(served, KEY, 16)) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def direct(base_dir, adapter, prompt, max_new_tokens=16):
    engine = Engine.load(str(base_dir), adapter=adapter)
    return engine.generate(
        [Conversation(turns=[(prompt, "")])], SamplingParams(max_new_tokens=max_new_tokens)
    )[0]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == ["tiny", "add", "add-strong"]
    status, text = http("GET", f"{server}/health", key=None)
    assert status == 200 and json.loads(text)["status"] == "ok"


def test_chat_answers_as_the_engine_does_for_each_served_model(client, base_dir, adapters):
    for model, adapter in (("tiny", None), ("add", adapters["add"]), ("add-strong", adapters["add-strong"])):
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "add 2 and 3"}], temperature=0
        )
        assert reply.choices[0].message.content == direct(base_dir, adapter, "add 2 and 3"), model
        assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
        assert reply.choices[0].finish_reason in ("stop", "length")
    answers = {
        m: client.chat.completions.create(
            model=m, messages=[{"role": "user", "content": "add 4 and 4"}], temperature=0
        )
        .choices[0]
        .message.content
        for m in ("tiny", "add-strong")
    }
    assert answers["tiny"] != answers["add-strong"], "the request's model selects the adapter"


def test_streamed_chat_equals_the_whole_answer(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "add 1 and 6"}]
    whole = client.chat.completions.create(model="add", messages=messages, temperature=0)
    stream = client.chat.completions.create(
        model="add", messages=messages, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_completions_continue_raw_text(client, base_dir):
    reply = client.completions.create(
        model="tiny", prompt=["add 2 and 3 is", "the cat"], max_tokens=5, temperature=0
    )
    assert len(reply.choices) == 2 and all(isinstance(c.text, str) for c in reply.choices)
    assert reply.usage.completion_tokens <= 10 and reply.usage.prompt_tokens > 0


def test_stop_strings_end_the_answer(client):
    full = (
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], temperature=0, max_tokens=16
        )
        .choices[0]
        .message.content
    )
    assert len(full) > 2
    stop = full[1:3]
    cut = (
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hello"}],
            temperature=0,
            max_tokens=16,
            stop=[stop],
        )
        .choices[0]
        .message.content
    )
    assert stop not in cut and full.startswith(cut.strip())


def test_requests_without_the_key_get_401(server):
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=f"{server}/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    assert http("GET", f"{server}/v1/models", key=None)[0] == 401


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (
            {"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
            404,
            "model 'nope' is not served",
        ),
        ({"model": "tiny", "messages": []}, 400, "messages"),
        ({"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "must follow a user"),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 9}, 400, "n"),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
            400,
            "needs logprobs",
        ),
        (
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": "hi"}],
                "logprobs": True,
                "top_logprobs": 21,
            },
            400,
            "top_logprobs",
        ),
        (
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": "hi"}],
                "logprobs": True,
                "stream": True,
            },
            400,
            "not streamed",
        ),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 9},
            400,
            "temperature",
        ),
        (
            {
                "model": "tiny",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
                        ],
                    }
                ],
            },
            400,
            "image parts need a vision-language model",
        ),
    ],
)
def test_bad_requests_get_4xx_with_a_message(server, body, status, message):
    got, text = http("POST", f"{server}/v1/chat/completions", body)
    assert got == status, text
    assert message in json.loads(text)["error"]["message"] and "Traceback" not in text
    assert http("POST", f"{server}/v1/chat/completions", b"{")[0] == 400


def test_image_parts_reach_a_vision_language_model(vlm_dir, shapes_file, tmp_path):
    import base64

    served = load_served(str(vlm_dir), {}, name="vl", image_root=shapes_file.parent)
    app = create_app(served, KEY, 4)
    from fastapi.testclient import TestClient

    image = shapes_file.parent / json.loads(shapes_file.read_text())[0]["images"][0]
    data_url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    outside = tmp_path / "secret.png"
    outside.write_bytes(image.read_bytes())
    with TestClient(app) as http_client:
        headers = {"Authorization": f"Bearer {KEY}"}

        def ask(url: str):
            content = [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "What colour?"},
            ]
            body = {"model": "vl", "messages": [{"role": "user", "content": content}], "temperature": 0}
            return http_client.post("/v1/chat/completions", json=body, headers=headers)

        by_data, by_file = ask(data_url), ask(f"file://{image}")
        assert by_data.status_code == 200 and by_file.status_code == 200, by_data.text
        assert (
            by_data.json()["choices"][0]["message"]["content"]
            == by_file.json()["choices"][0]["message"]["content"]
        )
        assert by_data.json()["usage"]["prompt_tokens"] > 20, "the image's tokens are counted"
        assert ask(f"file://{outside}").status_code == 403, "files outside --image-root are refused"


def test_bounded_load_32_clients_no_failures(server):
    """256 requests from 32 concurrent clients (a third streamed) on loopback: every one succeeds."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> float:
        client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)
        started = time.perf_counter()
        messages = [{"role": "user", "content": f"add {i % 10} and {i % 7}"}]
        model = ("tiny", "add", "add-strong")[i % 3]
        if i % 3 == 0:
            chunks = list(
                client.chat.completions.create(model=model, messages=messages, max_tokens=8, stream=True)
            )
            assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
        else:
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=8)
            assert reply.choices[0].message.content is not None
        return time.perf_counter() - started

    with ThreadPoolExecutor(max_workers=32) as pool:
        latencies = sorted(pool.map(one, range(256)))
    p50, p95 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.95)]
    print(f"256 requests, 32 clients: p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms")
    assert len(latencies) == 256


@pytest.mark.parametrize("mode", ["separate", "hide", "show"])
def test_reasoning_traces_are_separated_hidden_or_shown(base_dir, monkeypatch, mode):
    from fastapi.testclient import TestClient

    from lmforge.inference.engine import Generation

    served = load_served(str(base_dir), {}, name="r1")
    raw = "<think>\nadd: 2+3=5\n</think>\n\nThe answer is 5."
    monkeypatch.setattr(served.engine, "generate_detailed", lambda *a, **k: [Generation(raw, 5, 12, "stop")])

    def rows(conversations, params, sinks, cancels, images=None):
        for sink in sinks:
            for i in range(0, len(raw), 3):
                sink.put(raw[i : i + 3])
            sink.put(StreamEnd(12, True))

    monkeypatch.setattr(served.engine, "stream_rows", rows)
    body = {"model": "r1", "messages": [{"role": "user", "content": "add 2 and 3"}]}
    headers = {"Authorization": f"Bearer {KEY}"}
    with TestClient(create_app(served, KEY, 16, mode)) as http_client:
        message = http_client.post("/v1/chat/completions", json=body, headers=headers).json()["choices"][0][
            "message"
        ]
        events = http_client.post("/v1/chat/completions", json={**body, "stream": True}, headers=headers).text
    deltas = [
        json.loads(line[6:])["choices"][0]["delta"]
        for line in events.splitlines()
        if line.startswith("data: {")
    ]
    streamed_content = "".join(d.get("content") or "" for d in deltas)
    streamed_trace = "".join(d.get("reasoning_content") or "" for d in deltas)
    if mode == "show":
        assert message["content"] == raw and streamed_content == raw
    else:
        assert message["content"] == "The answer is 5." and streamed_content.strip() == "The answer is 5."
    if mode == "separate":
        assert message["reasoning_content"] == "add: 2+3=5" and streamed_trace.strip() == "add: 2+3=5"
    else:
        assert "reasoning_content" not in message and not streamed_trace
    with pytest.raises(ValueError, match="use one of separate, hide, show"):
        create_app(served, KEY, 16, "mumble")


def test_closing_a_stream_stops_its_generation(base_dir):
    """What the server does when a client disconnects: closing the stream ends generation early."""
    engine = Engine.load(str(base_dir))
    lengths = []
    generate = engine.model.generate

    def spy(*args, **kwargs):
        out = generate(*args, **kwargs)
        lengths.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    engine.model.generate = spy
    original = engine._generate_kwargs
    engine._generate_kwargs = lambda p: {
        **original(p),
        "min_new_tokens": p.max_new_tokens,
    }  # never stops early
    params = SamplingParams(max_new_tokens=300)
    stream = engine.stream(Conversation(turns=[("hello", "")]), params)
    next(stream)
    stream.close()  # the client went away
    assert lengths and lengths[0] < 300, lengths
    full = list(engine.stream(Conversation(turns=[("hello", "")]), params))
    assert full and lengths[1] == 300, "without the disconnect it runs to the end"


def test_concurrent_chat_requests_are_batched_and_answered_as_alone(base_dir, adapters):
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    served = load_served(str(base_dir), adapters, name="tiny")
    app = create_app(served, KEY, 8)
    prompts = [
        f"add {a} and {b}" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (9, 1), (4, 0), (6, 3)]
    ]
    with TestClient(app) as http_client:
        barrier = threading.Barrier(len(prompts))

        def ask(prompt: str) -> str:
            body = {"model": "add", "messages": [{"role": "user", "content": prompt}], "temperature": 0}
            barrier.wait()
            reply = http_client.post(
                "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
            )
            return reply.json()["choices"][0]["message"]["content"]

        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(ask, prompts))
    assert 0 < app.state.batcher.batches < len(prompts), (
        "requests that arrived together shared a generate call"
    )
    alone = [direct(base_dir, adapters["add"], p, max_new_tokens=8) for p in prompts]
    assert answers == alone


def test_concurrent_streams_are_batched_and_each_streams_its_own_answer(base_dir, adapters):
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    served = load_served(str(base_dir), adapters, name="tiny")
    app = create_app(served, KEY, 8)
    prompts = ["add 1 and 2", "add 3 and 4", "add 5 and 6", "add 7 and 8"]
    with TestClient(app) as http_client:
        barrier = threading.Barrier(len(prompts))

        def ask(prompt: str) -> str:
            body = {
                "model": "add",
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0,
                "stream": True,
            }
            barrier.wait()
            events = http_client.post(
                "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
            )
            deltas = [
                json.loads(line[6:])["choices"][0]["delta"]
                for line in events.text.splitlines()
                if line.startswith("data: {")
            ]
            return "".join(d.get("content") or "" for d in deltas).strip()

        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(ask, prompts))
    assert 0 < app.state.batcher.batches < len(prompts), (
        "streams that arrived together shared a generate call"
    )
    assert answers == [direct(base_dir, adapters["add"], p, max_new_tokens=8) for p in prompts]


def test_a_cancelled_row_of_a_batched_stream_stops_while_the_others_go_on(base_dir):
    import queue

    engine = Engine.load(str(base_dir))
    original = engine._generate_kwargs
    engine._generate_kwargs = lambda p: {
        **original(p),
        "min_new_tokens": p.max_new_tokens,
    }  # never stops early
    sinks, cancels = [queue.Queue(), queue.Queue()], [threading.Event(), threading.Event()]
    conversations = [Conversation(turns=[("hello", "")])] * 2
    worker = threading.Thread(
        target=engine.stream_rows, args=(conversations, SamplingParams(max_new_tokens=200), sinks, cancels)
    )
    worker.start()
    first = sinks[0].get(timeout=60)
    cancels[0].set()  # the first client went away
    worker.join(timeout=120)

    def drain(sink) -> str:
        pieces = []
        while isinstance(piece := sink.get(timeout=5), str):
            pieces.append(piece)
        return "".join(pieces)

    cancelled, kept = first + drain(sinks[0]), drain(sinks[1])
    tokenizer = engine.tokenizer
    assert len(tokenizer(cancelled)["input_ids"]) < len(tokenizer(kept)["input_ids"])
    assert kept.startswith(cancelled[: len(first)])


def test_sampling_fields_reach_the_engine_params():
    from lmforge.inference.server import ChatRequest

    request = ChatRequest(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        temperature=0.7,
        top_p=0.9,
        top_k=5,
        repetition_penalty=1.3,
        max_completion_tokens=12,
        stop="x",
        seed=3,
    )
    params = request.params(256)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.7, 0.9, 5, 1.3)
    assert (params.max_new_tokens, params.stop, params.seed) == (12, ("x",), 3)


def test_streamed_text_equals_plain_text_with_multi_token_stops(client):
    """A partial stop match is held back until resolved: nothing of a stop string leaks into a stream,
    and a held-back tail that never completes a stop string is still sent."""
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "temperature": 0}
    full = client.chat.completions.create(**ask, max_tokens=16).choices[0].message.content
    assert len(full) > 6
    stops = [full[2:6], full[1:3], full[3:5] + "\x01never", full[-2:] + "\x01", "\x01absent"]
    for stop in stops:
        plain = client.chat.completions.create(**ask, max_tokens=16, stop=[stop]).choices[0].message.content
        chunks = client.chat.completions.create(**ask, max_tokens=16, stop=[stop], stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == plain, stop


def test_stop_safe_length_holds_back_only_a_possible_stop_start():
    from lmforge.inference.engine import stop_safe_length

    assert stop_safe_length("par '*", ("'*'par",)) == 4  # "'*" may begin the stop: held
    assert stop_safe_length("par '", ("'*'par",)) == 4
    assert stop_safe_length("par x", ("'*'par",)) == 5
    assert stop_safe_length("ab", ("bc", "abx")) == 0  # the longest possible start wins
    assert stop_safe_length("abc", ()) == 3


def test_a_stop_string_split_across_streamed_pieces_never_leaks(tokenizer):
    """The reported case: pieces "par", " '", "*", "'", "par" with stop "'*'par" streamed
    "par '*'"; the plain answer is "par " and the stream now sends exactly that."""
    import asyncio
    import queue
    from types import SimpleNamespace

    from lmforge.inference.server import ChatRequest, _Job, _stream_chat

    pieces = ["par", " '", "*", "'", "par", " more"]
    stop = ("'*'par",)
    engine = SimpleNamespace(tokenizer=tokenizer, prompt_text=lambda conversation: "hello")
    served = SimpleNamespace(engine=engine, forget=lambda images: None)
    request = ChatRequest(model="tiny", messages=[{"role": "user", "content": "hello"}], stop=list(stop))
    params = SamplingParams(max_new_tokens=16, stop=stop)
    conversation = Conversation(turns=[("hello", "")])

    async def collect(chunks: list[str]) -> str:
        job = _Job("tiny", conversation, [], params, [threading.Event()], sink=queue.Queue())
        for piece in chunks:
            job.sink.put((0, piece))
        job.sink.put((0, StreamEnd(len(chunks), False)))
        events = [e async for e in _stream_chat(served, request, conversation, job, params, 0, "x", "show")]
        deltas = [json.loads(e[6:])["choices"] for e in events if e.startswith("data: {")]
        return "".join(c[0]["delta"].get("content") or "" for c in deltas if c)

    assert asyncio.run(collect(pieces)) == cut_at_stop("".join(pieces), stop)[0] == "par "
    assert asyncio.run(collect(["par '*", "x"])) == "par '*x"  # a false start is sent once resolved
