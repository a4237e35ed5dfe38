"""The generation engine used by chat, quickstart evaluation and (later) serve/predict/eval.

One model, one tokenizer, one chat template. Loads a merged model, or a base plus an
adapter; KV cache on; batched generation with left padding; streaming through
transformers' `TextIteratorStreamer`; generation stops at the template's stop token.

An encoder-decoder (seq2seq) model takes no chat template: its encoder reads the last user
message as plain text (after the system text, as in training: `data/tokenize.seq2seq_source`),
right-padded, and the decoder writes the answer until EOS.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)
from transformers.generation.streamers import BaseStreamer

from lmforge.adapters.moe_dora import MoeDoraModel, is_moe_dora_folder
from lmforge.config.model import ModelConfig
from lmforge.data.multimodal import VisionProcessor, expand_image_tokens, open_image
from lmforge.data.templates import AnyTemplate, Conversation, pick_template
from lmforge.data.tokenize import encode_source, seq2seq_source
from lmforge.models.loading import (
    is_encoder_decoder,
    load_causal_lm,
    load_seq2seq_lm,
    load_tokenizer,
    saved_template_name,
)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, template: AnyTemplate) -> list[int]:
    """The ids that end an answer: the template's stop token and the tokenizer's eos."""
    stop_id = tokenizer.convert_tokens_to_ids(template.stop_token(tokenizer))
    return sorted({stop_id, tokenizer.eos_token_id} - {None, tokenizer.unk_token_id})


class GenerationError(RuntimeError):
    """The model failed to generate (not the request's fault: the message says what failed)."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: generation ends at the first, which is cut off
    cache: str = "dynamic"  # KV cache: dynamic (grows as it goes) or static (preallocated, for torch.compile)
    n: int = 1  # answers per prompt (sampled apart; greedy ones are equal)
    logprobs: int | None = None  # None: none; k: each answer token's log-probability and the k likeliest

    def __post_init__(self) -> None:
        if self.cache not in ("dynamic", "static"):
            raise ValueError(f"--cache {self.cache}: use dynamic or static")


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (None for a prompt's first token, which nothing
    before it predicts) and the likeliest tokens at its position, likeliest first. These are the
    model's own probabilities, before temperature, top-p or a repetition penalty."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Generation:
    """One answer with its token counts and why it ended ("stop" or "length"); `token_ids` are every
    generated token (the one that ended the answer too), `logprobs` one per token when asked for."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class StreamEnd:
    """A streamed row's end marker: how many tokens it generated (the one that ended it too),
    whether a stop token ended it, and the most it could have generated (its max_new_tokens, less
    where the context ended first; None if unknown)."""

    tokens: int
    stop_token: bool
    limit: int | None = None


_CONTEXT = 8  # tokens of left context that decoding one more token needs (decoders are local)


def decode_after(tokenizer: PreTrainedTokenizerBase, context: Sequence[int], ids: Sequence[int]) -> str:
    """The text `ids` add after `context`. Decoding `ids` alone would drop a SentencePiece token's
    leading space (the decoder strips it at the start of a text); decoding a few context tokens
    before them and cutting their text off keeps it. A character split between the context and
    `ids` belongs to `ids` (as in `token_pieces`)."""
    tail = list(context[-_CONTEXT:])
    before = tokenizer.decode(tail, skip_special_tokens=True)
    whole = tokenizer.decode(tail + list(ids), skip_special_tokens=True)
    while before and not whole.startswith(before) and before.endswith("\ufffd"):
        before = before[:-1]  # the context ends inside a character: `ids` complete it
    if whole.startswith(before):
        return whole[len(before) :]
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def token_pieces(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[str]:
    """Each token's piece of `decode(ids)`; the pieces join to exactly that text (a character split
    over several byte tokens falls to the token that completes it)."""
    ids = list(ids)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    pieces = [decode_after(tokenizer, ids[:i], ids[i : i + 1]) for i in range(len(ids))]
    if "".join(pieces) == full:
        return pieces
    offsets = [0]
    for i in range(1, len(ids)):  # exact and slower: where each prefix's text stops agreeing
        prefix = tokenizer.decode(ids[:i], skip_special_tokens=True)
        agree = next((k for k, (a, b) in enumerate(zip(prefix, full, strict=False)) if a != b), None)
        offsets.append(max(offsets[-1], min(len(prefix), len(full)) if agree is None else agree))
    offsets.append(len(full))
    return [full[offsets[i] : offsets[i + 1]] for i in range(len(ids))]


def _token_logprobs(logprobs: torch.Tensor, ids: torch.Tensor, top: int) -> list[TokenLogprob]:
    """(positions, vocab) log-probabilities and the token at each position -> TokenLogprobs."""
    chosen = logprobs.gather(1, ids[:, None])[:, 0].tolist()
    best = logprobs.topk(top, dim=-1) if top else None
    out = []
    for k, (token, value) in enumerate(zip(ids.tolist(), chosen, strict=True)):
        alternatives = zip(best.indices[k].tolist(), best.values[k].tolist(), strict=True) if best else ()
        out.append(TokenLogprob(token, value, tuple(alternatives)))
    return out


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """The text up to the first stop string (and whether one was found)."""
    positions = [text.find(s) for s in stop if s and s in text]
    return (text[: min(positions)], True) if positions else (text, False)


def stop_safe_length(text: str, stop: tuple[str, ...]) -> int:
    """How much of `text` can be sent while streaming: all but a tail that could still begin a stop
    string (sent later, or never when the stop string completes), so streamed == plain text."""
    held = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return len(text) - held


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


class _RowsStreamer(BaseStreamer):
    """Streams each row of a batched generate into its own queue (text pieces, then a `StreamEnd`).
    A row ends at a stop token, or at the pad token generate fills a finished row with."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        sinks: list,
        stop_ids: list[int],
        contexts: list[list[int]] | None = None,
    ) -> None:
        self.tokenizer, self.sinks, self.stop_ids = tokenizer, sinks, set(stop_ids)
        self.pad_id = tokenizer.pad_token_id
        self.stop_token = [False] * len(sinks)
        self.contexts = contexts  # raw continuations: each row's prompt, for `decode_after`
        self.tokens: list[list[int]] = [[] for _ in sinks]
        self.sent = [""] * len(sinks)
        self.done = [False] * len(sinks)
        self.prompt_seen = False
        self.limit: int | None = None  # the answer tokens generate may make (set before it runs)

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first hands over the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self.sinks), -1)[:, -1].tolist()):
            if self.done[row]:
                continue
            if token in self.stop_ids or token == self.pad_id:
                self.done[row] = True
                self.stop_token[row] = token in self.stop_ids
                continue
            self.tokens[row].append(token)
            text = self._text(row)
            if text.endswith("\ufffd"):
                continue  # half of a multi-byte character: wait for the rest
            if len(text) > len(self.sent[row]):
                self.sinks[row].put(text[len(self.sent[row]) :])
                self.sent[row] = text

    def end(self) -> None:
        """Each row's held-back tail (a byte sequence that never became a character is sent as the
        plain answer decodes it), then its end marker."""
        for row, sink in enumerate(self.sinks):
            text = self._text(row)
            if len(text) > len(self.sent[row]):
                sink.put(text[len(self.sent[row]) :])
                self.sent[row] = text
            tokens = len(self.tokens[row]) + self.stop_token[row]
            sink.put(StreamEnd(tokens, self.stop_token[row], self.limit))

    def _text(self, row: int) -> str:
        if self.contexts is None:
            return self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        return decode_after(self.tokenizer, self.contexts[row], self.tokens[row])


