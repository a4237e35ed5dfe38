"""The fast kernels a run trains with (`train.kernels`, `train.compile`; docs/hardware.md).

Liger's Triton kernels (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE) are applied by the
transformers Trainer itself (`use_liger_kernel`), and torch.compile by its `torch_compile`: this
module only decides whether they can work here, and refuses with the reason when asked for
something that cannot.
"""

from __future__ import annotations

import importlib.util

from lmforge.config.train import TrainConfig


def liger_families() -> set[str]:
    """The model types Liger has kernels for (empty when liger-kernel is not installed)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return set()
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return set(MODEL_TYPE_TO_APPLY_LIGER_FN)


def liger_problem(device: str, model_type: str) -> str | None:
    """Why Liger's kernels cannot run for this model on `device`, or None when they can."""
    if device != "cuda":
        return f"Liger's kernels are Triton GPU kernels and this run is on {device}"
    families = liger_families()
    if not families:
        return "liger-kernel is not installed (pip install liger-kernel)"
    if model_type not in families:
        return f"Liger has no kernels for model type {model_type!r} (it covers {', '.join(sorted(families))})"
    return None


def use_liger(train: TrainConfig, device: str, model_type: str) -> bool:
    """train.kernels resolved: `liger` when it can work (refused with the reason when not), `auto`
    when it can work, `none` never."""
    if train.kernels == "none":
        return False
    problem = liger_problem(device, model_type)
    if problem is not None and train.kernels == "liger":
        raise ValueError(f"train.kernels is liger but {problem}; use train.kernels: auto or none")
    return problem is None


def model_type(model) -> str:
    """The transformers model type under any PEFT wrapper."""
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):
        config = model.get_base_model().config
    return getattr(config, "model_type", "") or ""


def set_kernels(args, train: TrainConfig, model) -> None:
    """train.kernels and train.compile into a stage's TrainingArguments `args` (before its Trainer
    is built: the Trainer applies Liger at construction and compiles when it wraps the model)."""
    import torch

    device = "cpu" if args.use_cpu else ("cuda" if torch.cuda.is_available() else "xpu")
    args.use_liger_kernel = use_liger(train, device, model_type(model))
    if train.compile:
        args.torch_compile, args.torch_compile_backend = True, "inductor"
