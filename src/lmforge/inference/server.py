"""`lmforge serve`: an OpenAI-compatible HTTP API over the generation engine.

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions`
(each streamed as server-sent events or not; `n` answers; log-probabilities; completions also take
token-id prompts and `echo`, which with `max_tokens: 0` scores a prompt, as lm-evaluation-harness
asks). A request's `model` picks what answers: the base model's
name, or one of the LoRA adapters loaded over it (`--adapter name=path`, several at once, one copy
of the base in memory). Every `/v1` request needs `Authorization: Bearer <key>`; a missing or wrong
key gets 401. A malformed request gets a 4xx with OpenAI's error body, never a traceback.

Every request has limits, each a clear 4xx: its body (413), its prompts and answers, its answer
length (cut to what fits the model's context, `finish_reason: length`; a prompt that fills the
context is a 400), its sampling values, its images (pixels, data-URL form). A client that goes away
stops its generation, streamed or not; a failure mid-stream ends the stream with an error event
(and is logged); a connection stays usable after any error. SIGTERM cancels what is generating and
the server exits 0 within seconds; data-URL images are deleted when their request ends.

Requests queue for the one model. Chat requests that arrive together (within 10 ms, for the same
model and sampling settings, streamed or not) are answered in one batched generate, up to 8 at a
time; each streamed request's row streams on its own (a request with a `seed` is answered alone,
so its answer depends on the seed only). Completions run one at a time. A streaming
client that disconnects stops its row at the next token. Binds 127.0.0.1 unless
told otherwise; no CORS headers are sent (browsers on other origins cannot call it).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import logging
import queue
import re
import secrets
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator
from starlette.concurrency import run_in_threadpool

from lmforge.data.templates import IMAGE_PLACEHOLDER, Conversation, ToolCall, ToolFormat, tool_json
from lmforge.inference.engine import (
    Engine,
    Generation,
    SamplingParams,
    StreamEnd,
    TokenLogprob,
    cut_at_stop,
    decode_after,
    stop_safe_length,
    token_pieces,
)
from lmforge.inference.reasoning import MODES, ReasoningStream, prompt_opens_reasoning, split_reasoning

MAX_N = 8  # answers per prompt
MAX_TOOLS = 128  # functions offered per request (OpenAI's limit)
MAX_ANSWERS = 64  # answers per request (prompts x n)
MAX_TOP_LOGPROBS = 20  # chat: the likeliest tokens per position (OpenAI's limit)
MAX_COMPLETION_LOGPROBS = 5  # completions: the same (OpenAI's limit)
MIN_TEMPERATURE = 1e-4  # below this (and above 0) sampling overflows: logits / t is inf
IMAGE_TYPES = {"png": ".png", "jpeg": ".jpg", "jpg": ".jpg", "webp": ".webp"}  # data:image/<type>

log = logging.getLogger("lmforge.serve")


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (`lmforge serve --max-...`)."""

    body_bytes: int = 20 * 2**20  # a request's body (data-URL images are in it): 413 above
    image_pixels: int = 4096 * 4096  # one image's width x height: 400 above
    max_tokens: int | None = None  # a ceiling on max_tokens (None: the model's context only)


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


class ToolFunction(BaseModel):
    name: str = Field(min_length=1, max_length=256)
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolFunction


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None


