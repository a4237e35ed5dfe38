"""`lmforge serve` against hostile and careless clients: answer lengths cut to the context, prompts
that do not fit, abandoned requests, failures mid-stream, oversized bodies and images, malformed data
URLs, connections reused after errors, SIGTERM mid-generation, and a soak of all of it at once."""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from helpers import serving
from lmforge.inference.server import Limits, create_app, load_served
from lmforge.models.tiny import build_tiny_llama, save_tiny

pytestmark = pytest.mark.filterwarnings("ignore:Unfeasible length constraints")

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ASK = [{"role": "user", "content": "add 2 and 3"}]


@pytest.fixture(scope="module")
def short_dir(tmp_path_factory, tokenizer) -> Path:
    """The tiny Llama with a 48-position context."""
    path = tmp_path_factory.mktemp("tiny-short")
    return save_tiny(build_tiny_llama(tokenizer, max_positions=48, seed=0), tokenizer, path)


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory, tokenizer) -> Path:
    """The tiny Llama with a 4,096-position context (long answers fit)."""
    path = tmp_path_factory.mktemp("tiny-long")
    return save_tiny(build_tiny_llama(tokenizer, max_positions=4096, seed=0), tokenizer, path)


def endless(served):
    """The served engine never meets its stop token: answers run to their length limit."""
    engine = served.engine
    original = engine._generate_kwargs
    engine._generate_kwargs = lambda params: {**original(params), "min_new_tokens": 10**6}
    return served


def test_max_tokens_is_cut_to_what_fits_the_context(short_dir):
    served = endless(load_served(str(short_dir), {}, name="tiny"))
    with TestClient(create_app(served, KEY, 8)) as client:
        body = {"model": "tiny", "messages": ASK, "max_tokens": 10**9, "temperature": 0}
        reply = client.post("/v1/chat/completions", json=body, headers=AUTH)
        assert reply.status_code == 200, reply.text
        usage, choice = reply.json()["usage"], reply.json()["choices"][0]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == 48
        assert choice["finish_reason"] == "length"

        stream = client.post("/v1/chat/completions", json={**body, "stream": True}, headers=AUTH)
        events = [json.loads(e[6:]) for e in stream.text.splitlines() if e.startswith("data: {")]
        assert [c["finish_reason"] for e in events for c in e["choices"]][-1] == "length"

        ids = served.engine.tokenizer("the cat sat on", add_special_tokens=True)["input_ids"]
        raw = {"model": "tiny", "prompt": ids, "max_tokens": 10**9, "temperature": 0}
        reply = client.post("/v1/completions", json=raw, headers=AUTH).json()
        assert reply["usage"]["completion_tokens"] == 48 - len(ids)
        assert reply["choices"][0]["finish_reason"] == "length"


def test_a_max_tokens_ceiling_caps_every_request(base_dir):
    served = endless(load_served(str(base_dir), {}, name="tiny"))
    with TestClient(create_app(served, KEY, 8, limits=Limits(max_tokens=5))) as client:
        body = {"model": "tiny", "messages": ASK, "max_tokens": 400, "temperature": 0}
        reply = client.post("/v1/chat/completions", json=body, headers=AUTH).json()
        assert reply["usage"]["completion_tokens"] == 5 and reply["choices"][0]["finish_reason"] == "length"


def test_a_prompt_longer_than_the_context_is_a_400(short_dir):
    served = load_served(str(short_dir), {}, name="tiny")
    long_text = " ".join(["the cat sat on a mat"] * 20)
    with TestClient(create_app(served, KEY, 8)) as client:
        for stream in (False, True):
            body = {"model": "tiny", "messages": [{"role": "user", "content": long_text}], "stream": stream}
            reply = client.post("/v1/chat/completions", json=body, headers=AUTH)
            assert reply.status_code == 400, reply.text
            assert "context is 48" in reply.json()["error"]["message"]
        reply = client.post("/v1/completions", json={"model": "tiny", "prompt": [5] * 60}, headers=AUTH)
        assert reply.status_code == 400 and "context is 48" in reply.json()["error"]["message"]
        fits = client.post("/v1/completions", json={"model": "tiny", "prompt": [5] * 40}, headers=AUTH)
        assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] <= 8