class _RowsCancelled(StoppingCriteria):
    def __init__(self, events: list[threading.Event]) -> None:
        self.events = events

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        flags = [event.is_set() for event in self.events]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


class Engine:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        template: AnyTemplate,
        vision: VisionProcessor | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        self.vision = vision  # a vision-language model's image side (None: text only)
        self.model.config.use_cache = True
        # An encoder-decoder model: plain-text source in, answer out of the decoder (no template).
        self.seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        if self.seq2seq:
            self.stop_ids = [tokenizer.eos_token_id]
        else:
            self.stop_ids = stop_token_ids(tokenizer, template)

    @classmethod
    def load(
        cls,
        model_path: str,
        adapter: str | None = None,
        template: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        quiet: bool = True,
    ) -> Engine:
        """A merged model folder / hub id, optionally with an adapter folder on top."""
        source = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model_path
        tokenizer = load_tokenizer(ModelConfig(name_or_path=source))
        model_config = ModelConfig(name_or_path=model_path, device=device, dtype=dtype)  # type: ignore[arg-type]
        loader = load_seq2seq_lm if is_encoder_decoder(model_config) else load_causal_lm
        model, _ = loader(model_config, for_training=False, quiet=quiet)
        if adapter and is_moe_dora_folder(adapter):
            model = MoeDoraModel.from_pretrained(model, adapter, is_trainable=False)
        elif adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
        vision = None
        if getattr(model.config, "vision_config", None) is not None:  # read from the loaded model
            has_processor = adapter and (Path(adapter) / "preprocessor_config.json").is_file()
            vision = VisionProcessor.load(adapter if has_processor else model_path, tokenizer, None, None)
        saved = [saved_template_name(adapter or ""), saved_template_name(model_path)]
        return cls(model, tokenizer, pick_template(template, saved, tokenizer, model_path), vision)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context(self) -> int | None:
        """How many positions the model reads (prompt and answer together), from its config, else
        its tokenizer's limit; None when neither says (a model with relative positions)."""
        config = self.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        limit = self.tokenizer.model_max_length
        return limit if isinstance(limit, int) and 0 < limit < 10**6 else None

    def room(self, prompt_tokens: int, asked: int) -> int:
        """The answer tokens that fit after a prompt of `prompt_tokens`: `asked`, or less where the
        context ends first. A prompt that fills the context is a ValueError naming both numbers."""
        context = self.context
        if context is None:
            return asked
        if self.seq2seq:  # the encoder reads the prompt; the decoder has its own positions
            if prompt_tokens > context:
                raise ValueError(f"the prompt is {prompt_tokens} tokens; this model reads at most {context}")
            return min(asked, context)
        if prompt_tokens >= context:
            raise ValueError(
                f"the prompt is {prompt_tokens} tokens; this model's context is {context} "
                "(prompt and answer together): shorten it"
            )
        return min(asked, context - prompt_tokens)

    def prompt_text(self, conversation: Conversation) -> str:
        if self.seq2seq:  # earlier turns are not seen: the encoder reads one source
            return seq2seq_source(conversation.turns[-1][0], conversation.system)
        return self.template.generation_prompt(conversation, self.tokenizer)

    def _source_inputs(self, texts: list[str]) -> dict:
        """An encoder-decoder's inputs: each source ending in EOS (as in training), right-padded."""
        limit = min(self.tokenizer.model_max_length, 10**6)
        rows = [encode_source(text, self.tokenizer, limit)[0] for text in texts]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        }

    def _inputs(self, conversations: list[Conversation], images: list[list[Path]] | None) -> dict:
        """Left-padded prompts; with images, each image's token expanded and its pixels made."""
        texts = [self.prompt_text(c) for c in conversations]
        if self.seq2seq and images and any(images):
            raise ValueError("images need a vision-language model; this is a text encoder-decoder model")
        if self.seq2seq:
            return self._source_inputs(texts)
        if not images or not any(images):
            self.tokenizer.padding_side = "left"
            return dict(self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))
        if self.vision is None:
            raise ValueError(
                "images need a vision-language model (e.g. Qwen2-VL); this model has no vision tower"
            )
        rows, pixels, grids = [], [], []
        for text, paths in zip(texts, images, strict=True):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            placeholders = ids.count(self.vision.image_token_id)
            if placeholders != len(paths):
                raise ValueError(f"{placeholders} image placeholders in the prompt but {len(paths)} images")
            if paths:
                values, grid = self.vision.pixels([open_image(Path(p), str(p)) for p in paths])
                counts = self.vision.tokens_per_image(grid)
                ids, _ = expand_image_tokens(ids, [0] * len(ids), self.vision.image_token_id, counts)
                pixels.append(values)
                grids.append(grid)
            rows.append(ids)
        padded = self._left_padded(rows)
        input_ids, mask = padded["input_ids"], padded["attention_mask"]
        return {
            **padded,
            "mm_token_type_ids": (input_ids == self.vision.image_token_id).long() * mask,
            "pixel_values": torch.cat(pixels),
            "image_grid_thw": torch.cat(grids),
        }

    def _generate_kwargs(self, params: SamplingParams) -> dict:
        sample = params.temperature > 0
        kwargs = {
            "max_new_tokens": params.max_new_tokens,
            "do_sample": sample,
            "eos_token_id": self.stop_ids,
            "pad_token_id": self.tokenizer.pad_token_id,
            "repetition_penalty": params.repetition_penalty,
            "use_cache": True,
        }
        if params.cache == "static":
            kwargs["cache_implementation"] = "static"
        if sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        return kwargs

    @torch.inference_mode()
    def generate(
        self,
        conversations: list[Conversation],
        params: SamplingParams | None = None,
        batch_size: int = 16,
        images: list[list[Path]] | None = None,
    ) -> list[str]:
        """Answers for many conversations, batched with left padding (`images`: per conversation, in
        the order of its `<image>` placeholders)."""
        return [g.text for g in self.generate_detailed(conversations, params, batch_size, images)]

    @torch.inference_mode()
    def generate_detailed(
        self,
        conversations: list[Conversation],
        params: SamplingParams | None = None,
        batch_size: int = 16,
        images: list[list[Path]] | None = None,
        cancels: list[threading.Event] | None = None,
    ) -> list[Generation]:
        """`generate`, with each answer's token counts and finish reason (`params.n` answers per
        conversation, one after another). `cancels` (one per answer): a set event stops that answer
        at its next token (a client that went away)."""
        params = params or SamplingParams()
        out: list[Generation] = []
        for start in range(0, len(conversations), batch_size):
            chunk = _repeat(conversations[start : start + batch_size], params.n)
            chunk_images = _repeat(images[start : start + batch_size], params.n) if images else None
            events = cancels[start * params.n : start * params.n + len(chunk)] if cancels else None
            out += self._run(self._inputs(chunk, chunk_images), params, cancels=events)
        return out

    def prompt_ids(self, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
        """Raw prompts as token ids: a text is tokenized as the model reads text (its BOS first, if
        it has one); token ids are taken as they are, each checked against the vocabulary."""
        vocab = self.model.get_input_embeddings().num_embeddings
        rows = []
        for index, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                row = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
                if not row:
                    raise ValueError(f"prompt {index} is empty (this model has no BOS token to start from)")
                rows.append(row)
                continue
            row = list(prompt)
            bad = next((t for t in row if not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"prompt {index}: token id {bad} is outside the vocabulary (0..{vocab - 1})")
            if not row:
                raise ValueError(f"prompt {index} has no tokens")
            rows.append(row)
        return rows

    def _left_padded(self, rows: list[list[int]]) -> dict:
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return {
            "input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
        }

    @torch.inference_mode()
    def complete(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | None = None,
        cancels: list[threading.Event] | None = None,
        batch_size: int = 8,
    ) -> list[Generation]:
        """Continue raw text or token ids (no chat template), as OpenAI's completions endpoint does
        (`params.n` continuations per prompt, one after another; `batch_size` prompts per generate,
        so many prompts never make one huge batch; `cancels` as in `generate_detailed`). The
        continuation is the text its tokens add after the prompt, leading space included. An
        encoder-decoder model answers the text instead."""
        params = params or SamplingParams()
        if self.seq2seq:
            texts = [p if isinstance(p, str) else self.tokenizer.decode(list(p)) for p in prompts]
            return self._run(self._source_inputs(_repeat(texts, params.n)), params, cancels=cancels)
        rows = self.prompt_ids(prompts)
        out: list[Generation] = []
        for start in range(0, len(rows), batch_size):
            chunk = _repeat(rows[start : start + batch_size], params.n)
            events = cancels[start * params.n : start * params.n + len(chunk)] if cancels else None
            out += self._run(self._left_padded(chunk), params, raw=True, cancels=events)
        return out

    def _generate(self, **kwargs):
        """The model's generate; its failure (a kernel this device cannot run, a sampling overflow)
        becomes one GenerationError that says so."""
        try:
            return self.model.generate(**kwargs)
        except (RuntimeError, ValueError, AssertionError, NotImplementedError, TypeError) as error:
            raise GenerationError(f"generation failed: {type(error).__name__}: {error}") from error

    def _fitted(self, batch: dict, params: SamplingParams) -> dict:
        """generate's keyword arguments for `batch`, its answer length cut to what fits the context."""
        kwargs = self._generate_kwargs(params)
        width = batch["input_ids"].shape[1]
        kwargs["max_new_tokens"] = self.room(width, params.max_new_tokens)
        return kwargs

    def _run(
        self,
        inputs: dict,
        params: SamplingParams,
        raw: bool = False,
        cancels: list[threading.Event] | None = None,
    ) -> list[Generation]:
        """Generations; a chat answer is stripped, a raw continuation (`raw`) keeps its spaces."""
        if params.seed is not None:
            torch.manual_seed(params.seed)
        batch = {k: v.to(self.device) for k, v in inputs.items()}
        kwargs = self._fitted(batch, params)
        limit = kwargs["max_new_tokens"]
        if cancels:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_RowsCancelled(cancels)])
        if params.logprobs is not None:
            kwargs.update(return_dict_in_generate=True, output_logits=True)
        out = self._generate(**batch, **kwargs)
        sequences = out.sequences if params.logprobs is not None else out
        # A decoder-only model returns prompt + answer; an encoder-decoder its decoder start + answer.
        width = 1 if self.seq2seq else batch["input_ids"].shape[1]
        results = []
        for index, (row, mask) in enumerate(zip(sequences[:, width:], batch["attention_mask"], strict=True)):
            length, ended = self._answer_length(row.tolist())
            ids = row[:length].tolist()
            if raw:
                text = decode_after(self.tokenizer, batch["input_ids"][index][mask.bool()].tolist(), ids)
            else:
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
            text, stopped = cut_at_stop(text, params.stop)
            finish = "stop" if ended or stopped or length < limit else "length"
            logprobs = None
            if params.logprobs is not None:
                steps = torch.stack([out.logits[step][index] for step in range(length)]).float()
                logprobs = tuple(_token_logprobs(steps.log_softmax(-1), row[:length], params.logprobs))
            text = text if raw else text.strip()
            results.append(Generation(text, int(mask.sum()), length, finish, tuple(ids), logprobs))
        return results

    def _answer_length(self, row: list[int]) -> tuple[int, bool]:
        """(tokens of a generated row that are its answer, whether a stop token ended it): up to and
        with the first stop token, or up to the pad token generate fills a row with once it ends
        (a stop string, or another row still running)."""
        for position, token in enumerate(row):
            if token in self.stop_ids:
                return position + 1, True
            if token == self.tokenizer.pad_token_id:
                return position, False
        return len(row), False

    @torch.inference_mode()
    def score(self, rows: list[list[int]], top: int = 0) -> list[list[TokenLogprob]]:
        """Each prompt token's log-probability given the tokens before it, and the `top` likeliest
        tokens at its position (the first token has none: nothing predicts it). One row at a time,
        so no padding moves a position."""
        if self.seq2seq:
            raise ValueError("prompt log-probabilities need a decoder-only model")
        out = []
        for row in rows:
            ids = torch.tensor([row], device=self.device)
            logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
            logprobs = logits[0, :-1].float().log_softmax(-1)
            out.append([TokenLogprob(row[0], None), *_token_logprobs(logprobs, ids[0, 1:], top)])
        return out

    def stream(
        self,
        conversation: Conversation,
        params: SamplingParams | None = None,
        images: list[Path] | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        """Yield text pieces of one answer as they are generated. Setting `cancel` (or closing the
        iterator, as a server does when its client disconnects) stops generation at the next token."""
        params = params or SamplingParams()
        if params.seed is not None:
            torch.manual_seed(params.seed)
        inputs = self._inputs([conversation], [images] if images else None)
        batch = {k: v.to(self.device) for k, v in inputs.items()}
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = cancel or threading.Event()
        kwargs = {
            **batch,
            **self._fitted(batch, params),
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([_Cancelled(cancel)]),
        }
        failed: list[BaseException] = []

        def work() -> None:
            try:
                with torch.inference_mode():
                    self._generate(**kwargs)
            except BaseException as error:  # handed to the reader, who would otherwise wait forever
                failed.append(error)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:
            cancel.set()
            thread.join()
        if failed:
            raise failed[0]

    def stream_rows(
        self,
        conversations: list[Conversation],
        params: SamplingParams,
        sinks: list,
        cancels: list[threading.Event],
        images: list[list[Path]] | None = None,
    ) -> None:
        """One batched generate whose rows stream into their own queues (text pieces, then a
        `StreamEnd`).
        A row whose event is set stops at its next token (a disconnected client)."""
        inputs = self._inputs(conversations, images)
        self._stream_batch(inputs, params, _RowsStreamer(self.tokenizer, sinks, self.stop_ids), cancels)

    def stream_prompts(
        self, rows: list[list[int]], params: SamplingParams, sinks: list, cancels: list[threading.Event]
    ) -> None:
        """`stream_rows` for raw token prompts: each row streams its continuation as `complete`
        returns it (the text after the prompt, leading space included)."""
        if self.seq2seq:
            raise ValueError("streamed completions need a decoder-only model")
        streamer = _RowsStreamer(self.tokenizer, sinks, self.stop_ids, contexts=rows)
        self._stream_batch(self._left_padded(rows), params, streamer, cancels)

    @torch.inference_mode()
    def _stream_batch(
        self, inputs: dict, params: SamplingParams, streamer: _RowsStreamer, cancels: list[threading.Event]
    ) -> None:
        if params.seed is not None:
            torch.manual_seed(params.seed)
        batch = {k: v.to(self.device) for k, v in inputs.items()}
        kwargs = self._fitted(batch, params)
        streamer.limit = kwargs["max_new_tokens"]
        # A failure propagates to the caller, who hands it to every waiting client (no end marker:
        # a failed row must not look finished).
        self._generate(
            **batch,
            **kwargs,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_RowsCancelled(cancels)]),
        )

    def chat(self, history: list[tuple[str, str]], message: str, system: str | None = None) -> str:
        return self.generate([Conversation(turns=[*history, (message, "")], system=system)])[0]


def _repeat(items: list, n: int) -> list:
    """Each item n times in a row (n answers per prompt)."""
    return [item for item in items for _ in range(n)]
