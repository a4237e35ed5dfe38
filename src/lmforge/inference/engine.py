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
from collections.abc import Iterator
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

    def __post_init__(self) -> None:
        if self.cache not in ("dynamic", "static"):
            raise ValueError(f"--cache {self.cache}: use dynamic or static")


@dataclass(frozen=True)
class Generation:
    """One answer with its token counts and why it ended ("stop" or "length")."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


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
    """Streams each row of a batched generate into its own queue (text pieces, then None)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, sinks: list, stop_ids: list[int]) -> None:
        self.tokenizer, self.sinks, self.stop_ids = tokenizer, sinks, set(stop_ids)
        self.tokens: list[list[int]] = [[] for _ in sinks]
        self.sent = [""] * len(sinks)
        self.done = [False] * len(sinks)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first hands over the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self.sinks), -1)[:, -1].tolist()):
            if self.done[row]:
                continue
            if token in self.stop_ids:
                self.done[row] = True
                continue
            self.tokens[row].append(token)
            text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue  # half of a multi-byte character: wait for the rest
            if len(text) > len(self.sent[row]):
                self.sinks[row].put(text[len(self.sent[row]) :])
                self.sent[row] = text

    def end(self) -> None:
        """Each row's held-back tail (a byte sequence that never became a character is sent as the
        plain answer decodes it), then its end marker."""
        for row, sink in enumerate(self.sinks):
            text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            if len(text) > len(self.sent[row]):
                sink.put(text[len(self.sent[row]) :])
                self.sent[row] = text
            sink.put(None)


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
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
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
    ) -> list[Generation]:
        """`generate`, with each answer's token counts and finish reason."""
        params = params or SamplingParams()
        out: list[Generation] = []
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start : start + batch_size]
            chunk_images = images[start : start + batch_size] if images else None
            out += self._run(self._inputs(chunk, chunk_images), params)
        return out

    @torch.inference_mode()
    def complete(self, prompts: list[str], params: SamplingParams | None = None) -> list[Generation]:
        """Continue raw text (no chat template), as OpenAI's completions endpoint does (an
        encoder-decoder model answers the text instead)."""
        if self.seq2seq:
            return self._run(self._source_inputs(prompts), params or SamplingParams())
        self.tokenizer.padding_side = "left"
        inputs = dict(self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True))
        return self._run(inputs, params or SamplingParams(), raw=True)

    def _run(self, inputs: dict, params: SamplingParams, raw: bool = False) -> list[Generation]:
        """Generations; a chat answer is stripped, a raw continuation (`raw`) keeps its spaces."""
        if params.seed is not None:
            torch.manual_seed(params.seed)
        batch = {k: v.to(self.device) for k, v in inputs.items()}
        out = self.model.generate(**batch, **self._generate_kwargs(params))
        # A decoder-only model returns prompt + answer; an encoder-decoder its decoder start + answer.
        width = 1 if self.seq2seq else batch["input_ids"].shape[1]
        results = []
        for row, mask in zip(out[:, width:], batch["attention_mask"], strict=True):
            ended = torch.isin(row, torch.tensor(self.stop_ids, device=row.device))
            length = int(ended.int().argmax()) + 1 if ended.any() else len(row)
            text = self.tokenizer.decode(row[:length], skip_special_tokens=True)
            text, stopped = cut_at_stop(text, params.stop)
            finish = "stop" if ended.any() or stopped or length < params.max_new_tokens else "length"
            results.append(Generation(text if raw else text.strip(), int(mask.sum()), length, finish))
        return results

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
            **self._generate_kwargs(params),
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([_Cancelled(cancel)]),
        }

        def work() -> None:
            with torch.inference_mode():
                self.model.generate(**kwargs)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:
            cancel.set()
            thread.join()

    @torch.inference_mode()
    def stream_rows(
        self,
        conversations: list[Conversation],
        params: SamplingParams,
        sinks: list,
        cancels: list[threading.Event],
        images: list[list[Path]] | None = None,
    ) -> None:
        """One batched generate whose rows stream into their own queues (text pieces, then None).
        A row whose event is set stops at its next token (a disconnected client)."""
        if params.seed is not None:
            torch.manual_seed(params.seed)
        batch = {k: v.to(self.device) for k, v in self._inputs(conversations, images).items()}
        streamer = _RowsStreamer(self.tokenizer, sinks, self.stop_ids)
        try:
            self.model.generate(
                **batch,
                **self._generate_kwargs(params),
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_RowsCancelled(cancels)]),
            )
        except BaseException:
            streamer.end()  # every waiting client gets its end marker
            raise

    def chat(self, history: list[tuple[str, str]], message: str, system: str | None = None) -> str:
        return self.generate([Conversation(turns=[*history, (message, "")], system=system)])[0]