@pytest.mark.parametrize(
    ("field", "value", "status"),
    [
        ("temperature", 1e-40, 400),
        ("temperature", 1e-5, 400),
        ("temperature", 1e-4, 200),
        ("temperature", 2.5, 400),
        ("repetition_penalty", 1e-40, 400),
        ("repetition_penalty", 11, 400),
        ("repetition_penalty", 0.01, 200),
        ("top_p", 1e-40, 200),
        ("top_k", 10**9, 200),
    ],
)
def test_sampling_values_that_would_break_sampling_are_refused(base_dir, field, value, status):
    served = load_served(str(base_dir), {}, name="tiny")
    with TestClient(create_app(served, KEY, 4)) as client:
        body = {"model": "tiny", "messages": ASK, "temperature": 1.0, field: value, "seed": 1}
        reply = client.post("/v1/chat/completions", json=body, headers=AUTH)
        assert reply.status_code == status, reply.text
        if status == 400:
            assert field in reply.json()["error"]["message"]


def test_a_failed_generation_is_an_error_event_in_a_stream_and_a_500_otherwise(base_dir, caplog):
    served = load_served(str(base_dir), {}, name="tiny")

    def broken(**kwargs):
        raise RuntimeError("N must be divisible by block_n")

    served.engine.model.generate = broken
    with serving(create_app(served, KEY, 8)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        with caplog.at_level(logging.ERROR, logger="lmforge.serve"):
            with pytest.raises(openai.APIError, match="generation failed"):
                list(client.chat.completions.create(model="tiny", messages=ASK, stream=True))
            with pytest.raises(openai.APIError, match="generation failed"):
                list(client.completions.create(model="tiny", prompt="the cat", stream=True))
            with pytest.raises(openai.InternalServerError):
                client.chat.completions.create(model="tiny", messages=ASK)
        assert sum("block_n" in r.getMessage() for r in caplog.records) >= 3, "each failure is logged"


def _raw(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=60)


def _send(connection, path: str, body: bytes, headers: dict) -> tuple[int, bytes]:
    connection.request("POST", path, body=body, headers={"Content-Type": "application/json", **headers})
    response = connection.getresponse()
    return response.status, response.read()


def test_the_connection_stays_usable_after_every_kind_of_error(base_dir):
    served = load_served(str(base_dir), {}, name="tiny")
    original = served.engine.model.generate

    def flaky(**kwargs):  # a request asking for 3 tokens makes the model fail: the server's 500
        if kwargs["max_new_tokens"] == 3:
            raise RuntimeError("kernel failure")
        return original(**kwargs)

    served.engine.model.generate = flaky
    good = json.dumps({"model": "tiny", "messages": ASK, "max_tokens": 2}).encode()
    bad = {
        401: (good, {}),
        400: (b"{not json", AUTH),
        404: (json.dumps({"model": "nope", "messages": ASK}).encode(), AUTH),
        413: (b'{"model": "tiny", "pad": "' + b"x" * 30_000 + b'"}', AUTH),
        500: (json.dumps({"model": "tiny", "messages": ASK, "max_tokens": 3}).encode(), AUTH),
    }
    with serving(create_app(served, KEY, 8, limits=Limits(body_bytes=20_000))) as url:
        connection = _raw(url)
        for status, (body, headers) in bad.items():
            got, text = _send(connection, "/v1/chat/completions", body, headers)
            assert got == status, text
            assert "error" in json.loads(text) and b"Traceback" not in text
            assert _send(connection, "/v1/chat/completions", good, AUTH)[0] == 200, f"after {status}"


def test_request_bodies_have_a_size_limit_chunked_or_not(base_dir):
    served = load_served(str(base_dir), {}, name="tiny")
    with serving(create_app(served, KEY, 8, limits=Limits(body_bytes=20_000))) as url:
        connection = _raw(url)
        big = b'{"model": "tiny", "pad": "' + b"x" * 30_000 + b'"}'
        status, text = _send(connection, "/v1/completions", big, AUTH)
        assert status == 413 and b"20,000 bytes" in text
        connection.putrequest("POST", "/v1/completions")
        for name, value in {
            "Content-Type": "application/json",
            "Transfer-Encoding": "chunked",
            **AUTH,
        }.items():
            connection.putheader(name, value)
        connection.endheaders()
        for start in range(0, len(big), 4096):
            piece = big[start : start + 4096]
            connection.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        connection.send(b"0\r\n\r\n")
        response = connection.getresponse()
        assert response.status == 413, response.read()
        response.read()
        small = json.dumps({"model": "tiny", "prompt": "the cat", "max_tokens": 2}).encode()
        assert _send(_raw(url), "/v1/completions", small, AUTH)[0] == 200


def test_many_prompts_are_generated_a_few_at_a_time(base_dir):
    served = load_served(str(base_dir), {}, name="tiny")
    widths, original = [], served.engine.model.generate

    def spy(**kwargs):
        widths.append(kwargs["input_ids"].shape[0])
        return original(**kwargs)

    served.engine.model.generate = spy
    with TestClient(create_app(served, KEY, 2)) as client:
        body = {"model": "tiny", "prompt": [f"add {i} and 1" for i in range(20)], "temperature": 0}
        reply = client.post("/v1/completions", json=body, headers=AUTH)
        assert reply.status_code == 200 and len(reply.json()["choices"]) == 20
        too_many = client.post("/v1/completions", json={**body, "prompt": ["a"] * 65}, headers=AUTH)
        assert too_many.status_code == 400 and "at most 64" in too_many.text
    assert sum(widths) == 20 and max(widths) <= 8, widths


def _hang_up_after(url: str, path: str, body: dict, seconds: float) -> None:
    """Send a request, wait, and close the socket without reading the answer (a client gone)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port))) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        sock.sendall(head.encode() + data)
        time.sleep(seconds)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_non_streamed_request_whose_client_left_stops_generating(long_dir, path):
    served = endless(load_served(str(long_dir), {}, name="tiny"))
    lengths, original = [], served.engine.model.generate

    def spy(**kwargs):
        out = original(**kwargs)
        lengths.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    served.engine.model.generate = spy
    body = {"model": "tiny", "max_tokens": 4000, "temperature": 0}
    body |= {"messages": ASK} if "chat" in path else {"prompt": "the cat"}
    with serving(create_app(served, KEY, 8)) as url:
        _hang_up_after(url, path, body, 0.5)
        started = time.monotonic()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, temperature=0)
        waited = time.monotonic() - started
    assert reply.usage.completion_tokens == 4
    assert lengths[0] < 4000, "the abandoned request stopped early"
    assert waited < 30, f"the next client waited {waited:.1f} s"


def test_a_request_abandoned_while_queued_never_runs(base_dir):
    from lmforge.inference.server import Batcher

    served = load_served(str(base_dir), {}, name="tiny")
    calls, original = [], served.engine.generate_detailed
    served.engine.generate_detailed = lambda *a, **k: calls.append(1) or original(*a, **k)
    batcher = Batcher(served)
    from lmforge.data.templates import Conversation
    from lmforge.inference.engine import SamplingParams

    with served.lock:  # the model is busy: the job waits in the queue
        job = batcher.submit("tiny", Conversation(turns=[("hi", "")]), [], SamplingParams(max_new_tokens=4))
        job.cancel()  # ... and its client leaves
    with pytest.raises(Exception, match="closed the request"):
        job.future.result(timeout=30)
    assert not calls


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def _claims_size(png: bytes, width: int, height: int) -> bytes:
    """A PNG whose header claims another size (a decompression bomb's header, without the bomb)."""
    header = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + header + struct.pack(">I", zlib.crc32(header)) + png[33:]


def test_images_are_checked_before_they_are_decoded_and_deleted_after(vlm_dir, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "ok.png").write_bytes(_png(32, 32))
    served = load_served(str(vlm_dir), {}, name="vl", image_root=root)
    client = TestClient(create_app(served, KEY, 2, limits=Limits(image_pixels=64 * 64)))

    def ask(url: str):
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "colour?"}]
        body = {"model": "vl", "messages": [{"role": "user", "content": content}], "temperature": 0}
        return client.post("/v1/chat/completions", json=body, headers=AUTH)

    def data_url(data: bytes, kind: str = "png") -> str:
        return f"data:image/{kind};base64," + base64.b64encode(data).decode()

    with client:
        assert ask(data_url(_png(32, 32))).status_code == 200
        scratch = served.scratch
        refused = {
            "200x200 pixels": data_url(_png(200, 200)),
            "cannot be read": data_url(_claims_size(_png(8, 8), 14000, 14000)),
            "an image data URL starts": "data:image/p\x00ng;base64,AAAA",
            "data:image/png;base64,": data_url(b"<svg/>", "svg+xml"),
            "not valid base64": "data:image/png;base64,@@@@",
            "cannot be read ": data_url(b"not an image at all"),
            "starts data:image/png": "data:image/png,rawbytes",
            "outside the server's image root": f"file://{tmp_path / 'secret.png'}",
            "no such image": f"file://{root / 'missing.png'}",
        }
        (tmp_path / "secret.png").write_bytes(_png(8, 8))
        for expected, url in refused.items():
            reply = ask(url)
            message = reply.json()["error"]["message"]
            assert reply.status_code in (400, 403), (expected, reply.text)
            assert expected.strip() in message, (expected, message)
            assert str(tmp_path) not in message and str(scratch) not in message, "no server path shown"
        assert ask(f"file://{root / 'ok.png'}").status_code == 200
        assert list(scratch.iterdir()) == [], "each request's data-URL images are deleted when it ends"
    served.close()
    assert not scratch.exists(), "the scratch folder is deleted at shutdown"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("signals", [1, 2])