class FunctionSpec(BaseModel):
    model_config = {"extra": "allow"}  # strict, ... pass through to the template

    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolSpec(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    name: str = Field(min_length=1, max_length=256)


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="an extension (as vLLM's): keep the k likeliest tokens, 0 = all")
    repetition_penalty: float = Field(
        1.0, ge=0.01, le=10, description="an extension (as vLLM's): >1 discourages repeats"
    )
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_N, description="answers per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("temperature")
    @classmethod
    def _samplable(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"use 0 (greedy) or {MIN_TEMPERATURE} to 2; {value} overflows sampling")
        return value

    def params(self, default_max: int, logprobs: int | None = None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            n=self.n,
            logprobs=logprobs,
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
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolSpec] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True  # accepted; the model decides how many calls it writes

    def check(self) -> None:
        """The combinations a field's own bounds cannot say."""
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.stream and self.logprobs:
            raise APIError(400, "logprobs are not streamed; ask without stream", param="logprobs")
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not self.tools:
            raise APIError(400, "tool_choice needs tools to choose from", param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {
            t.function.name for t in self.tools or []
        }:
            raise APIError(
                400, f"tool_choice names {choice.function.name!r}, which is not in tools", param="tool_choice"
            )

    def calling(self) -> bool:
        """Whether the answer may call a tool: tools given and tool_choice is not none."""
        return bool(self.tools) and self.tool_choice != "none"

    def prefill(self, form: ToolFormat, tokenizer) -> str:
        """What the answer starts with: a call block for tool_choice required, the named
        function's call for a named choice (the model cannot answer otherwise), else nothing."""
        if self.tool_choice == "required":
            return form.call_prefix(tokenizer)
        if isinstance(self.tool_choice, NamedToolChoice):
            return form.call_prefix(tokenizer, self.tool_choice.function.name)
        return ""


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0, description="0 with echo: score the prompt only")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)

    def prompts(self) -> list[str] | list[list[int]]:
        """One prompt or many, as a list: texts or token-id lists."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]  # type: ignore[list-item]
        return self.prompt  # type: ignore[return-value]

    def check(self) -> None:
        """The limits and combinations a field's own bounds cannot say."""
        prompts = len(self.prompts())
        if not prompts:
            raise APIError(400, "prompt is empty", param="prompt")
        empty = next((i for i, p in enumerate(self.prompts()) if not p), None)
        if empty is not None:
            raise APIError(400, f"prompt {empty} is empty; send text or token ids", param="prompt")
        if prompts * self.n > MAX_ANSWERS:
            raise APIError(400, f"{prompts} prompts x n={self.n}: at most {MAX_ANSWERS} answers", param="n")
        if self.max_tokens == 0 and not self.echo:
            raise APIError(
                400, "max_tokens 0 answers nothing; with echo it scores the prompt", param="max_tokens"
            )
        if self.stream and self.logprobs is not None:
            raise APIError(400, "logprobs are not streamed; ask without stream", param="logprobs")


class Served:
    """The engine and the names it answers to: the base, and each adapter loaded over it."""

    def __init__(self, engine: Engine, base_name: str, adapters: list[str], image_root: Path | None) -> None:
        self.engine, self.base_name, self.adapters = engine, base_name, adapters
        self.image_root = image_root.resolve() if image_root else None
        self.lock = threading.Lock()  # one generation at a time: requests queue here
        self._scratch: Path | None = None
        self.stopping = threading.Event()  # shutting down: new requests get 503
        self._live: weakref.WeakSet[threading.Event] = weakref.WeakSet()  # every row's stop switch

    @property
    def scratch(self) -> Path:
        """One folder for the images requests send as data URLs, made on first use."""
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="lmforge-serve-"))
        return self._scratch

    def cancels(self, count: int) -> list[threading.Event]:
        """One stop switch per answer row; `stop` sets them all (already set once stopping)."""
        events = [threading.Event() for _ in range(count)]
        for event in events:
            self._live.add(event)
            if self.stopping.is_set():
                event.set()
        return events

    def stop(self) -> None:
        """Shutting down: every row generating or queued stops at its next token."""
        self.stopping.set()
        for event in list(self._live):
            event.set()

    def forget(self, images: list[Path]) -> None:
        """Delete a finished request's data-URL images (file:// images are the user's own)."""
        for path in images:
            if self._scratch is not None and path.parent == self._scratch:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop, and delete the scratch folder."""
        self.stop()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

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
    cancels: list[threading.Event]  # one per choice: a set one stops its row at the next token
    future: Future = field(default_factory=Future)
    sink: queue.Queue | None = None  # streamed: (choice, text piece or StreamEnd) pairs

    def cancel(self) -> None:
        for event in self.cancels:
            event.set()

    @property
    def abandoned(self) -> bool:
        return all(event.is_set() for event in self.cancels)


class _ChoiceSink:
    """One choice's end of its request's queue: what its row streams arrives tagged with its index."""

    def __init__(self, sink: queue.Queue, index: int) -> None:
        self.sink, self.index = sink, index

    def put(self, piece: str | StreamEnd) -> None:
        self.sink.put((self.index, piece))


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
    ) -> _Job:
        job = _Job(model, conversation, images, params, self.served.cancels(params.n))
        self.jobs.put(job)
        return job

    def submit_stream(
        self, model: str, conversation: Conversation, images: list[Path], params: SamplingParams
    ) -> _Job:
        job = _Job(model, conversation, images, params, self.served.cancels(params.n), sink=queue.Queue())
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
            for job in [job for job in batch if job.abandoned]:  # its client left while it queued
                batch.remove(job)
                gone = APIError(499, "the client closed the request")
                job.future.set_exception(gone) if job.sink is None else job.sink.put(gone)
            groups: dict[tuple, list[_Job]] = {}
            for job in batch:  # a seeded request alone: its sampled rows depend on its seed only
                alone = id(job) if job.params.seed is not None else None
                groups.setdefault((job.model, job.params, job.sink is not None, alone), []).append(job)
            for (model, params, streamed, _), jobs in groups.items():
                (self._stream if streamed else self._answer)(model, params, jobs)

    def _stream(self, model: str, params: SamplingParams, jobs: list[_Job]) -> None:
        n = params.n
        images = [job.images for job in jobs for _ in range(n)] if any(job.images for job in jobs) else None
        try:
            with self.served.lock, self.served.selected(model):
                self.served.engine.stream_rows(
                    [job.conversation for job in jobs for _ in range(n)],
                    params,
                    [_ChoiceSink(job.sink, index) for job in jobs for index in range(n)],
                    [event for job in jobs for event in job.cancels],
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
                    [job.conversation for job in jobs],
                    params,
                    len(jobs),
                    images,
                    [event for job in jobs for event in job.cancels],
                )
            self.batches += 1
        except Exception as error:  # handed to each request, which turns it into a 4xx/5xx
            for job in jobs:
                job.future.set_exception(error)
            return
        for k, job in enumerate(jobs):  # each request's n answers
            job.future.set_result(results[k * params.n : (k + 1) * params.n])


def conversation_of(
    messages: list[Message], served: Served, limits: Limits = Limits()
) -> tuple[Conversation, list[Path]]:
    """OpenAI messages -> (Conversation, image files in placeholder order). The request's data-URL
    images are written to the scratch folder; a refused request's are deleted at once."""
    images: list[Path] = []
    try:
        return _conversation(messages, served, limits, images), images
    except BaseException:
        served.forget(images)
        raise


