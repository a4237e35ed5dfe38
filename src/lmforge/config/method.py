"""`method:` — which training stage to run, and the options of the preference methods."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmforge.config.base import Section
from lmforge.config.rl import GrpoOptions, PpoOptions, RewardSpec, SamplingOptions

PREFERENCE = ("dpo", "orpo", "simpo", "kto", "reward")
ONLINE = ("grpo", "ppo")
# The paper defaults: DPO, ORPO (its lambda) and KTO use 0.1; SimPO uses beta 2.0 (gamma 0.5 below).
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1}
# Which method reads which option (an option set for another method is an error, not ignored).
APPLIES = {
    "loss_type": ("dpo",),
    "beta": ("dpo", "orpo", "simpo", "kto"),
    "label_smoothing": ("dpo",),
    "sft_weight": ("dpo", "simpo"),
    "precompute_ref": ("dpo", "kto"),
    "gamma": ("simpo",),
    "desirable_weight": ("kto",),
    "undesirable_weight": ("kto",),
    "margin": ("reward",),
    "center_rewards": ("reward",),
    "rewards": ONLINE,
    "sampling": ONLINE,
    "samples_every": ONLINE,
    "grpo": ("grpo",),
    "ppo": ("ppo",),
    "document_boundaries": ("pretrain",),
    "distill": ("distill",),
    "mlm_probability": ("mlm",),
}


class DistillOptions(Section):
    """Knowledge distillation: a frozen teacher's token distributions taught to the student."""

    teacher: str = Field(..., description="Teacher model: a local folder or hub id (frozen).")
    teacher_adapter: str | None = Field(None, description="An adapter on top of the teacher (folder).")
    teacher_quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Load the teacher quantized with bitsandbytes (saves memory; CUDA for speed)."
    )
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl",
        description="forward_kl KL(teacher||student) (mean-seeking, Hinton's), reverse_kl "
        "KL(student||teacher) (mode-seeking), jsd (generalized Jensen-Shannon with jsd_beta).",
    )
    jsd_beta: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="jsd: the mixture weight (0.5 = the symmetric Jensen-Shannon divergence).",
    )
    temperature: float = Field(2.0, gt=0, description="Softens both distributions (loss scaled by T^2).")
    alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Weight of the distillation loss; 1 - alpha weights the hard-label cross-entropy.",
    )
    sequence_level: bool = Field(
        False,
        description="Sequence-level KD: the teacher answers each prompt (greedy) and the student is trained "
        "on those answers; works when teacher and student tokenizers differ.",
    )
    max_new_tokens: int = Field(128, gt=0, description="sequence_level: longest teacher answer.")


class MethodConfig(Section):
    name: Literal[
        "sft",
        "pretrain",
        "dpo",
        "orpo",
        "simpo",
        "kto",
        "reward",
        "grpo",
        "ppo",
        "distill",
        "mlm",
        "classify",
    ] = Field(
        "sft",
        description="Stage: sft (causal or seq2seq models), pretrain (causal LM on raw text), dpo, orpo, "
        "simpo (preference pairs), kto (unpaired good/bad answers), reward (a reward model from "
        "preference pairs), grpo, ppo (online RL on prompts with method.rewards), distill (a student "
        "learns a teacher's distributions), mlm (masked-LM on raw text), classify (sequence "
        "classification on text/label records).",
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid",
        description="DPO loss: sigmoid (the paper's), ipo, hinge (SLiC), robust (with label_smoothing).",
    )
    beta: float | None = Field(
        None,
        gt=0,
        description="Strength of the preference term: DPO/KTO deviation from the reference (0.1), ORPO's "
        "odds-ratio weight lambda (0.1), SimPO's reward scale (2.0). Unset: the method's default.",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Robust DPO: the assumed share of flipped preference labels."
    )
    sft_weight: float = Field(
        0.0, ge=0, description="Weight of an SFT (NLL on the chosen answer) term added to DPO or SimPO."
    )
    precompute_ref: bool = Field(
        False,
        description="DPO/KTO: compute the reference log-probs once before training (no reference "
        "forward per step).",
    )
    gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin.")
    desirable_weight: float = Field(1.0, gt=0, description="KTO: weight of the desirable examples' loss.")
    undesirable_weight: float = Field(1.0, gt=0, description="KTO: weight of the undesirable examples' loss.")
    margin: bool = Field(
        False,
        description="Reward model: subtract each pair's `margin` field from the score difference "
        "(records must carry `margin`).",
    )
    center_rewards: float | None = Field(
        None, ge=0, description="Reward model: weight of a term pulling mean rewards to zero (e.g. 0.01)."
    )

    document_boundaries: bool = Field(
        True,
        description="Pre-training: attention and position ids restart at every document inside a "
        "block (false: GPT-2 style, attention runs across documents joined by EOS).",
    )

    distill: DistillOptions | None = Field(
        None, description="Distillation: the teacher and the loss (required by method.name distill)."
    )
    mlm_probability: float = Field(
        0.15,
        gt=0,
        lt=1,
        description="Masked-LM: the share of tokens masked (BERT's 15%: 80% [MASK], 10% random, 10% kept).",
    )

    rewards: list[RewardSpec] = Field(
        default_factory=list,
        description="GRPO/PPO: reward sources summed with their weights, e.g. "
        "[{builtin: exact_answer}, {builtin: think_format, weight: 0.5}, {model: runs/reward/reward}].",
    )
    sampling: SamplingOptions = Field(
        default_factory=SamplingOptions, description="GRPO/PPO: how completions are sampled."
    )
    samples_every: int = Field(
        10, ge=0, description="GRPO/PPO: write sampled completions to samples/ every N steps (0: never)."
    )
    grpo: GrpoOptions = Field(default_factory=GrpoOptions, description="GRPO's options.")
    ppo: PpoOptions = Field(default_factory=PpoOptions, description="PPO's options.")

    @model_validator(mode="after")
    def _options_of_this_method(self) -> MethodConfig:
        defaults = type(self).model_fields
        for option, methods in APPLIES.items():
            default = defaults[option].get_default(call_default_factory=True)
            if self.name not in methods and getattr(self, option) != default:
                raise ValueError(
                    f"method.{option} applies to {'/'.join(methods)}, not method.name {self.name}; remove it"
                )
        if self.name == "distill" and self.distill is None:
            raise ValueError(
                "method.name distill needs method.distill with a teacher, e.g. "
                "distill: {teacher: runs/big/model}"
            )
        if self.name in ONLINE and not self.rewards:
            raise ValueError(
                f"method.name {self.name} needs method.rewards, e.g. rewards: [{{builtin: exact_answer}}]"
            )
        labels = [r.label for r in self.rewards]
        if len(set(labels)) != len(labels):
            raise ValueError(f"method.rewards names repeat ({labels}); give each a distinct `name`")
        if self.label_smoothing and self.loss_type != "robust":
            raise ValueError(
                "method.label_smoothing applies to loss_type robust; set method.loss_type: robust"
            )
        return self

    @property
    def preference_beta(self) -> float:
        """beta, or the method's default."""
        return self.beta if self.beta is not None else DEFAULT_BETA[self.name]
