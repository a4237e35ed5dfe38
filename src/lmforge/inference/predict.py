"""`lmforge predict`: batch generation over a data set into a jsonl file, resumable.

Any data set lmforge reads works (file, folder, registry name, hub id). Each record's conversation
up to its last user message is the prompt; its answer (or its `answer` field) is the reference. One
JSON line per record: index, prompt, output, reference, token counts and the batch's seconds per
record. Lines are appended batch by batch and flushed, so an interrupted run resumes where it
stopped: complete lines are kept (a half-written last line is dropped) and their records skipped.

A run resumes only what the same settings made. `OUT.settings.json`, written (atomically) before
the first line, holds them: the model, adapter and data (each by where it is, and for a local one
its files' sizes and times), the template, the backend and the sampling settings (not the KV
cache, which does not change answers). A rerun with other settings is refused, naming what
differs; `fresh` starts the file over.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lmforge.artifacts import write_atomic
from lmforge.data.formats import Example
from lmforge.data.templates import Conversation
from lmforge.inference.engine import Engine, SamplingParams
from lmforge.models.loading import adapter_base

console = Console(stderr=True)


def read_examples(data: str, dataset_dir: str = ".") -> list[Example]:
    from lmforge.config.data import DatasetSource
    from lmforge.data.loader import read_source
    from lmforge.data.registry import resolve

    examples = list(read_source(resolve(DatasetSource(path=data), dataset_dir)))
    if not examples:
        raise ValueError(f"{data} has no records")
    return examples


def model_and_adapter(model: str, adapter: str | None) -> tuple[str, str | None]:
    """(model, adapter) to load: `--model` naming an adapter folder is that adapter over the base
    its config names, as `lmforge reward score` reads one."""
    base = adapter_base(model, fix="pass --model BASE --adapter FOLDER")
    if base is None:
        return model, adapter
    if adapter is not None:
        raise ValueError(
            f"--model {model} is an adapter folder and --adapter {adapter} is given too; pass the base "
            "model as --model, or the adapter folder alone as --model"
        )
    return base, model


def _where(name: str | None, location: str | None = None) -> dict[str, Any] | None:
    """What a model, adapter or data set is, for the resume key: its name as given, where it is
    (a local path made absolute), and for a local one its files' names, sizes and times."""
    if name is None:
        return None
    path = Path(location or name).expanduser()
    if not path.exists():
        return {"name": name, "at": location or name, "files": None}
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    stamp = hashlib.sha256()
    for file in files:
        info = file.stat()
        stamp.update(f"{file.relative_to(path.parent)}:{info.st_size}:{info.st_mtime_ns}\n".encode())
    return {"name": name, "at": str(path.resolve()), "files": stamp.hexdigest()[:16]}


def sampling_settings(params: SamplingParams) -> dict[str, Any]:
    """The sampling settings that change answers (the KV cache kind does not)."""
    return {k: v for k, v in asdict(params).items() if k != "cache"}


def run_settings(
    params: SamplingParams,
    model: str,
    adapter: str | None,
    data: str,
    dataset_dir: str = ".",
    template: str | None = None,
    backend: str = "transformers",
) -> dict[str, Any]:
    """What makes a prediction file's answers: a rerun resumes a file only with the same."""
    from lmforge.config.data import DatasetSource
    from lmforge.data.registry import resolve

    resolved = resolve(DatasetSource(path=data), dataset_dir)
    location = str(resolved.local) if resolved.local is not None else resolved.hub
    return {
        "model": _where(model),
        "adapter": _where(adapter),
        "data": _where(data, location),
        "template": template,
        "backend": backend,
        "sampling": sampling_settings(params),
    }


def settings_file(out: Path) -> Path:
    return out.with_name(out.name + ".settings.json")


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two `run_settings`, for a person: `temperature 0.0 -> 0.7`."""
    found = []
    for key in sorted(set(old) | set(new)):
        was, now = old.get(key), new.get(key)
        if key == "sampling" and isinstance(was, dict) and isinstance(now, dict):
            names = sorted(set(was) | set(now))
            found += [f"{n} {was.get(n)} -> {now.get(n)}" for n in names if was.get(n) != now.get(n)]
        elif isinstance(was, dict) and isinstance(now, dict):  # a model, adapter or data set
            if was.get("at") != now.get("at"):
                found.append(f"{key} {was.get('name')} -> {now.get('name')}")
            elif was.get("files") != now.get("files"):
                found.append(f"{key} {now.get('name')} (its files changed since)")
        elif was != now:
            shown = [value.get("name") if isinstance(value, dict) else value for value in (was, now)]
            found.append(f"{key} {shown[0]} -> {shown[1]}")
    return found


def resume_from(out: Path, settings: dict[str, Any], fresh: bool = False) -> int:
    """Complete lines in `out` to keep: those made with `settings`. `fresh` (or no file yet) starts
    over; a file made with other settings, or with no record of them, is a ValueError naming what
    differs. The settings are written beside `out` before any line is."""
    settings = json.loads(json.dumps(settings))  # as read back: tuples become lists
    record = settings_file(out)
    if fresh:
        out.unlink(missing_ok=True)
        record.unlink(missing_ok=True)
    start = done_lines(out, truncate=False)
    if start:
        fix = f"write to another --out, or pass --fresh to regenerate {out}"
        if not record.is_file():
            raise ValueError(
                f"{out} holds {start} predictions but no {record.name} saying what made them; {fix}"
            )
        differences = _differences(json.loads(record.read_text(encoding="utf-8")), settings)
        if differences:
            raise ValueError(
                f"{out} holds {start} predictions made with other settings ({'; '.join(differences)}); {fix}"
            )
        return done_lines(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(record, json.dumps(settings, indent=2) + "\n")
    return done_lines(out)


def done_lines(out: Path, truncate: bool = True) -> int:
    """Complete lines already in `out`; a half-written last line is cut off the file (`truncate`)."""
    if not out.is_file():
        return 0
    lines = out.read_text(encoding="utf-8").split("\n")
    complete = []
    for line in lines:
        try:
            json.loads(line)
        except json.JSONDecodeError:
            break
        complete.append(line)
    if truncate:
        out.write_text("".join(line + "\n" for line in complete), encoding="utf-8")
    return len(complete)


def prompt_conversation(example: Example, system: str | None = None) -> Conversation:
    """The record's conversation up to its last user message or tool results (its answer, and the
    calls it makes, left out), with the record's tools; `system` for records that have none."""
    last = len(example.turns) - 1
    return Conversation(
        turns=[*example.turns[:-1], (example.prompt, "")],
        system=example.system or system,
        tools=example.tools,
        calls={turn: calls for turn, calls in example.calls.items() if turn < last},
        results=example.results,
    )