def _conversation(
    messages: list[Message], served: Served, limits: Limits, images: list[Path]
) -> Conversation:
    """The chat as lmforge's turns: a user message (or the tool results answering the previous
    turn's calls), then the assistant's answer and its calls (docs/tools.md)."""
    system = None
    turns: list[tuple[str, str]] = []
    calls: dict[int, tuple[ToolCall, ...]] = {}
    results: dict[int, tuple[str, ...]] = {}
    pending: str | None = None
    answered: list[str] = []  # tool results waiting for the next assistant message
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if message.content is None and not (message.role == "assistant" and message.tool_calls):
            raise APIError(400, f"{where} has no content", param=where)
        text = _text_and_images(message.content or "", served, limits, images, where)
        if message.role == "system":
            if turns or pending is not None:
                raise APIError(400, "a system message must come first", param=where)
            system = (system + "\n" if system else "") + text
        elif message.role == "user":
            if pending is not None or answered:
                raise APIError(400, "two user messages in a row; merge them", param=where)
            pending = text
        elif message.role == "tool":
            asked = calls.get(len(turns) - 1, ())
            if pending is not None or len(answered) >= len(asked):
                raise APIError(
                    400,
                    "a tool message must answer a tool call of the assistant message before it",
                    param=where,
                )
            answered.append(text)
        else:
            if pending is None and not answered:
                raise APIError(400, "an assistant message must follow a user or tool message", param=where)
            if answered:
                results[len(turns)] = tuple(answered)
            if message.tool_calls:
                calls[len(turns)] = tuple(
                    _call_of(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(message.tool_calls)
                )
            turns.append((pending or "", text))
            pending, answered = None, []
    if pending is None and not answered:
        raise APIError(400, "the last message must be the user's (or tool results)", param="messages")
    if answered:
        results[len(turns)] = tuple(answered)
    return Conversation(turns=[*turns, (pending or "", "")], system=system, calls=calls, results=results)


def _call_of(call: ToolCallIn, where: str) -> ToolCall:
    arguments = call.function.arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError:
            raise APIError(400, f"{where}.function.arguments is not valid JSON", param=where) from None
    if not isinstance(arguments, dict):
        raise APIError(400, f"{where}.function.arguments must be a JSON object", param=where)
    return ToolCall(name=call.function.name, arguments=arguments, id=call.id)


def with_tools(
    conversation: Conversation, request: ChatRequest, served: Served
) -> tuple[Conversation, ToolFormat | None]:
    """The conversation with the request's tools (and a forced call's start), and the format its
    calls are read back in; (conversation, None) when the answer may not call."""
    uses = request.calling() or conversation.calls or conversation.results
    if not uses:
        return conversation, None
    form = served.engine.template.tool_format(served.engine.tokenizer)
    if form is None:
        raise APIError(
            400,
            f"the served chat template ({served.engine.template.name}) has no tool format; serve with "
            "--template qwen2.5, chatml, llama3.1 or mistral-v0.3 (docs/tools.md)",
            param="tools",
        )
    if not request.calling():
        return conversation, None
    tools = tuple(t.model_dump(exclude_none=True) for t in request.tools or [])
    prefill = request.prefill(form, served.engine.tokenizer)
    return dataclasses.replace(conversation, tools=tools, prefill=prefill), form


def tool_message(text: str, form: ToolFormat | None) -> tuple[dict[str, Any], bool]:
    """(the assistant message's content and tool_calls, whether it calls) of an answer; an
    answer whose call blocks cannot be read stays plain content."""
    if form is None:
        return {"content": text}, False
    content, calls = form.parse(text)
    if not calls:
        return {"content": text}, False
    listed = [
        {
            "id": call.id or f"call_{uuid.uuid4().hex[:24]}",  # Mistral's calls carry their own
            "type": "function",
            "function": {"name": call.name, "arguments": tool_json(call.arguments)},
        }
        for call in calls
    ]
    return {"content": content or None, "tool_calls": listed}, True


def _text_and_images(content, served: Served, limits: Limits, images: list[Path], where: str) -> str:
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
        _check_image(images[-1], limits, where)
        text += IMAGE_PLACEHOLDER
    return text


_DATA_URL = re.compile(r"data:image/([a-z]+);base64,", re.ASCII)


def _image_file(url: str, served: Served, where: str) -> Path:
    """The file of an image part: a data URL written to the scratch folder, or a file:// path
    inside the image root. Error messages never name a server path."""
    if url.startswith("data:"):
        header = _DATA_URL.match(url)
        if header is None or header.group(1) not in IMAGE_TYPES:
            kinds = ", ".join(f"data:image/{kind};base64," for kind in ("png", "jpeg", "webp"))
            raise APIError(400, f"{where}: an image data URL starts {kinds}", param=where)
        try:
            data = base64.b64decode(url[header.end() :], validate=True)
        except binascii.Error:
            raise APIError(400, f"{where}: the image data URL is not valid base64", param=where) from None
        path = served.scratch / f"{uuid.uuid4().hex}{IMAGE_TYPES[header.group(1)]}"
        path.write_bytes(data)
        return path
    if url.startswith("file://"):
        if served.image_root is None:
            raise APIError(
                400, f"{where}: file images are off; start the server with --image-root", param=where
            )
        try:
            path = Path(url.removeprefix("file://")).resolve()
        except (OSError, ValueError):
            raise APIError(400, f"{where}: not a usable file path", param=where) from None
        if not path.is_relative_to(served.image_root):
            raise APIError(403, f"{where}: that file is outside the server's image root", param=where)
        if not path.is_file():
            raise APIError(400, f"{where}: no such image under the server's image root", param=where)
        return path
    raise APIError(400, f"{where}: send images as data:image/... URLs or file:// paths", param=where)


def _check_image(path: Path, limits: Limits, where: str) -> None:
    """A readable image of at most `limits.image_pixels` pixels (read from its header: a huge
    image is refused before it is decoded)."""
    from PIL import Image, UnidentifiedImageError

    if path.suffix.lower() not in set(IMAGE_TYPES.values()):
        raise APIError(400, f"{where}: images are png, jpeg or webp", param=where)
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError):
        raise APIError(400, f"{where}: the image cannot be read (png, jpeg or webp)", param=where) from None
    if width * height > limits.image_pixels:
        raise APIError(
            400,
            f"{where}: the image is {width}x{height} pixels; this server takes at most "
            f"{limits.image_pixels:,} (lmforge serve --max-image-pixels)",
            param=where,
        )


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Gate:
    """The first thing every request passes: the key (401 on /v1), the body read whole up to
    `limits.body_bytes` (413), 503 while shutting down, and a failure no handler caught turned into
    a logged 500 with OpenAI's error body, the connection kept open (a raised error would drop it)."""

    def __init__(self, app, api_key: str, served: Served, limits: Limits) -> None:
        self.app, self.key, self.served, self.limits = app, f"Bearer {api_key}".encode(), served, limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if scope["path"].startswith("/v1"):
            if not secrets.compare_digest(headers.get(b"authorization", b""), self.key):
                message = "missing or wrong API key (Authorization: Bearer <key>)"
                await _send_error(send, 401, message, "authentication_error")
                return
            if self.served.stopping.is_set():
                await _send_error(send, 503, "the server is shutting down", "server_error")
                return
        limit = self.limits.body_bytes
        declared = headers.get(b"content-length", b"0")
        too_big = f"the request body is over {limit:,} bytes (lmforge serve --max-body-mb)"
        if not declared.isdigit() or int(declared) > limit:
            await _send_error(send, 413, too_big)
            return
        body, more = bytearray(), True
        while more:  # chunked bodies are counted as they arrive
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                await _send_error(send, 413, too_big)
                return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        started = False

        async def tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, tracked)
        except asyncio.CancelledError:
            if not self.served.stopping.is_set():
                raise
            # Shutting down: uvicorn cancels what is still open once its grace (or a second
            # signal) ends. The generation was already stopped, and the connection closes with
            # the server: nothing to answer, and no traceback to log.
            return
        except Exception as error:
            log.error("%s %s failed: %s", scope["method"], scope["path"], error, exc_info=error)
            if not started:
                message = f"the server failed to answer ({type(error).__name__}); see its log"
                await _send_error(tracked, 500, message, "server_error")


