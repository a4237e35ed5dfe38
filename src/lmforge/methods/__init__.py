"""One driver per stage, and the one dispatcher that knows them all.

`run(config)` is what the CLI, the pipeline and Python callers use: it applies `hardware: auto`,
picks the driver of `method.name` (the image-text variant for a vision-language model, the
encoder-decoder one for a seq2seq model) and runs it. Drivers are imported when used, so the CLI
starts without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmforge.config import RunConfig
    from lmforge.training.stage import StageResult

SHARED = {"orpo": "dpo", "simpo": "dpo"}  # methods another method's driver runs; the rest: methods.<name>
VISION = {"sft": "sft_vision", "dpo": "dpo_vision", "orpo": "dpo_vision", "simpo": "dpo_vision"}
SEQ2SEQ = {"sft": "sft_seq2seq"}


def driver_name(config: RunConfig) -> str:
    """The module under `lmforge.methods` that runs this config."""
    from lmforge.models.loading import is_encoder_decoder, is_vision_language

    name = config.method.name
    if name in VISION and is_vision_language(config.model):
        return VISION[name]
    if name in SEQ2SEQ and is_encoder_decoder(config.model):
        return SEQ2SEQ[name]
    return SHARED.get(name, name)


def run(config: RunConfig, quiet: bool = False) -> StageResult:
    """Train one stage: `hardware: auto` filled in, then the stage's driver. Launched as one of
    several processes (docs/distributed.md), it joins their group first and prints only in the
    main one."""
    from lmforge import distributed
    from lmforge.models.hardware import apply_hardware, choose_hardware

    distributed.check_launch()
    quiet = quiet or not distributed.is_main()
    config = apply_hardware(config, quiet)  # hardware: auto fills in device, dtype, 4-bit, optimizer
    distributed.start(choose_hardware(config.model).device)
    return importlib.import_module(f"lmforge.methods.{driver_name(config)}").run(config, quiet)
