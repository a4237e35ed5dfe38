"""Build an adapter from `adapter:` and attach it to the base model.

Every method but one is peft's own implementation (LoRA, DoRA, AdaLoRA, FourierFT, VeRA, IA3,
OFT); lmforge only chooses the modules and layers, checks the combination before training,
and supplies what peft leaves to the training loop (AdaLoRA's per-step rank update, LoRA+'s
optimizer, see `training/trainer.py`). Those adapters are saved in peft's format, loadable by
peft alone. MoE-DoRA is lmforge's own (`adapters/moe_dora.py`), with its own format.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from peft import (
    AdaLoraConfig,
    FourierFTConfig,
    IA3Config,
    LoraConfig,
    OFTConfig,
    PeftConfig,
    PeftModel,
    VeraConfig,
    get_peft_model,
    prepare_model_for_kbit_training,
)
from pydantic import ValidationError
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from lmforge.adapters.moe_dora import MoeDoraModel, MoeDoraSettings, is_moe_dora_folder
from lmforge.config.adapter import QUANTIZED_OK, AdapterConfig
from lmforge.distributed import is_main

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
# The same roles under other architectures' names: GPT-2/Falcon/Phi, T5 (q, k, v, o, wi, wo;
# wi_0, wi_1 in T5 v1.1 / Flan-T5), BART/MarianMT (q_proj, k_proj, v_proj, out_proj, fc1, fc2),
# the BERT family (query, key, value; DistilBERT q_lin, ...; its `dense` layers see _linear_names),
# vision towers (qkv, proj, fc1, fc2).
ATTENTION_ALT = (
    "c_attn",
    "query_key_value",
    "qkv_proj",
    "Wqkv",
    "dense",
    "c_proj",
    "out_proj",
    "q",
    "k",
    "v",
    "o",
    "qkv",
    "proj",
    "query",
    "key",
    "value",
    "query_proj",
    "key_proj",
    "value_proj",
    "q_lin",
    "k_lin",
    "v_lin",
    "out_lin",
    "attention.output.dense",
)
FFN_ALT = (
    "fc1",
    "fc2",
    "c_fc",
    "dense_h_to_4h",
    "dense_4h_to_h",
    "gate_up_proj",
    "w1",
    "w2",
    "w3",
    "wi",
    "wo",
    "wi_0",
    "wi_1",
    "lin1",
    "lin2",
    "ffn",
    "ffn_output",
    "intermediate.dense",
    "output.dense",
)
# Task heads and poolers: never adapted (a classification head trains whole, see peft_config).
HEADS = (
    "lm_head",
    "score",
    "classifier",
    "cls",
    "predictions",
    "generator_predictions",
    "generator_lm_head",
    "head",
    "pooler",
    "pre_classifier",
    "vocab_transform",
    "vocab_projector",
    "qa_outputs",
)
MINIMAL = ("q_proj", "v_proj", "query", "value", "q", "v", "query_proj", "value_proj", "q_lin", "v_lin")
# MoE-DoRA routes per token: its update depends on the input and cannot be merged.
MERGEABLE = {"lora", "dora", "adalora", "fourierft", "vera", "ia3", "oft", "vision_lora"}
VISION_TOWERS = ("visual", "vision_tower", "vision_model")
VISION_ATTENTION = ("qkv", "proj", "q_proj", "k_proj", "v_proj", "out_proj", "o_proj")
VISION_FFN = ("fc1", "fc2", "0", "2", "up_proj", "down_proj", "gate_proj")


def _is_linear(module: nn.Module) -> bool:
    """A plain or bitsandbytes-quantized linear layer (what every method here can wrap)."""
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def _body_linears(model: nn.Module) -> list[str]:
    """Full names of the linear layers outside the task heads (and a root-level `decoder` linear:
    ModernBERT's output projection; BART's `decoder` is a stack, not a linear layer)."""
    return [
        name
        for name, module in model.named_modules()
        if _is_linear(module) and not set(name.split(".")) & set(HEADS) and name != "decoder"
    ]


def _bert_style(names: list[str]) -> bool:
    """BERT and its kin name the attention output and both FFN layers `dense`."""
    return any(name.endswith(".intermediate.dense") for name in names)


def _linear_names(model: nn.Module) -> set[str]:
    """Suffixes of the linear layers outside the heads; in the BERT family `dense` is told apart
    as attention.output.dense, intermediate.dense and output.dense (FFN, see target_modules)."""
    body = _body_linears(model)
    names = {name.rsplit(".", 1)[-1] for name in body}
    if _bert_style(body):
        names.discard("dense")
        names |= {"attention.output.dense", "intermediate.dense", "output.dense"}
    return names


def target_modules(config: AdapterConfig, model: nn.Module) -> list[str]:
    """Module-name suffixes to wrap, checked against the model's linear layers."""
    present = _linear_names(model)
    wanted: tuple[str, ...]
    if config.preset == "custom":
        known = present | {name.rsplit(".", 1)[-1] for name in _body_linears(model)}
        missing = [m for m in config.target_modules if m not in known]
        if missing:
            raise ValueError(
                f"adapter.target_modules {missing} are not linear layers of this model; "
                f"its linear layers are: {', '.join(sorted(known))}"
            )
        return list(config.target_modules)
    if config.preset == "minimal":
        wanted = MINIMAL
    elif config.preset == "attention_only":
        wanted = ATTENTION + ATTENTION_ALT
    elif config.preset == "ffn_only":
        wanted = FFN + FFN_ALT
    else:
        return sorted(present)
    found = sorted(n for n in present if n in wanted)
    if not found:
        raise ValueError(
            f"adapter.preset `{config.preset}` found no matching layers in this model; its linear layers are "
            f"{', '.join(sorted(present))}: use preset: custom with target_modules"
        )
    if config.preset == "ffn_only" and "output.dense" in found:
        # peft matches suffixes and `output.dense` would take attention.output.dense too: the BERT
        # family's FFN output layers go by their full names.
        found.remove("output.dense")
        found += [
            name
            for name in _body_linears(model)
            if name.endswith(".output.dense") and not name.endswith(".attention.output.dense")
        ]
    return found