async def _send_error(send, status: int, message: str, kind: str = "invalid_request_error") -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _error_event(error: BaseException) -> str:
    """A streamed request's failure as its last event (the openai client raises it)."""
    if isinstance(error, APIError):
        message, kind = error.message, error.kind
    elif isinstance(error, ValueError):
        message, kind = str(error), "invalid_request_error"
    else:
        message, kind = f"generation failed ({type(error).__name__}); see the server's log", "server_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return f"data: {json.dumps(body)}\n\n"


async def _answered(work: asyncio.Future, request: Request, cancel) -> Any:
    """The result of a non-streamed request's generation; if its client disconnects first, its rows
    are cancelled (they stop at their next token) and the request ends."""
    while True:
        done, _ = await asyncio.wait({work}, timeout=0.2)
        if done:
            return work.result()
        if await request.is_disconnected():
            cancel()
            work.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody waits for it
            raise APIError(499, "the client closed the request")


def create_app(
    served: Served,
    api_key: str,
    default_max_tokens: int = 256,
    reasoning: str = "separate",
    limits: Limits | None = None,
) -> FastAPI:
    """The API. `reasoning` (for reasoning models): separate (the <think> trace in the message's
    `reasoning_content`, the answer in `content`), hide (answer only) or show (the raw text)."""
    if reasoning not in MODES:
        raise ValueError(f"reasoning {reasoning!r}: use one of {', '.join(MODES)}")
    limits = limits or Limits()
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Gate, api_key=api_key, served=served, limits=limits)
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

    def fitted(params: SamplingParams, prompt_tokens: int, where: str) -> SamplingParams:
        """`params` with max_new_tokens cut to what fits after the prompt (and the ceiling)."""
        try:
            room = served.engine.room(prompt_tokens, params.max_new_tokens)
        except ValueError as exc:
            raise APIError(400, str(exc), param=where) from None
        if limits.max_tokens is not None:
            room = min(room, limits.max_tokens)
        return dataclasses.replace(params, max_new_tokens=room)

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
    async def chat(request: ChatRequest, raw: Request):
        request.check()
        served.check(request.model)
        conversation, images = conversation_of(request.messages, served, limits)
        try:
            conversation, form = with_tools(conversation, request, served)
            params = request.params(
                default_max_tokens, (request.top_logprobs or 0) if request.logprobs else None
            )
            try:
                prompt = served.engine.prompt_text(conversation)
            except ValueError as exc:  # the template cannot write these messages (docs/tools.md)
                raise APIError(400, str(exc), param="messages") from None
            prompt_tokens = len(served.engine.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            params = fitted(params, prompt_tokens, "messages")
        except BaseException:
            served.forget(images)
            raise
        created, ident = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        if request.stream:
            job = batcher.submit_stream(request.model, conversation, images, params)
            return StreamingResponse(
                _stream_chat(served, request, conversation, job, params, created, ident, reasoning, form),
                media_type="text/event-stream",
            )

        job = batcher.submit(request.model, conversation, images, params)
        try:
            results = await _answered(asyncio.wrap_future(job.future), raw, job.cancel)
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        finally:
            served.forget(images)
        opened = prompt_opens_reasoning(prompt)
        choices = []
        for index, result in enumerate(results):
            text = conversation.prefill + result.text  # a forced call's start is the answer's too
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if reasoning != "show":
                trace, message["content"] = split_reasoning(text, opened)
                if trace is not None and reasoning == "separate":
                    message["reasoning_content"] = trace
            said, calls = tool_message(message["content"], form)
            message.update(said)
            logprobs = _chat_logprobs(served.engine, result) if request.logprobs else None
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "finish_reason": "tool_calls" if calls else result.finish_reason,
                    "logprobs": logprobs,
                }
            )
        return {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": request.model,
            "choices": choices,
            "usage": _usage(results[0].prompt_tokens, sum(r.completion_tokens for r in results)),
        }

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw: Request):
        served.check(request.model)
        request.check()
        try:
            rows = served.engine.prompt_ids(request.prompts())
        except ValueError as exc:
            raise APIError(400, str(exc), param="prompt") from None
        params = request.params(default_max_tokens, request.logprobs)
        if request.max_tokens != 0:
            params = fitted(params, max(len(r) for r in rows), "prompt")
        elif max(len(r) for r in rows) > (served.engine.context or 10**9):
            raise APIError(400, f"a prompt is longer than the model's context ({served.engine.context})")
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        cancels = served.cancels(len(rows) * params.n)
        if request.stream:
            sink: queue.Queue = queue.Queue()
            _start_completion_stream(served, request.model, rows, params, sink, cancels)
            events = _stream_completion(served, request, rows, sink, cancels, params, created, ident)
            return StreamingResponse(events, media_type="text/event-stream")

        def work() -> tuple[list[Generation], list[list[TokenLogprob]] | None]:
            with served.lock, served.selected(request.model):
                if request.max_tokens == 0:  # a prompt scored, nothing generated
                    answers = [
                        Generation("", len(r), 0, "length", (), ()) for r in rows for _ in range(request.n)
                    ]
                else:
                    answers = served.engine.complete(rows, params, cancels)
                scored = request.echo and request.logprobs is not None
                return answers, served.engine.score(rows, request.logprobs or 0) if scored else None

        def cancel() -> None:
            for event in cancels:
                event.set()

        try:
            answers, prompt_scores = await _answered(
                asyncio.ensure_future(run_in_threadpool(work)), raw, cancel
            )
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        choices = [
            _completion_choice(
                served.engine,
                request,
                index,
                rows[index // request.n],
                answer,
                prompt_scores[index // request.n] if prompt_scores else None,
            )
            for index, answer in enumerate(answers)
        ]
        return {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": request.model,
            "choices": choices,
            "usage": _usage(sum(len(r) for r in rows), sum(a.completion_tokens for a in answers)),
        }

    return app


def _completion_choice(
    engine: Engine,
    request: CompletionRequest,
    index: int,
    row: list[int],
    answer: Generation,
    echoed: list[TokenLogprob] | None,
) -> dict:
    """One completions choice: the answer (after the prompt, with echo), its logprobs if asked."""
    prompt = engine.tokenizer.decode(row, skip_special_tokens=True) if request.echo else ""
    choice: dict[str, Any] = {"index": index, "text": prompt + answer.text, "logprobs": None}
    if request.logprobs is not None:
        choice["logprobs"] = _completion_logprobs(engine, row, answer, echoed, choice["text"])
    return {**choice, "finish_reason": answer.finish_reason}


def _completion_logprobs(
    engine: Engine, row: list[int], answer: Generation, echoed: list[TokenLogprob] | None, text: str
) -> dict:
    """OpenAI's completions `logprobs`: per token (the prompt's first when echoed) its text, its
    log-probability, the likeliest tokens at its position and where it starts in the choice's text."""
    tokenizer = engine.tokenizer
    sequence = row + list(answer.token_ids)
    pieces = token_pieces(tokenizer, sequence)
    entries = [*(echoed or []), *(answer.logprobs or ())]
    first = 0 if echoed is not None else len(row)
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for position, entry in zip(range(first, len(sequence)), entries, strict=True):
        piece = pieces[position]
        out["tokens"].append(piece)
        out["token_logprobs"].append(entry.logprob)
        out["text_offset"].append(min(offset, len(text)))
        offset += len(piece)
        if entry.logprob is None:
            out["top_logprobs"].append(None)
            continue
        top: dict[str, float] = {}
        for token, value in entry.top:  # likeliest first: two tokens of one text keep the likelier
            top.setdefault(decode_after(tokenizer, sequence[:position], [token]), value)
        top.setdefault(piece, entry.logprob)
        out["top_logprobs"].append(top)
    return out


def _chat_logprobs(engine: Engine, answer: Generation) -> dict:
    """OpenAI's chat `logprobs`: each answer token (the token that ended it left out) with its text,
    bytes, log-probability and the likeliest tokens at its position."""
    ids, entries = list(answer.token_ids), list(answer.logprobs or ())
    if ids and ids[-1] in engine.stop_ids:
        ids, entries = ids[:-1], entries[:-1]
    tokenizer = engine.tokenizer

    def item(text: str, value: float) -> dict:
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    content = []
    for position, (piece, entry) in enumerate(zip(token_pieces(tokenizer, ids), entries, strict=True)):
        top = [item(decode_after(tokenizer, ids[:position], [token]), value) for token, value in entry.top]
        content.append({**item(piece, entry.logprob), "top_logprobs": top})
    return {"content": content, "refusal": None}


def _start_completion_stream(
    served: Served,
    model: str,
    rows: list[list[int]],
    params: SamplingParams,
    sink: queue.Queue,
    cancels: list[threading.Event],
) -> None:
    """Generate a streamed completion in a thread of its own (completions run one at a time)."""
    answers = [row for row in rows for _ in range(params.n)]

    def work() -> None:
        try:
            with served.lock, served.selected(model):
                sinks = [_ChoiceSink(sink, index) for index in range(len(answers))]
                served.engine.stream_prompts(answers, params, sinks, cancels)
        except Exception as error:
            sink.put(error)

    threading.Thread(target=work, daemon=True, name="lmforge-completion").start()


async def _choice_texts(
    sink: queue.Queue, cancels: list[threading.Event], params: SamplingParams
) -> AsyncIterator[tuple[int, str, tuple[int, str] | None]]:
    """(choice, new text, (tokens, finish reason) once the choice has ended, else None) as a
    streamed request's rows generate. Each choice is cut at its first stop string, and a tail that
    may begin one is held back until resolved, so a choice's pieces join to its plain answer, and
    its token count and finish reason are the plain answer's."""
    texts, sent = [""] * len(cancels), [0] * len(cancels)
    cut = [False] * len(cancels)  # met a stop string: nothing more is sent
    running = set(range(len(cancels)))
    while running:
        item = await run_in_threadpool(sink.get)
        if isinstance(item, Exception):
            raise item
        index, piece = item
        if isinstance(piece, StreamEnd):  # the row ended: what was held back is the answer's end
            running.discard(index)
            limit = piece.limit if piece.limit is not None else params.max_new_tokens
            stopped = cut[index] or piece.stop_token or piece.tokens < limit
            yield index, texts[index][sent[index] :], (piece.tokens, "stop" if stopped else "length")
            sent[index] = len(texts[index])
            continue
        if cut[index]:
            continue
        text, cut[index] = cut_at_stop(texts[index] + piece, params.stop)
        safe = len(text) if cut[index] else stop_safe_length(text, params.stop)
        texts[index], new, sent[index] = text, text[sent[index] : safe], safe
        if cut[index]:
            cancels[index].set()  # generate's own stop-string check ends the row at this token
        yield index, new, None


async def _stream_completion(
    served: Served,
    request: CompletionRequest,
    rows: list[list[int]],
    sink: queue.Queue,
    cancels: list[threading.Event],
    params: SamplingParams,
    created: int,
    ident: str,
):
    """Server-sent events of a streamed completion: text chunks per choice (the prompt first with
    echo), a finish chunk per choice, the usage if asked for, [DONE]."""
    base = {"id": ident, "object": "text_completion", "created": created, "model": request.model}
    tokenizer = served.engine.tokenizer

    def chunk(index: int, text: str, finish: str | None = None) -> str:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"

    completion_tokens = 0
    try:
        if request.echo:
            for index in range(len(cancels)):
                yield chunk(index, tokenizer.decode(rows[index // params.n], skip_special_tokens=True))
        async for index, piece, end in _choice_texts(sink, cancels, params):
            if piece:
                yield chunk(index, piece)
            if end is not None:
                completion_tokens += end[0]
                yield chunk(index, "", end[1])
    except Exception as error:  # the stream ends with the error, never a plain finish
        log.error("a streamed completion failed: %s", error, exc_info=error)
        yield _error_event(error)
        yield "data: [DONE]\n\n"
        return
    finally:
        for event in cancels:
            event.set()
    if request.stream_options and request.stream_options.include_usage:
        usage = _usage(sum(len(r) for r in rows), completion_tokens)
        yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


async def _stream_chat(
    served: Served,
    request: ChatRequest,
    conversation,
    job: _Job,
    params,
    created,
    ident,
    reasoning: str = "separate",
    form: ToolFormat | None = None,
):
    """Server-sent events: a role chunk per choice, content chunks, a finish chunk per choice, the
    usage if asked for, [DONE]. A disconnect closes this generator, which stops this request's rows
    of the batched generation. An answer that may call a tool (`form`) streams the text that
    cannot be part of a call as it comes (`ToolFormat.streamable`); when it ends, its calls come
    as one `delta.tool_calls` (finish_reason tool_calls) after the rest of its content."""
    base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": request.model}

    def chunk(index: int, delta: dict, finish: str | None = None) -> str:
        body = {**base, "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n"

    opened = prompt_opens_reasoning(served.engine.prompt_text(conversation))
    routers = [ReasoningStream(opened=opened) for _ in job.cancels]

    def deltas(index: int, piece: str, last: bool) -> Iterator[str]:
        if reasoning == "show":
            if piece:
                yield chunk(index, {"content": piece})
            return
        trace, answer = routers[index].feed(piece)
        if last:
            held_trace, held_answer = routers[index].flush()
            trace, answer = trace + held_trace, answer + held_answer
        if trace and reasoning == "separate":
            yield chunk(index, {"reasoning_content": trace})
        if answer:
            yield chunk(index, {"content": answer})

    tokenizer = served.engine.tokenizer
    completion_tokens = 0
    held = [conversation.prefill for _ in job.cancels]  # answers that may call, kept until they end
    sent = [0 for _ in job.cancels]  # how much of each held answer went out as content
    try:
        for index in range(len(job.cancels)):
            yield chunk(index, {"role": "assistant", "content": ""})
        async for index, piece, end in _choice_texts(job.sink, job.cancels, params):
            finish = end[1] if end is not None else None
            if form is None:
                for event in deltas(index, piece, last=end is not None):
                    yield event
            else:
                held[index] += piece
                answer = split_reasoning(held[index], opened)[1]
                if end is None:
                    ready = form.streamable(answer)
                    if ready > sent[index]:
                        yield chunk(index, {"content": answer[sent[index] : ready]})
                        sent[index] = ready
                    continue
                said, calls = tool_message(answer, form)
                if calls:
                    finish = "tool_calls"
                    listed = [{"index": k, **call} for k, call in enumerate(said["tool_calls"])]
                    rest = (said["content"] or "")[len(answer[: sent[index]].lstrip()) :]
                    yield chunk(index, {"content": rest or None, "tool_calls": listed})
                elif answer[sent[index] :]:
                    yield chunk(index, {"content": answer[sent[index] :]})
            if end is not None:
                completion_tokens += end[0]
                yield chunk(index, {}, finish)
    except Exception as error:  # the stream ends with the error, never a plain finish
        log.error("a streamed chat completion failed: %s", error, exc_info=error)
        yield _error_event(error)
        yield "data: [DONE]\n\n"
        return
    finally:
        job.cancel()
        served.forget(job.images)
    if request.stream_options and request.stream_options.include_usage:
        prompt = len(
            tokenizer(served.engine.prompt_text(conversation), add_special_tokens=False)["input_ids"]
        )
        body: dict[str, Any] = {**base, "choices": [], "usage": _usage(prompt, completion_tokens)}
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


def run_server(app: FastAPI, served: Served, host: str, port: int, grace: float = 3.0) -> None:
    """Serve until SIGINT or SIGTERM. Either stops every generation at its next token, waits up to
    `grace` seconds for the open requests to end, deletes the scratch folder and returns (exit 0);
    a second signal does not wait."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # uvicorn's would re-raise the signal at the end
            served.stop()
            self.force_exit = self.should_exit
            self.should_exit = True

    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="off", timeout_graceful_shutdown=grace
    )
    try:
        Server(config).run()
    finally:
        served.close()
