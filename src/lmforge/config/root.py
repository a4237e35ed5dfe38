"""The whole run config: one section per concern."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PrivateAttr, model_validator

from lmforge.config.adapter import QUANTIZED_OK, AdapterConfig
from lmforge.config.base import Section
from lmforge.config.data import DataConfig
from lmforge.config.method import MethodConfig
from lmforge.config.model import ModelConfig
from lmforge.config.train import TrainConfig


class RunConfig(Section):
    method: MethodConfig = Field(default_factory=MethodConfig, description="Which stage to run.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="The adapter.")
    data: DataConfig = Field(default_factory=DataConfig, description="The data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training loop.")
    hardware: Literal["auto", "manual"] = Field(
        "manual",
        description="auto: fill in model.device/dtype/attn_implementation/quantization and train.optimizer "
        "from the GPU or CPU found (keys changed from their defaults are kept), print why and save "
        "hardware.json; manual: use the config as written.",
    )
    # What `hardware: auto` decided and detected (models.hardware.apply_hardware): run-time facts for
    # hardware.json, not a config key.
    _hardware_report: dict[str, Any] | None = PrivateAttr(None)

    @property
    def hardware_report(self) -> dict[str, Any] | None:
        """The `hardware: auto` report to save as hardware.json, or None (manual, or not applied)."""
        return self._hardware_report

    def with_hardware_report(self, report: dict[str, Any]) -> RunConfig:
        """A copy of this config carrying `report` (written beside config.yaml)."""
        copy = self.model_copy()
        copy._hardware_report = report
        return copy

    @model_validator(mode="after")
    def _stage_needs(self) -> RunConfig:
        if self.model.arch:
            if self.model.name_or_path:
                raise ValueError(
                    "give model.arch (build a new model) or model.name_or_path (load one), not both"
                )
            if self.method.name != "pretrain":
                raise ValueError(
                    f"model.arch builds a model with random weights: only method.name pretrain starts "
                    f"from one, not {self.method.name}; pre-train first, then point model.name_or_path at "
                    "its model/ folder"
                )
            if self.adapter.method != "none" or self.model.quantization != "none":
                raise ValueError(
                    "model.arch trains every weight of a new model: set adapter.method: none "
                    "and model.quantization: none"
                )
        elif not self.model.name_or_path:
            raise ValueError(
                "model.name_or_path is empty: give a local model folder or a hub id "
                "(or model.arch, a lab architecture YAML, to pre-train a new model)"
            )
        if not self.data.sources():
            raise ValueError(
                "data.path is empty: give a data file or folder, a registry name or a hub dataset id "
                "(or a list under data.datasets)"
            )
        if self.model.quantization != "none" and self.adapter.method == "none":
            raise ValueError(
                f"model.quantization is {self.model.quantization} but adapter.method is none: "
                "a quantized base cannot be trained directly; use adapter.method: lora (QLoRA)"
            )
        if self.model.quantization != "none":
            self._quantized_base()
        if self.adapter.method == "adalora":
            self._adalora()
        if self.adapter.loraplus_lr_ratio is not None and self.train.optimizer not in (
            "adamw",
            "adamw_torch",
            "adamw_torch_fused",
        ):
            raise ValueError(
                "adapter.loraplus_lr_ratio needs train.optimizer adamw_torch (LoRA+ builds AdamW)"
            )
        if self.train.optimizer == "sophia" and self.method.name not in ("sft", "pretrain"):
            raise ValueError(
                "train.optimizer sophia estimates its Hessian from the language-model loss: use it with "
                f"method.name sft or pretrain, not {self.method.name}"
            )
        return self

    def _quantized_base(self) -> None:
        if self.adapter.init == "pissa":
            raise ValueError(
                "adapter.init pissa on a quantized base would re-quantize the residual weights; "
                "use model.quantization: none or adapter.init: default"
            )
        if self.adapter.method not in QUANTIZED_OK:
            raise ValueError(
                f"adapter.method {self.adapter.method} cannot train on a quantized base (peft has no 4/8-bit "
                f"layer for it); use model.quantization: none or one of {', '.join(QUANTIZED_OK)}"
            )

    def _adalora(self) -> None:
        steps, options = self.train.max_steps, self.adapter.adalora
        if steps > 0 and options.tinit >= steps - options.tfinal:
            raise ValueError(
                f"adapter.adalora: tinit ({options.tinit}) + tfinal ({options.tfinal}) leave no steps of "
                f"rank allocation in train.max_steps={steps}; lower them"
            )
        if self.adapter.path and self.method.name in ("dpo", "orpo", "simpo", "kto", "grpo", "ppo"):
            raise ValueError(
                f"{self.method.name} cannot continue an AdaLoRA adapter (adapter.path): its frozen reference "
                "copy would be a second trainable AdaLoRA adapter, which peft refuses. Merge it first "
                "(lmforge merge) and train a new adapter on the merged model."
            )
