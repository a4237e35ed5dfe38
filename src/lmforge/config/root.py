"""The whole run config: one section per concern."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PrivateAttr, model_validator

from lmforge.config.adapter import AdapterConfig
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
