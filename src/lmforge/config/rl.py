"""`method.rewards`, `method.sampling`, `method.grpo`, `method.ppo`: the online RL stages' options."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from lmforge.config.base import Section

BUILTIN_REWARDS = ("exact_answer", "think_format", "length", "regex")
_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class RewardSpec(Section):
    """One reward source: a built-in, a Python function (`module:function`) or a reward model."""

    builtin: Literal["exact_answer", "think_format", "length", "regex"] | None = Field(
        None,
        description="exact_answer (final answer == the record's reference field), think_format "
        "(<think>...</think> then an answer), length (penalty past target_tokens), regex (pattern found).",
    )
    function: str | None = Field(
        None, description="A user function `package.module:function` (signature in docs/rl.md)."
    )
    model: str | None = Field(
        None,
        description="A reward model folder (from method.name: reward) or a one-output sequence classifier; "
        "it may use its own tokenizer.",
    )
    weight: float = Field(1.0, description="Weight of this reward in the sum.")
    name: str | None = Field(None, description="Name in the logs (default: the builtin, function or folder).")
    field: str = Field("answer", description="exact_answer: the record field holding the reference answer.")
    pattern: str | None = Field(None, description="regex: the pattern to search the completion for.")
    target_tokens: int = Field(
        256, gt=0, description="length: completions up to this many tokens get 0; longer ones down to -1."
    )

    @model_validator(mode="after")
    def _one_source(self) -> RewardSpec:
        sources = [k for k in ("builtin", "function", "model") if getattr(self, k)]
        if len(sources) != 1:
            raise ValueError(
                "a reward needs exactly one of builtin, function, model "
                f"(got {', '.join(sources) or 'none'}), e.g. {{builtin: exact_answer}}"
            )
        if self.builtin == "regex":
            if not self.pattern:
                raise ValueError("builtin regex needs `pattern`, e.g. pattern: '^\\d+$'")
            try:
                re.compile(self.pattern)
            except re.error as error:
                raise ValueError(
                    f"pattern {self.pattern!r} is not a valid regular expression: {error}"
                ) from None
        if self.function and not _FUNCTION.match(self.function):
            raise ValueError(f"function {self.function!r} must look like package.module:function")
        return self

    @property
    def label(self) -> str:
        """The name used in logs (`rewards/<label>/mean`)."""
        if self.name:
            return self.name
        if self.builtin:
            return self.builtin
        if self.function:
            return self.function.rsplit(":", 1)[1]
        return "reward_model"


class SamplingOptions(Section):
    """How completions are sampled during online RL (KV cache on)."""

    num_generations: int = Field(
        8, ge=1, description="Completions per prompt (GRPO's group size; PPO: 1 or more)."
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(
        1.0, gt=0, le=1, description="Nucleus sampling: keep the top tokens with this much mass."
    )
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens (0: no limit).")
    max_completion_length: int = Field(256, gt=0, description="Most new tokens per completion.")
    use_vllm: bool = Field(False, description="Generate with vLLM (CUDA only; GRPO).")


class GrpoOptions(Section):
    """GRPO (Shao et al., 2024) through trl's GRPOTrainer."""

    beta: float = Field(
        0.0, ge=0, description="KL penalty to the reference (0: no reference model, as in DAPO/Dr. GRPO)."
    )
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo"] = Field(
        "dapo", description="trl's loss aggregation: grpo, dr_grpo, dapo (default), bnpo, cispo, sapo."
    )
    num_iterations: int = Field(
        1, ge=1, description="Optimisation passes over each batch of completions (mu)."
    )
    epsilon: float = Field(0.2, gt=0, description="Clipping range of the importance ratio.")
    epsilon_high: float | None = Field(
        None, gt=0, description="Upper clip (DAPO's clip-higher); unset: epsilon."
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="Divide advantages by the group's reward std (group), the batch's, or not (none).",
    )
    mask_truncated_completions: bool = Field(
        False, description="Leave completions cut at max_completion_length out of the loss."
    )


class PpoOptions(Section):
    """lmforge's PPO (InstructGPT-style RLHF; see methods/ppo.py for where it departs)."""

    critic: Literal["value_head", "separate"] = Field(
        "value_head",
        description="value_head: a scalar head on the policy's hidden states; separate: its own model "
        "(critic_model) with its own LoRA.",
    )
    critic_model: str | None = Field(
        None, description="The separate critic's base (default: the policy's base)."
    )
    kl_coef: float = Field(0.05, ge=0, description="Per-token KL penalty coefficient (initial, if adaptive).")
    kl_target: float | None = Field(
        None, gt=0, description="Adaptive KL controller's target KL per sequence (unset: fixed kl_coef)."
    )
    kl_horizon: int = Field(10000, gt=0, description="Adaptive KL controller's horizon (in samples).")
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1", description="Per-token KL estimate: k1 (log ratio) or k3."
    )
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    clip_range: float = Field(0.2, gt=0, description="Policy ratio clip.")
    clip_range_value: float = Field(0.2, gt=0, description="Value clip around the rollout's values.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight.")
    ppo_epochs: int = Field(4, ge=1, description="Optimisation passes over each rollout batch.")
    mini_batch_size: int = Field(8, ge=1, description="Completions per optimiser step within an epoch.")
    rollout_batch_size: int = Field(16, ge=1, description="Prompts sampled per rollout.")
    whiten_advantages: bool = Field(True, description="Normalise advantages to mean 0, std 1 per rollout.")
    missing_eos_penalty: float | None = Field(
        None, description="Subtract this from the score of completions that never stop (unset: no penalty)."
    )
