"""The one place lmforge touches `trl.experimental`: ORPO and SimPO (trl's CPOTrainer).

trl ships these two only as experimental APIs that may change between releases; everything
version-sensitive about them sits here. Checked against trl 1.16: both train conversational
prompt/chosen/rejected records with a peft adapter, and need no reference model.
"""

from __future__ import annotations

from lmforge.config.method import MethodConfig
from lmforge.training.preference import MoeAuxLoss


def orpo(method: MethodConfig, arguments: dict, max_length: int) -> tuple[type, object]:
    """(trainer class, its arguments) for ORPO (Hong et al., 2024): NLL on the chosen answer + beta
    (the paper's lambda) x odds-ratio term."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    class ForgeORPOTrainer(MoeAuxLoss, ORPOTrainer):
        pass

    return ForgeORPOTrainer, ORPOConfig(**arguments, beta=method.preference_beta, max_length=max_length)


def simpo(method: MethodConfig, arguments: dict, max_length: int) -> tuple[type, object]:
    """(trainer class, its arguments) for SimPO (Meng et al., 2024): length-normalized log-prob
    reward, target margin gamma, no reference.

    `method.sft_weight` is CPO's NLL weight (cpo_alpha); 0, SimPO as published, by default.
    """
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    class ForgeSimPOTrainer(MoeAuxLoss, CPOTrainer):
        pass

    return ForgeSimPOTrainer, CPOConfig(
        **arguments,
        loss_type="simpo",
        beta=method.preference_beta,
        simpo_gamma=method.gamma,
        cpo_alpha=method.sft_weight,
        max_length=max_length,
    )
