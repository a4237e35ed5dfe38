"""What the libraries print that a lmforge command does not need, quieted once per process.

- transformers' per-file bars ("Loading weights", "Writing model shards") and datasets' map and
  filter bars (trl's "Tokenizing ...", "Filtering ..."): lmforge shows its own progress and the
  number of examples; `LMFORGE_LIBRARY_BARS=1` brings them back. Download bars
  (huggingface_hub) stay: a download is long and worth watching.
- bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community ... pip install
  kernels", logged whenever it is imported on an AVX512-BF16 CPU (every command that loads a
  model through peft): it then uses its own slower CPU kernel, which is what lmforge's CPU 4-bit
  support means anyway (docs/hardware.md).
(AdaLoRA's two false alarms are quieted where an AdaLoRA adapter is made: `adapters/build.py`.)
"""

from __future__ import annotations

import logging
import os

BNB_CPU_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"


def _not_the_kernels_hint(record: logging.LogRecord) -> bool:
    return "gemm_4bit_forward" not in str(record.msg)


def quiet_libraries() -> None:
    """Quiet the libraries' bars and the bitsandbytes kernel hint (see the module docstring)."""
    logger = logging.getLogger(BNB_CPU_KERNEL_LOGGER)  # the same logger bitsandbytes gets on import
    if _not_the_kernels_hint not in logger.filters:
        logger.addFilter(_not_the_kernels_hint)
    if os.environ.get("LMFORGE_LIBRARY_BARS") == "1":
        return
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
