"""The model lab: design a decoder from components, build it in Hugging Face format.

Importing this package registers `lmforge_lab` with transformers' Auto classes, so a saved lab
model loads with `AutoModelForCausalLM.from_pretrained(folder)` and no `trust_remote_code`.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from lmforge.lab.configuration import LabConfig
from lmforge.lab.modeling import LabForCausalLM, LabForSequenceClassification, LabModel


def register() -> None:
    """Register the lab classes with the Auto classes (idempotent)."""
    AutoConfig.register(LabConfig.model_type, LabConfig, exist_ok=True)
    AutoModel.register(LabConfig, LabModel, exist_ok=True)
    AutoModelForCausalLM.register(LabConfig, LabForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(LabConfig, LabForSequenceClassification, exist_ok=True)


register()

__all__ = ["LabConfig", "LabForCausalLM", "LabForSequenceClassification", "LabModel", "register"]
