"""`lmforge serve`: an OpenAI-compatible HTTP API over the generation engine.

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions` (streamed as server-sent
events or not), `POST /v1/completions`. A request's `model` picks what answers: the base model's
name, or one of the LoRA adapters loaded over it (`--adapter name=path`, several at once, one copy
of the base in memory). Every `/v1` request needs `Authorization: Bearer <key>`; a missing or wrong
key gets 401. A malformed request gets a 4xx with OpenAI's error body, never a traceback.

Requests queue for the one model. Chat requests that arrive together (within 10 ms, for the same
model and sampling settings, streamed or not) are answered in one batched generate, up to 8 at a
time; each streamed request's row streams on its own. Completions run one at a time. A streaming
client that disconnects stops its row at the next token. Binds 127.0.0.1 unless
told otherwise; no CORS headers are sent (browsers on other origins cannot call it).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import queue
import secrets
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from lmforge.data.templates import IMAGE_PLACEHOLDER, Conversation
from lmforge.inference.engine import Engine, SamplingParams, cut_at_stop, stop_safe_length
from lmforge.inference.reasoning import MODES, ReasoningStream, prompt_opens_reasoning, split_reasoning


class APIError(Exception):
    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: dict[str, str] | None = None


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="an extension (as vLLM's): keep the k likeliest tokens, 0 = all")
    repetition_penalty: float = Field(
        1.0, gt=0, description="an extension (as vLLM's): >1 discourages repeats"
    )
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None

    def params(self, default_max: int) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_new_tokens=self.max_completion_tokens or self.max_tokens or default_max,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=stop,
        )


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(SamplingFields):
    prompt: str | list[str]


class Served:
    """The engine and the names it answers to: the base, and each adapter loaded over it."""

    def __init__(self, engine: Engine, base_name: str, adapters: list[str], image_root: Path | None) -> None:
        self.engine, self.base_name, self.adapters = engine, base_name, adapters
        self.image_root = image_root.resolve() if image_root else None
        self.lock = threading.Lock()  # one generation at a time: requests queue here
        self._scratch: Path | None = None

    @property
    def scratch(self) -> Path:
        """One folder for the images requests send as data URLs, made on first use."""
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="lmforge-serve-"))
        return self._scratch

    @property
    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def check(self, name: str) -> None:
        if name not in self.names:
            available = ", ".join(self.names)
            raise APIError(404, f"model {name!r} is not served; available: {available}", param="model")

    @contextmanager
    def selected(self, name: str) -> Iterator[None]:
        """The model answering as `name` (call with the lock held)."""
        self.check(name)
        model = self.engine.model
        if name == self.base_name:
            with model.disable_adapter() if self.adapters else nullcontext():
                yield
        else:
            model.set_adapter(name)
            yield


@dataclass
class _Job:
    model: str
    conversation: Conversation
    images: list[Path]
    params: SamplingParams
    future: Future = field(default_factory=Future)
    sink: queue.Queue | None = None  # a streamed request's text pieces (then None)
    cancel: threading.Event = field(default_factory=threading.Event)


class Batcher:
    """Answers concurrent chat requests together: requests that arrive within `wait` seconds of each
    other, for the same model and sampling settings (and both streamed or both not), go into one
    batched generate (left-padded; greedy answers equal one-by-one answers, tested). A streamed
    request's row streams into its own queue; a disconnected client's row stops at its next token."""

    def __init__(self, served: Served, max_batch: int = 8, wait: float = 0.01) -> None:
        self.served, self.max_batch, self.wait = served, max_batch, wait
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.batches = 0  # how many generate calls answered requests (for tests and logs)
        threading.Thread(target=self._loop, daemon=True, name="lmforge-batcher").start()

    def submit(
        self, model: str, conversation: Conversation, images: list[Path], params: SamplingParams
    ) -> Future:
        job = _Job(model, conversation, images, params)
        self.jobs.put(job)
        return job.future

    def submit_stream(
        self, model: str, conversation: Conversation, images: list[Path], params: SamplingParams
    ) -> _Job:
        job = _Job(model, conversation, images, params, sink=queue.Queue())
        self.jobs.put(job)
        return job

    def _loop(self) -> None:
        while True:
            batch = [self.jobs.get()]
            deadline = time.monotonic() + self.wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            groups: dict[tuple[str, SamplingParams, bool], list[_Job]] = {}
            for job in batch:
                groups.setdefault((job.model, job.params, job.sink is not None), []).append(job)
            for (model, params, streamed), jobs in groups.items():
                (self._stream if streamed else self._answer)(model, params, jobs)

    def _stream(self, model: str, params: SamplingParams, jobs: list[_Job]) -> None:
        images = [job.images for job in jobs] if any(job.images for job in jobs) else None
        try:
            with self.served.lock, self.served.selected(model):
                self.served.engine.stream_rows(
                    [job.conversation for job in jobs],
                    params,
                    [job.sink for job in jobs],
                    [job.cancel for job in jobs],
                    images,
                )
            self.batches += 1
        except Exception as error:
            for job in jobs:
                job.sink.put(error)

    def _answer(self, model: str, params: SamplingParams, jobs: list[_Job]) -> None:
        images = [job.images for job in jobs] if any(job.images for job in jobs) else None
        try:
            with self.served.lock, self.served.selected(model):
                results = self.served.engine.generate_detailed(
                    [job.conversation for job in jobs], params, len(jobs), images
                )
            self.batches += 1
        except Exception as error:  # handed to each request, which turns it into a 4xx/5xx
            for job in jobs:
                job.future.set_exception(error)
            return
        for job, result in zip(jobs, results, strict=True):
            job.future.set_result(result)


def conversation_of(messages: list[Message], served: Served) -> tuple[Conversation, list[Path]]:
    """OpenAI messages -> (Conversation, image files in placeholder order)."""
    system = None
    turns: list[tuple[str, str]] = []
    images: list[Path] = []
    pending: str | None = None
    for i, message in enumerate(messages):
        text = _text_and_images(message.content, served, images, f"messages[{i}]")
        if message.role == "system":
            if turns or pending is not None:
                raise APIError(400, "a system message must come first", param=f"messages[{i}]")
            system = (system + "\n" if system else "") + text
        elif message.role == "user":
            if pending is not None:
                raise APIError(400, "two user messages in a row; merge them", param=f"messages[{i}]")
            pending = text
        else:
            if pending is None:
                raise APIError(400, "an assistant message must follow a user message", param=f"messages[{i}]")
            turns.append((pending, text))
            pending = None
    if pending is None:
        raise APIError(400, "the last message must be the user's", param="messages")
    return Conversation(turns=[*turns, (pending, "")], system=system), images


def _text_and_images(content, served: Served, images: list[Path], where: str) -> str:
    if isinstance(content, str):
        return content
    text = ""
    for part in content:
        if part.type == "text":
            text += part.text or ""
            continue
        if served.engine.vision is None:
            raise APIError(400, f"{where}: image parts need a vision-language model", param=where)
        url = (part.image_url or {}).get("url", "")
        images.append(_image_file(url, served, where))
        text += IMAGE_PLACEHOLDER
    return text


def _image_file(url: str, served: Served, where: str) -> Path:
    if url.startswith("data:image/"):
        header, _, payload = url.partition(",")
        suffix = "." + header.split("/")[1].split(";")[0]
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error:
            raise APIError(400, f"{where}: the image data URL is not valid base64", param=where) from None
        path = served.scratch / f"{uuid.uuid4().hex}{suffix}"
        path.write_bytes(data)
        return path
    if url.startswith("file://"):
        if served.image_root is None:
            raise APIError(
                400, f"{where}: file images are off; start the server with --image-root", param=where
            )
        path = Path(url.removeprefix("file://")).resolve()
        if not path.is_relative_to(served.image_root):
            raise APIError(403, f"{where}: {path} is outside the server's image root", param=where)
        return path
    raise APIError(400, f"{where}: send images as data:image/... URLs or file:// paths", param=where)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def create_app(
    served: Served, api_key: str, default_max_tokens: int = 256, reasoning: str = "separate"
) -> FastAPI:
    """The API. `reasoning` (for reasoning models): separate (the <think> trace in the message's
    `reasoning_content`, the answer in `content`), hide (answer only) or show (the raw text)."""
    if reasoning not in MODES:
        raise ValueError(f"reasoning {reasoning!r}: use one of {', '.join(MODES)}")
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)
    batcher = Batcher(served)
    app.state.batcher = batcher

    def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
        return JSONResponse(body, status_code=status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error(400, f"{where}: {first.get('msg', 'invalid request')}", param=where or None)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return error(500, f"the server failed to answer ({type(exc).__name__}); see its log", "server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error(
                    401, "missing or wrong API key (Authorization: Bearer <key>)", "authentication_error"
                )
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": served.names}

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        return {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": now, "owned_by": "lmforge"} for n in served.names
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat(request: ChatRequest):
        conversation, images = conversation_of(request.messages, served)
        params = request.params(default_max_tokens)
        created, ident = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        served.check(request.model)
        if request.stream:
            job = batcher.submit_stream(request.model, conversation, images, params)
            return StreamingResponse(
                _stream_chat(served, request, conversation, job, params, created, ident, reasoning),
                media_type="text/event-stream",
            )

        try:
            result = await asyncio.wrap_future(batcher.submit(request.model, conversation, images, params))
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        if reasoning != "show":
            opened = prompt_opens_reasoning(served.engine.prompt_text(conversation))
            trace, message["content"] = split_reasoning(result.text, opened)
            if trace is not None and reasoning == "separate":
                message["reasoning_content"] = trace
        return {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": request.model,
            "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason}],
            "usage": _usage(result.prompt_tokens, result.completion_tokens),
        }

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        if request.stream:
            raise APIError(400, "streaming is available on /v1/chat/completions", param="stream")
        params = request.params(default_max_tokens if request.max_tokens is None else request.max_tokens)

        def work():
            with served.lock, served.selected(request.model):
                return served.engine.complete(prompts, params)

        results = await run_in_threadpool(work)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [
                {"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                for i, r in enumerate(results)
            ],
            "usage": _usage(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)),
        }

    return app


async def _stream_chat(
    served: Served,
    request: ChatRequest,
    conversation,
    job: _Job,
    params,
    created,
    ident,
    reasoning: str = "separate",
):
    """Server-sent events: a role chunk, content chunks, a final chunk, [DONE]. A disconnect closes
    this generator, which stops this request's row of the batched generation."""
    base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": request.model}

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    cancel = job.cancel

    async def pieces():
        while True:
            piece = await run_in_threadpool(job.sink.get)
            if piece is None:
                return
            if isinstance(piece, Exception):
                raise piece
            yield piece

    router = ReasoningStream(opened=prompt_opens_reasoning(served.engine.prompt_text(conversation)))

    def deltas(piece: str, last: bool = False) -> Iterator[str]:
        if reasoning == "show":
            if piece:
                yield chunk({"content": piece})
            return
        trace, answer = router.feed(piece)
        if last:
            held_trace, held_answer = router.flush()
            trace, answer = trace + held_trace, answer + held_answer
        if trace and reasoning == "separate":
            yield chunk({"reasoning_content": trace})
        if answer:
            yield chunk({"content": answer})

    yield chunk({"role": "assistant", "content": ""})
    text, sent = "", 0  # a tail that may begin a stop string is held back until resolved
    try:
        async for piece in pieces():
            text += piece
            text, stopped = cut_at_stop(text, params.stop)
            safe = len(text) if stopped else stop_safe_length(text, params.stop)
            for event in deltas(text[sent:safe]):
                yield event
            sent = safe
            if stopped:
                cancel.set()
                break
        for event in deltas(text[sent:], last=True):
            yield event
    finally:
        cancel.set()
    tokenizer = served.engine.tokenizer
    tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    finish = "length" if tokens >= params.max_new_tokens else "stop"
    yield chunk({}, finish)
    if request.stream_options and request.stream_options.include_usage:
        prompt = len(
            tokenizer(served.engine.prompt_text(conversation), add_special_tokens=False)["input_ids"]
        )
        body: dict[str, Any] = {**base, "choices": [], "usage": _usage(prompt, tokens)}
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


def load_served(
    model: str,
    adapters: dict[str, str],
    name: str | None = None,
    image_root: Path | None = None,
    template: str | None = None,
) -> Served:
    """The base model with every adapter loaded over it under its own name.

    The template resolves as in `chat` and `predict` (`Engine.load`, `pick_template`): `template`
    when given, else the first one saved with an adapter, then the model's own resolution."""
    from peft import PeftModel

    from lmforge.models.loading import saved_template_name

    paths = list(adapters.values())
    template = template or next((t for t in map(saved_template_name, paths) if t), None)
    engine = Engine.load(model, template=template)
    for index, (adapter_name, path) in enumerate(adapters.items()):
        if index == 0:
            engine.model = PeftModel.from_pretrained(engine.model, path, adapter_name=adapter_name).eval()
        else:
            engine.model.load_adapter(path, adapter_name=adapter_name, is_trainable=False)
    base_name = name or Path(model.rstrip("/")).name
    if base_name in adapters:
        raise ValueError(f"adapter name {base_name!r} is the base model's name; pick another")
    return Served(engine, base_name, list(adapters), image_root)