def test_sigterm_mid_generation_exits_0_within_seconds(long_dir, tmp_path, signals):
    port = _free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    command = [sys.executable, "-m", "lmforge", "serve", "--model", str(long_dir), "--port", str(port)]
    server = subprocess.Popen(
        [*command, "--api-key", KEY], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        for _ in range(600):
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.1)
        answers: list = []

        def ask_long() -> None:
            try:
                answers.append(client.completions.create(model=long_dir.name, prompt="the", max_tokens=4000))
            except openai.APIError as error:
                answers.append(error)

        asking = threading.Thread(target=ask_long)
        asking.start()
        stream = client.completions.create(
            model=long_dir.name, prompt="the cat", max_tokens=4000, stream=True
        )
        next(iter(stream))  # generation is under way
        for _ in range(signals):
            server.send_signal(signal.SIGTERM)
            time.sleep(0.1)
        started = time.monotonic()
        code = server.wait(timeout=20)
        took = time.monotonic() - started
        asking.join(timeout=10)
    finally:
        server.kill()
    output = server.stdout.read()
    assert code == 0, output
    assert took < 10, f"exit took {took:.1f} s"
    assert not list(tmp_path.glob("lmforge-serve-*")), "no scratch folder left behind"
    assert "Traceback" not in output, output