def _matches(name: str, targets: set[str]) -> bool:
    """peft's rule: a module is targeted when its name is a target or ends with `.target`."""
    return name in targets or any(name.endswith("." + target) for target in targets)


def _num_layers(model: PreTrainedModel) -> int:
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    count = getattr(text, "num_hidden_layers", None) or getattr(text, "num_layers", None)
    if not count:
        raise ValueError("adapter.layers needs the model's layer count, which its config does not give")
    return int(count)


PROJECTORS = ("merger", "multi_modal_projector", "mm_projector")


def vision_targets(config: AdapterConfig, model: nn.Module) -> list[str]:
    """Full names of the linear layers of the chosen parts (`adapter.vision_parts`) of a
    vision-language model: the vision tower's blocks (by preset and block), the projector, the
    language model (by preset); nothing else."""
    towers = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in VISION_TOWERS]
    if not towers:
        raise ValueError(
            "adapter.method vision_lora needs a vision-language model (e.g. Qwen2-VL); this model has no "
            f"vision tower (no module named {' / '.join(VISION_TOWERS)})"
        )
    tower = min(towers, key=len)
    linears = [name for name, module in model.named_modules() if _is_linear(module)]

    def is_projector(name: str) -> bool:
        return any(f".{p}." in f".{name}." for p in PROJECTORS)

    in_tower = [n for n in linears if n.startswith(tower + ".") and not is_projector(n)]
    chosen = []
    if "vision" in config.vision_parts:
        chosen += _vision_blocks(config, in_tower)
    if "projector" in config.vision_parts:
        projector = [n for n in linears if is_projector(n)]
        if not projector:
            raise ValueError(
                f"adapter.vision_parts has projector, but this model has no {' / '.join(PROJECTORS)} module"
            )
        chosen += projector
    if "language" in config.vision_parts:
        wanted = set(target_modules(config.model_copy(update={"method": "lora"}), model))
        chosen += [
            n
            for n in linears
            if not n.startswith(tower + ".")
            and not is_projector(n)
            and _matches(n, wanted)
            and n.rsplit(".", 1)[-1] not in ("lm_head", "score", "classifier")
        ]
    return chosen


def _vision_blocks(config: AdapterConfig, linears: list[str]) -> list[str]:
    blocks = {int(m.group(1)) for n in linears if (m := re.search(r"\.blocks\.(\d+)\.", n))}
    layers = config.layer_indices(len(blocks)) if blocks else None
    wanted = {
        "minimal": ("qkv", "q_proj", "v_proj"),
        "attention_only": VISION_ATTENTION,
        "ffn_only": VISION_FFN,
    }.get(config.preset)
    chosen = []
    for name in linears:
        suffix = name.rsplit(".", 1)[-1]
        if config.preset == "custom" and suffix not in config.target_modules:
            continue
        if wanted is not None and suffix not in wanted:
            continue
        block = re.search(r"\.blocks\.(\d+)\.", name)
        if layers is not None and (block is None or int(block.group(1)) not in layers):
            continue
        chosen.append(name)
    if not chosen:
        names = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(f"adapter: no vision-tower layer matches; its linear layers are {', '.join(names)}")
    return chosen