def reference_of(example: Example) -> str | None:
    return example.reference.get("answer") or example.response or None


def predict(
    engine: Engine | VllmEngine,
    examples: list[Example],
    out: Path,
    params: SamplingParams,
    batch_size: int = 16,
    quiet: bool = False,
    settings: dict[str, Any] | None = None,
    fresh: bool = False,
) -> int:
    """Write predictions for every example not yet in `out`; returns how many were written now.
    `settings` (`run_settings`; the sampling settings alone when None) key the resume: see
    `resume_from`."""
    start = resume_from(out, settings or {"sampling": sampling_settings(params)}, fresh)
    if start and not quiet:
        console.print(f"[bold]resuming[/]: {start} of {len(examples)} records already in {out}")
    written = 0
    progress = Progress(
        TextColumn("[bold]predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), disable=quiet
    )
    with progress, out.open("a", encoding="utf-8") as sink:
        task = progress.add_task("predict", total=len(examples), completed=start)
        for begin in range(start, len(examples), batch_size):
            batch = examples[begin : begin + batch_size]
            conversations = [prompt_conversation(e) for e in batch]
            images = [list(e.images) for e in batch] if any(e.images for e in batch) else None
            started = time.perf_counter()
            results = engine.generate_detailed(conversations, params, batch_size, images)
            seconds = (time.perf_counter() - started) / len(batch)
            for offset, (example, result) in enumerate(zip(batch, results, strict=True)):
                row = {
                    "index": begin + offset,
                    "prompt": example.prompt,
                    "output": result.text,
                    "reference": reference_of(example),
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens,
                    "seconds": round(seconds, 4),
                }
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            sink.flush()
            written += len(batch)
            progress.update(task, advance=len(batch))
    return written


class VllmEngine:
    """The same `generate_detailed` as `Engine`, generating with vLLM (CUDA; `pip install vllm`).

    Prompts are rendered with the same chat template and stop at the same stop tokens; an adapter is
    served through vLLM's LoRA support. Images are not passed to vLLM here.
    """

    def __init__(self, model: str, adapter: str | None, template: str | None) -> None:
        import importlib.util

        import torch

        if importlib.util.find_spec("vllm") is None:
            raise ValueError("--backend vllm needs the vllm package: pip install vllm (CUDA only)")
        if not torch.cuda.is_available():
            raise ValueError("--backend vllm needs a CUDA GPU; use --backend transformers on this machine")
        from vllm import LLM

        from lmforge.data.templates import pick_template
        from lmforge.inference.engine import stop_token_ids
        from lmforge.models.loading import saved_template_name
        from lmforge.models.location import model_location

        self.llm = LLM(model=model_location(model), enable_lora=adapter is not None)
        self.tokenizer = self.llm.get_tokenizer()
        saved = [saved_template_name(adapter or ""), saved_template_name(model)]
        self.template = pick_template(template, saved, self.tokenizer, model)
        self.stop_ids = stop_token_ids(self.tokenizer, self.template)
        self.lora = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, adapter)

    def generate_detailed(self, conversations, params: SamplingParams, batch_size: int = 16, images=None):
        from vllm import SamplingParams as VllmParams

        from lmforge.inference.engine import Generation, cut_at_stop

        if images and any(images):
            raise ValueError("--backend vllm does not take images here; use --backend transformers")
        prompts = [self.template.generation_prompt(c, self.tokenizer) for c in conversations]
        sampling = VllmParams(
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            seed=params.seed,
            stop=list(params.stop) or None,
            stop_token_ids=self.stop_ids,
        )
        outputs = self.llm.generate(prompts, sampling, lora_request=self.lora, use_tqdm=False)
        results = []
        for output in outputs:
            completion = output.outputs[0]
            text, _ = cut_at_stop(completion.text, params.stop)
            finish = "length" if completion.finish_reason == "length" else "stop"
            results.append(
                Generation(text.strip(), len(output.prompt_token_ids), len(completion.token_ids), finish)
            )
        return results