def _lasting_threads() -> set[str]:
    """Threads that would be a leak: AnyIO's request pool (bounded, reused, idle ones retire) and
    tqdm's monitor are the only ones allowed to outlive a request."""
    return {
        t.name
        for t in threading.enumerate()
        if not t.name.startswith("AnyIO worker thread") and type(t).__name__ != "TMonitor"
    }


def test_soak_normal_requests_are_answered_while_others_misbehave(base_dir):
    """~20 s of normal requests beside huge, abandoned, malformed and oversized ones: every normal
    request is answered in bounded time, memory returns near its start, no thread is left over."""
    import psutil

    served = load_served(str(base_dir), {}, name="tiny")
    process = psutil.Process()
    with serving(create_app(served, KEY, 8, limits=Limits(body_bytes=50_000))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4)  # warm
        threads, rss = _lasting_threads(), process.memory_info().rss
        stop = time.monotonic() + 20
        latencies: list[float] = []
        failures: list[str] = []

        def normal() -> None:
            while time.monotonic() < stop:
                started = time.monotonic()
                try:
                    reply = client.chat.completions.create(
                        model="tiny", messages=ASK, max_tokens=6, temperature=0
                    )
                    assert reply.choices[0].message.content is not None
                except Exception as error:  # noqa: BLE001 - recorded and asserted below
                    failures.append(repr(error))
                latencies.append(time.monotonic() - started)

        def hostile(kind: int) -> None:
            k = 0
            while time.monotonic() < stop:
                k += 1
                if kind == 0:  # a huge answer, then gone
                    _hang_up_after(
                        url,
                        "/v1/chat/completions",
                        {"model": "tiny", "messages": ASK, "max_tokens": 10**9},
                        0.3,
                    )
                elif kind == 1:  # a stream read once, then gone
                    stream = client.chat.completions.create(
                        model="tiny", messages=ASK, max_tokens=10**9, stream=True
                    )
                    next(iter(stream))
                    stream.close()
                else:  # malformed and oversized bodies
                    connection = _raw(url)
                    body = [
                        b"{",
                        b'{"model": "tiny", "pad": "' + b"x" * 60_000 + b'"}',
                        json.dumps({"model": "tiny", "temperature": 1e-40, "messages": ASK}).encode(),
                    ][k % 3]
                    _send(connection, "/v1/chat/completions", body, AUTH)
                    connection.close()

        workers = [threading.Thread(target=normal) for _ in range(3)]
        workers += [threading.Thread(target=hostile, args=(kind,)) for kind in range(3)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        time.sleep(1.0)
        assert not failures, failures[:3]
        assert len(latencies) >= 10 and max(latencies) < 15, (len(latencies), max(latencies))
        assert process.memory_info().rss - rss < 200 * 2**20
        assert _lasting_threads() <= threads, _lasting_threads() - threads
        pool = [t for t in threading.enumerate() if t.name.startswith("AnyIO worker thread")]
        assert len(pool) <= 40, "the request thread pool stays within AnyIO's limit"