def peft_config(
    config: AdapterConfig,
    model: PreTrainedModel,
    total_steps: int | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> PeftConfig:
    """The peft config for `adapter:` on this model (targets and layers resolved and checked).

    `task_type` SEQ_CLS (reward models, classifiers) makes peft train and save the classification
    head (`score` / `classifier`) too; SEQ_2_SEQ_LM wraps an encoder-decoder; None (peft has no
    masked-LM task) a plain PeftModel, as for a BERT masked LM.
    """
    if config.method == "vision_lora":
        return LoraConfig(
            target_modules=vision_targets(config, model),
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            use_rslora=config.use_rslora,
            bias="none",
        )
    targets = target_modules(config, model)
    layers = config.layer_indices(_num_layers(model))
    common = {"target_modules": targets, "layers_to_transform": layers, "task_type": task_type}
    lora_like = {"r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "bias": "none"}
    if config.method in ("lora", "dora"):
        # PiSSA with 4 subspace iterations: the fast randomized SVD peft recommends for 7B models.
        init = "pissa_niter_4" if config.init == "pissa" else True
        return LoraConfig(
            **common,
            **lora_like,
            use_rslora=config.use_rslora,
            use_dora=config.method == "dora",
            init_lora_weights=init,
        )
    if config.method == "adalora":
        options = config.adalora
        if not total_steps:
            raise ValueError(
                "adapter.method adalora needs the number of training steps (set train.max_steps)"
            )
        if options.tinit >= total_steps - options.tfinal:
            raise ValueError(
                f"adapter.adalora: tinit ({options.tinit}) + tfinal ({options.tfinal}) leave no steps of "
                f"rank allocation in {total_steps} training steps; lower them"
            )
        return AdaLoraConfig(
            **common,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            bias="none",
            use_rslora=config.use_rslora,
            init_r=options.init_r,
            target_r=config.r,
            tinit=options.tinit,
            tfinal=options.tfinal,
            deltaT=options.delta_t,
            orth_reg_weight=options.orth_reg_weight,
            total_step=total_steps,
        )
    if config.method == "fourierft":
        return FourierFTConfig(
            **common,
            n_frequency=config.fourierft.n_frequency,
            scaling=config.fourierft.scaling,
            random_loc_seed=777,
        )
    if config.method == "vera":
        return VeraConfig(**common, r=config.r, vera_dropout=config.dropout, save_projection=True)
    if config.method == "ia3":  # adapter.layers is all (checked in AdapterConfig)
        feedforward = [t for t in targets if t in FFN + FFN_ALT]
        return IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type=task_type)
    if config.method == "oft":
        return OFTConfig(**common, r=config.r, oft_block_size=0, module_dropout=config.dropout)
    raise ValueError(f"adapter.method {config.method} has no peft adapter")


def moe_dora_settings(config: AdapterConfig, model: PreTrainedModel) -> MoeDoraSettings:
    """Where MoE-DoRA goes on this model (targets and layers resolved and checked) and its shape."""
    options = config.moe_dora
    return MoeDoraSettings(
        targets=adapted_modules(config, model),
        experts=options.experts,
        top_k=options.top_k,
        r=config.r,
        alpha=config.alpha,
        dropout=config.dropout,
        use_rslora=config.use_rslora,
        aux_loss_weight=options.aux_loss_weight,
        base_model=str(getattr(model.config, "_name_or_path", "") or ""),
    )


def prepare_base(
    model: PreTrainedModel, config: AdapterConfig, gradient_checkpointing: bool
) -> PreTrainedModel:
    """Check the adapter can train on this base; a quantized base gets peft's k-bit preparation."""
    quantized = getattr(model, "is_quantized", False)
    if quantized and config.init == "pissa":
        raise ValueError(
            "adapter.init pissa on a quantized base would re-quantize the residual weights; "
            "use model.quantization: none or adapter.init: default"
        )
    if quantized and config.method not in QUANTIZED_OK:
        raise ValueError(
            f"adapter.method {config.method} cannot train on a quantized base (peft has no 4/8-bit "
            f"layer for it); use model.quantization: none or one of {', '.join(sorted(QUANTIZED_OK))}"
        )
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return model


def expect_adalora() -> None:
    """peft's two false alarms about AdaLoRA, not shown once one is in use: a saved lora_A/lora_B
    with a zero dimension "looks like an ungathered ZeRO-3/FSDP shard", but AdaLoRA prunes ranks to
    zero by design; and the `rank_pattern` AdaLoRA wrote itself "matches no module" (its keys name
    the `lora_E` vectors, not modules)."""
    warnings.filterwarnings("ignore", message=r"Adapter .*LoRA tensor\(s\) have invalid shape")
    warnings.filterwarnings("ignore", message=r"The following rank_pattern keys did not match")


def attach_adapter(
    model: PreTrainedModel,
    config: AdapterConfig,
    gradient_checkpointing: bool,
    total_steps: int | None = None,
    init_dir: Path | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> PeftModel | MoeDoraModel:
    """Wrap `model` with a trainable adapter (QLoRA-style when the base is quantized).

    With PiSSA the base keeps only the residual of each weight; the initial adapter is saved to
    `init_dir` so the final one can be converted to a plain LoRA of the *original* base
    (`save_artifact` passes it to peft's `path_initial_model_for_weight_conversion`).
    """
    model = prepare_base(model, config, gradient_checkpointing)
    if config.method == "adalora":
        expect_adalora()
    if config.method == "moe_dora":
        if config.path:
            return MoeDoraModel.from_pretrained(model, config.path, is_trainable=True)
        return MoeDoraModel(model, moe_dora_settings(config, model))
    if config.path and is_moe_dora_folder(config.path):
        raise ValueError(f"adapter.path {config.path} is a MoE-DoRA adapter: set adapter.method: moe_dora")
    if config.path:
        return PeftModel.from_pretrained(model, config.path, is_trainable=True)
    wrapped = get_peft_model(model, peft_config(config, model, total_steps, task_type))
    if config.init == "pissa":
        if init_dir is None:
            raise ValueError("adapter.init pissa needs a folder for the initial adapter")
        wrapped.peft_config["default"].init_lora_weights = True  # saved as a plain-LoRA start
        if is_main():  # one writer when several processes run (each computes the same start)
            wrapped.save_pretrained(init_dir)
        wrapped.peft_config["default"].init_lora_weights = "pissa_niter_4"
    return wrapped


def adapted_modules(config: AdapterConfig, model: PreTrainedModel) -> list[str]:
    """Full names of the linear layers an adapter with this config wraps."""
    targets = set(target_modules(config, model))
    layers = config.layer_indices(_num_layers(model))
    found = []
    for name in _body_linears(model):
        if not _matches(name, targets):
            continue
        index = re.search(r"\.(?:layers|h|block|blocks|layer)\.(\d+)\.", name)
        if layers is None or (index is not None and int(index.group(1)) in layers):
            found.append(name)
    return found


def adapter_table(
    model_name_or_path: str, config: AdapterConfig, trust_remote_code: bool = False
) -> list[dict]:
    """Trainable parameters of every method on this model, counted on an empty (meta) copy.

    Only the model's config is read: no weights are loaded, so a 7B model costs nothing.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    rows = []
    for method in ("lora", "dora", "adalora", "moe_dora", "fourierft", "vera", "ia3", "oft", "vision_lora"):
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
        total = sum(p.numel() for p in model.parameters())
        adalora = {**config.adalora.model_dump(), "init_r": max(config.adalora.init_r, config.r)}
        try:
            # Validated: a combination AdapterConfig refuses (ia3 on some layers) is the row's error.
            method_config = AdapterConfig.model_validate(
                {**config.model_dump(), "method": method, "path": None, "adalora": adalora}
            )
            if method == "fourierft":
                # n_frequency coefficients per adapted matrix; building it would draw a random
                # permutation of every weight matrix (minutes for a 7B model) just to count.
                trainable = config.fourierft.n_frequency * len(adapted_modules(method_config, model))
            elif method == "moe_dora":
                wrapped = MoeDoraModel(model, moe_dora_settings(method_config, model))
                trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
            else:
                wrapped = get_peft_model(model, peft_config(method_config, model, total_steps=1000))
                trainable = sum(
                    p.numel()
                    for n, p in wrapped.named_parameters()
                    if p.requires_grad and "ranknum" not in n  # AdaLoRA's rank counter, not trained
                )
        except ValidationError as exc:
            rows.append({"method": method, "error": exc.errors()[0]["msg"].removeprefix("Value error, ")})
            continue
        except ValueError as exc:
            rows.append({"method": method, "error": str(exc)})
            continue
        rows.append(
            {
                "method": method,
                "trainable": trainable,
                "share": trainable / total,
                "mergeable": method in MERGEABLE,
                "quantized_base": method in QUANTIZED_OK,
            }
        )
    return rows


def final_adapter(model):
    """The trained adapter alone: the frozen reference copy ("ref") is not part of the result."""
    if not isinstance(model, MoeDoraModel) and "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")
    return model
