"""`lmforge predict`: batch generation over a data set into a jsonl file, resumable.

Any data set lmforge reads works (file, folder, registry name, hub id). Each record's conversation
up to its last user message is the prompt; its answer (or its `answer` field) is the reference. One
JSON line per record: index, prompt, output, reference, token counts and the batch's seconds per
record. Lines are appended batch by batch and flushed, so an interrupted run resumes where it
stopped: complete lines are kept (a half-written last line is dropped) and their records skipped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lmforge.data.formats import Example
from lmforge.data.templates import Conversation
from lmforge.inference.engine import Engine, SamplingParams

console = Console(stderr=True)


def read_examples(data: str, dataset_dir: str = ".") -> list[Example]:
    from lmforge.config.data import DatasetSource
    from lmforge.data.loader import read_source
    from lmforge.data.registry import resolve

    examples = list(read_source(resolve(DatasetSource(path=data), dataset_dir)))
    if not examples:
        raise ValueError(f"{data} has no records")
    return examples


def done_lines(out: Path) -> int:
    """Complete lines already in `out`; a half-written last line is cut off the file."""
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
    out.write_text("".join(line + "\n" for line in complete), encoding="utf-8")
    return len(complete)


def prompt_conversation(example: Example, system: str | None = None) -> Conversation:
    """The record's conversation up to its last user message (its answer left out); `system` for
    records that have none."""
    return Conversation(turns=[*example.turns[:-1], (example.prompt, "")], system=example.system or system)


def reference_of(example: Example) -> str | None:
    return example.reference.get("answer") or example.response or None


def predict(
    engine: Engine | VllmEngine,
    examples: list[Example],
    out: Path,
    params: SamplingParams,
    batch_size: int = 16,
    quiet: bool = False,
) -> int:
    """Write predictions for every example not yet in `out`; returns how many were written now."""
    out.parent.mkdir(parents=True, exist_ok=True)
    start = done_lines(out)
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
