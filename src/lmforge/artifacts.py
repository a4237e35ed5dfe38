"""Artifact writing, for every part of lmforge: atomic files and folders, package versions, the
resolved config, the final model or adapter with its model card.

Everything is written to a temporary path beside its destination and renamed into place, so a run
that dies mid-write never leaves a file, an `adapter/` or a `model/` that looks complete. A
temporary is named `.NAME.tmp-PID` (a folder) or `.NAME.tmp-PID.HEX.tmp` (a file) after the process
writing it, so the next write of NAME removes those a killed run left (their process is gone) and
keeps those of runs still writing. This module sits low: it imports only `config` (a template is
anything with `name`, `stop_token` and `jinja`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.config import RunConfig, dump_config

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lmforge.data.templates import AnyTemplate

TEMPLATE_FILE = "lmforge_template.txt"  # the lmforge template name saved beside a model
PACKAGES = ("lmforge", "torch", "transformers", "trl", "peft", "datasets", "accelerate")


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def write_resolved_config(config: RunConfig, output_dir: Path) -> Path:
    """config.yaml: the full config after defaults and overrides, headed by package versions; with
    `hardware: auto`, hardware.json beside it (what was decided, why, and what was detected)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    header = "# resolved by lmforge — " + ", ".join(f"{k} {v}" for k, v in versions().items())
    path = output_dir / "config.yaml"
    write_atomic(path, header + "\n" + dump_config(config))
    if config.hardware_report is not None:
        write_atomic(output_dir / "hardware.json", json.dumps(config.hardware_report, indent=2) + "\n")
    return path


def _library(kind: str, config: RunConfig | None) -> str:
    if kind != "adapter":
        return "transformers"
    return "lmforge" if config is not None and config.adapter.method == "moe_dora" else "peft"


def _model_card(kind: str, config: RunConfig | None, template: AnyTemplate, extra: str) -> str:
    base = config.model.name_or_path if config else "(unknown)"
    lines = [
        "---",
        "library_name: " + _library(kind, config),
        f"base_model: {base}",
        "tags: [lmforge]",
        "---",
        f"# lmforge {kind}",
        "",
        f"- base model: `{base}`",
        f"- chat template: `{template.name}` (also saved as the tokenizer's `chat_template`)",
    ]
    if config is not None:
        lines += [
            f"- method: `{config.method.name}`, adapter: `{config.adapter.method}` "
            f"(r={config.adapter.r}, alpha={config.adapter.alpha}, preset={config.adapter.preset})",
            f"- data: `{config.data.path}` (max_length={config.data.max_length})",
            f"- lr {config.train.lr}, batch {config.train.batch_size} x accum {config.train.grad_accum}, "
            f"seed {config.train.seed}",
        ]
    lines += ["- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items())]
    if extra:
        lines += ["", extra]
    return "\n".join(lines) + "\n"


def save_artifact(
    model,
    tokenizer: PreTrainedTokenizerBase,
    template: AnyTemplate,
    dest: Path,
    kind: str,
    config: RunConfig | None = None,
    card_extra: str = "",
    image_processor=None,
    max_shard_size: str | None = None,
    state_dict: dict | None = None,
) -> Path:
    """Save a model or adapter (safetensors) + tokenizer + template + card (+ a vision-language
    model's image processor), atomically. `max_shard_size` (e.g. "5GB") splits the weights into
    `model-0000i-of-0000n.safetensors` files plus an index; None keeps transformers' default.
    `state_dict`: the weights to write when the model's own are shards (FSDP, ZeRO-3)."""
    with atomic_folder(Path(dest)) as tmp:
        _fill(
            tmp,
            model,
            tokenizer,
            template,
            kind,
            config,
            card_extra,
            image_processor,
            max_shard_size,
            state_dict,
        )
    return Path(dest)


def _fill(
    tmp, model, tokenizer, template, kind, config, card_extra, image_processor, max_shard_size, state_dict
) -> None:
    """Write the artifact's files into the temporary folder."""
    stop_id = tokenizer.convert_tokens_to_ids(template.stop_token(tokenizer))
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and stop_id is not None:
        eos = {stop_id, tokenizer.eos_token_id} - {None}
        generation_config.eos_token_id = sorted(eos)
        generation_config.pad_token_id = tokenizer.pad_token_id
    extra = {}
    if config is not None and config.adapter.init == "pissa" and kind == "adapter":
        # Convert PiSSA (trained against the residual base) to a LoRA of the original base.
        init = Path(config.train.output_dir) / "pissa_init"
        extra["path_initial_model_for_weight_conversion"] = str(init)
    if max_shard_size is not None:
        extra["max_shard_size"] = max_shard_size
    if state_dict is not None:
        extra["state_dict"] = state_dict
    model.save_pretrained(tmp, safe_serialization=True, **extra)
    tokenizer.chat_template = template.jinja(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.padding is not None:
        # A padding call's direction (trl's GRPO pads prompts left) stays in the fast tokenizer, and
        # save_pretrained would write it as the tokenizer's own: it is set again on every call.
        backend.no_padding()
    tokenizer.save_pretrained(tmp)
    if image_processor is not None:
        image_processor.save_pretrained(tmp)
    (tmp / TEMPLATE_FILE).write_text(template.name + "\n", encoding="utf-8")
    (tmp / "README.md").write_text(_model_card(kind, config, template, card_extra), encoding="utf-8")


def _alive(pid: int) -> bool:
    """Whether a process with this id runs (one of another user's counts: it cannot be signalled)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temporaries(dest: Path) -> list[Path]:
    """Remove the temporaries of `dest` (`.NAME.tmp-PID`, `.NAME.tmp-PID.HEX.tmp`) whose process
    no longer runs: what a killed merge, export or save left. Those of this process and of live
    ones are kept. Returns what was removed."""
    if os.name == "nt" or not dest.parent.is_dir():  # os.kill(pid, 0) would end the process there
        return []
    own = re.compile(rf"\.{re.escape(dest.name)}\.tmp-(\d+)(?:\.[0-9a-f]+\.tmp)?")
    removed = []
    for sibling in dest.parent.iterdir():
        match = own.fullmatch(sibling.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)
        removed.append(sibling)
    return removed


@contextmanager
def atomic_folder(dest: Path) -> Iterator[Path]:
    """A temporary sibling of `dest` to fill; renamed to `dest` only when the block completes (a
    failure removes it), so no half-written folder ever passes for complete. Temporaries of `dest`
    that killed runs left are removed first."""
    remove_stale_temporaries(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old)
    else:
        os.replace(tmp, dest)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` (`.NAME.tmp-PID.HEX.tmp`) to write any way; renamed to `path`
    when the block completes, removed when it fails. Temporaries of `path` that killed runs left are
    removed first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}.{secrets.token_hex(8)}.tmp")
    # Created as open() creates a file (0o666 less the umask; mkstemp's would be 0o600), since the
    # renamed file is the user's to share.
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write `text` beside `path`, then rename: no reader ever sees half a file."""
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
