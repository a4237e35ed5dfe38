"""The base every config section derives from: typed, documented, strict."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: unknown keys are rejected, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# Names users bring from LLaMA-Factory, peft and transformers' TrainingArguments, and the lmforge
# key each means: "did you mean" offers the lmforge key for them (and for their typos).
ALIASES = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler_type": "scheduler",
    "optim": "optimizer",
    "lora_rank": "r",
    "lora_r": "r",
    "rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_target": "target_modules",
    "finetuning_type": "method",
    "model_name_or_path": "name_or_path",
    "cutoff_len": "max_length",
    "max_seq_length": "max_length",
    "dataset": "path",
    "preprocessing_num_workers": "num_proc",
    "dataset_num_proc": "num_proc",
}


def closest(word: str, known: Sequence[str]) -> str | None:
    """The known name a typo most likely meant (None when nothing is close): for "did you mean".
    A peer's name for a known key (`learning_rate`, `lora_rank`: ALIASES), or a typo of one,
    means that key."""
    candidates = {name: name for name in known}
    candidates |= {
        alias: key for alias, key in ALIASES.items() if key in candidates and alias not in candidates
    }
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return candidates[close[0]] if close else None
