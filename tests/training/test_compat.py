"""training/compat.py against the installed trl and transformers: each seam lmforge relies on
still behaves as it did when checked (compat.CHECKED), so an upgrade fails here, not silently."""

from __future__ import annotations

import inspect

import pytest
import torch
import trl
from datasets import Dataset

from helpers import sft_config
from lmforge.config import validate_config
from lmforge.models.loading import load_tokenizer
from lmforge.training import compat
from lmforge.training.stage import load_model_for_training
from lmforge.training.trainer import build_trainer


@pytest.fixture
def trainer(tmp_path, base_dir, alpaca_file):
    config = validate_config(sft_config(base_dir, alpaca_file, tmp_path / "out"))
    tokenizer = load_tokenizer(config.model)
    model, hardware = load_model_for_training(config, quiet=True)
    rows = Dataset.from_list([{"input_ids": [1, 5, 6, 7], "labels": [-100, 5, 6, 7]}] * 4)
    return build_trainer(config, model, tokenizer, hardware, rows, None, "sft", quiet=True)


def test_logged_metrics_are_averaged_into_the_next_log_line(trainer):
    trainer.model.train()
    compat.log_metric(trainer, "train", "probe", 2.0)
    compat.log_metric(trainer, "train", "probe", 4.0)
    assert compat.pending_metrics(trainer, "train")["probe"] == [2.0, 4.0]
    trainer.log({"loss": 1.0})
    assert trainer.state.log_history[-1]["probe"] == 3.0
    assert "probe" not in compat.pending_metrics(trainer, "train")  # cleared after the line


def test_eval_metrics_are_logged_with_the_eval_prefix(trainer):
    trainer.model.eval()
    compat.log_metric(trainer, "eval", "probe", 5.0)
    trainer.log({"eval_loss": 1.0})
    assert trainer.state.log_history[-1]["eval_probe"] == 5.0


def test_model_loss_is_the_models_own_loss(trainer):
    model = trainer.model
    model.eval()
    batch = {
        "input_ids": torch.tensor([[1, 5, 6, 7]]),
        "attention_mask": torch.ones(1, 4, dtype=torch.long),
        "labels": torch.tensor([[-100, 5, 6, 7]]),
    }
    loss, outputs = compat.model_loss(trainer, model, batch)
    with torch.no_grad():
        assert loss.item() == pytest.approx(model(**batch).loss.item(), rel=1e-6)
    assert outputs.logits.shape[:2] == (1, 4)


@pytest.mark.parametrize("name", ["SFTTrainer", "DPOTrainer", "KTOTrainer", "GRPOTrainer", "RewardTrainer"])
def test_stable_trl_trainers_keep_metrics_per_mode(name):
    # log_metric and pending_metrics write trl's per-mode metric lists, which its `log` averages.
    cls = getattr(trl, name)
    assert "self._metrics = " in inspect.getsource(cls.__init__)
    assert "self._metrics[mode]" in inspect.getsource(cls.log)


def test_experimental_trainers_take_store_metrics():
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    for cls in (CPOTrainer, ORPOTrainer):
        assert "train_eval" in inspect.signature(cls.store_metrics).parameters


def test_a_trainer_without_metric_lists_is_refused():
    class Plain:
        pass

    with pytest.raises(TypeError, match="keeps no per-step metrics"):
        compat.log_metric(Plain(), "train", "probe", 1.0)


def test_losses_so_far_is_the_sum_the_final_train_loss_averages(trainer):
    """At every step's end: the sum of the per-step losses so far (logged lines plus the rest)."""
    from transformers import TrainerCallback

    seen: dict[int, float] = {}

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen[state.global_step] = compat.losses_so_far(trainer)

    trainer.args.logging_steps = 3  # the last steps are not drained into a logged line yet
    trainer.add_callback(Probe())
    result = trainer.train()
    steps = result.global_step
    assert steps == 8 and seen[steps] == pytest.approx(result.training_loss * steps, rel=1e-6)
    logged = [(row["step"], row["loss"]) for row in trainer.state.log_history if "loss" in row]
    windows, last = 0.0, 0
    for step, loss in logged:  # each line is the mean over its window of steps
        windows, last = windows + loss * (step - last), step
    assert last == 6 and seen[6] == pytest.approx(windows, rel=1e-5)
