"""The memory report: the estimate against a hand computation, and the measured peaks a run logs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import sft_config
from lmforge.config.loader import validate_config
from lmforge.training.callbacks import estimate_memory, optimizer_state_bytes


@pytest.fixture
def head_only() -> LlamaForCausalLM:
    """1 layer, hidden 8, MLP 16, vocab 10, untied head; only the head (10 x 8) trains, fp32."""
    config = LlamaConfig(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    for name, param in model.named_parameters():
        param.requires_grad_(name == "lm_head.weight")
    return model


def test_estimate_matches_the_hand_computation(head_only):
    # parameters: embeddings 10*8 + q,k,v,o 4*8*8 + gate,up,down 3*8*16 + 3 norms of 8 + head 10*8
    assert sum(p.numel() for p in head_only.parameters()) == 80 + 256 + 384 + 24 + 80 == 824
    estimate = estimate_memory(head_only, "adamw_torch", batch_size=2, seq_len=5)
    assert estimate.weights == 824 * 4
    assert estimate.gradients == 80 * 4
    assert estimate.optimizer == 2 * 80 * 4  # exp_avg and exp_avg_sq
    tokens = 2 * 5
    layer = tokens * (11 * 8 + 4 * 16) * 4  # per layer: b x s x (11 x hidden + 4 x intermediate) x 4 bytes
    logits = tokens * 10 * (4 + 8)  # logits + the loss's fp32 copy and gradient
    assert estimate.activations == layer + logits == 6080 + 1200
    assert estimate.total == 3296 + 320 + 640 + 7280
    assert estimate.as_record()["estimated_peak_mb"] == round(11536 / 2**20, 1)

    checkpointed = estimate_memory(head_only, "adamw_torch", 2, 5, gradient_checkpointing=True)
    assert checkpointed.activations == tokens * 8 * 4 * 1 + layer + logits  # layer inputs + one layer

    head_only.to(torch.bfloat16)  # weights and activations at 2 bytes; the norms' fp32 copies extra
    half = estimate_memory(head_only, "adamw_torch", 2, 5)
    assert half.weights == 824 * 2
    assert half.activations == tokens * (152 * 2 + 2 * 8 * 4) + tokens * 10 * (2 + 8)


@pytest.mark.parametrize(
    ("spread", "expected"),
    [
        ({"strategy": "ddp"}, (800, 400, 1600)),
        ({"strategy": "deepspeed", "zero_stage": 2}, (800, 100, 400)),
        ({"strategy": "deepspeed", "zero_stage": 2, "offload": "optimizer"}, (800, 100, 0)),
        ({"strategy": "deepspeed", "zero_stage": 3}, (200, 100, 400)),
        ({"strategy": "deepspeed", "zero_stage": 3, "offload": "all"}, (0, 100, 0)),
        ({"strategy": "fsdp"}, (200, 100, 400)),
    ],
)
def test_each_process_holds_its_strategys_share(tmp_path, spread, expected):
    """(weights, gradients, optimizer) per process of 4, as docs/distributed.md's table says;
    activations are each process's own batch."""
    from lmforge.training.callbacks import MemoryEstimate

    train = validate_config(sft_config("m", "d.json", tmp_path, distributed=spread)).train
    estimate = MemoryEstimate(800, 400, 1600, 50).per_process(train.distributed, 4)
    assert (estimate.weights, estimate.gradients, estimate.optimizer, estimate.activations) == (*expected, 50)
    assert MemoryEstimate(800, 400, 1600, 50).per_process(train.distributed, 1).weights == 800


def test_a_zero3_partitioned_parameter_counts_at_its_whole_size(head_only):
    """DeepSpeed ZeRO-3 leaves each process an empty tensor and the size in ds_numel/ds_shape."""
    whole = estimate_memory(head_only, "adafactor")
    for param in head_only.parameters():
        param.ds_numel, param.ds_shape = param.numel(), param.shape
        param.data = torch.empty(0)
    partitioned = estimate_memory(head_only, "adafactor")
    assert (partitioned.weights, partitioned.gradients, partitioned.optimizer) == (
        whole.weights,
        whole.gradients,
        whole.optimizer,
    )


@pytest.mark.parametrize(
    ("optimizer", "momentum", "expected"),
    [
        ("adamw", False, 2 * 80 * 4),
        ("sophia", False, 2 * 80 * 4),
        ("lion", False, 80 * 4),
        ("sgd", False, 0),
        ("sgd", True, 80 * 4),
        ("adafactor", False, (10 + 8) * 4),  # a row (10) and a column (8) vector for the 10 x 8 head
        ("paged_adamw_8bit", False, 8 * 80),  # under 4096 elements bitsandbytes keeps 32-bit states
        ("muon", False, 2 * 80 * 4),  # the output head goes to Muon's AdamW part
    ],
)
def test_optimizer_states_per_optimizer(head_only, optimizer, momentum, expected):
    assert optimizer_state_bytes(head_only, optimizer, momentum) == expected


def test_large_matrices_get_8bit_and_muon_states():
    layer = nn.Linear(64, 64, bias=False)  # 4096 elements: 8-bit states; a hidden matrix: Muon
    assert optimizer_state_bytes(layer, "adamw_8bit") == 2 * 4096
    assert optimizer_state_bytes(layer, "muon") == 4096 * 4
    estimate = estimate_memory(layer, "adamw_torch")
    assert (estimate.weights, estimate.gradients, estimate.optimizer) == (16384, 16384, 32768)
    assert estimate.activations == 0  # no config to read the shapes from


def test_a_run_logs_measured_peaks(tmp_path, base_dir, alpaca_file, capsys):
    from lmforge.methods import sft

    config = validate_config(sft_config(base_dir, alpaca_file, tmp_path / "out", max_steps=2))
    result = sft.run(config)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["step"] == 2
    assert last["peak_rss_mb"] > 50  # the process, torch included
    assert 0 < last["estimated_peak_mb"] < last["peak_rss_mb"]
    parts = ("weights", "gradients", "optimizer", "activations")
    assert last["estimated_peak_mb"] == pytest.approx(sum(last[f"estimated_{p}_mb"] for p in parts), abs=0.25)
    assert ("peak_cuda_mb" in last) == torch.cuda.is_available()
    assert sum("peak_rss_mb" in row for row in rows) == 1 and "loss" in rows[0]
    printed = capsys.readouterr().err
    assert "memory: estimated peak ~" in printed and "memory: measured peak RSS (whole process)" in printed
    assert not (result.output_dir / "hardware.json").exists()  # hardware: manual writes none


def test_the_progress_bar_and_the_memory_lines_share_one_console(tmp_path, base_dir, alpaca_file, capsys):
    """The bar is drawn on the stream lmforge prints on (stderr) and is finished before the measured
    peaks are printed, so the memory line starts a line of its own instead of ending the bar's."""
    from lmforge.methods import sft

    config = sft_config(base_dir, alpaca_file, tmp_path / "out", max_steps=2, progress=True)
    sft.run(validate_config(config))
    captured = capsys.readouterr()
    assert "2/2 steps" not in captured.out, "the bar is not on stdout"
    lines = captured.err.splitlines()
    bar = max(i for i, line in enumerate(lines) if "2/2 steps" in line)
    measured = next(i for i, line in enumerate(lines) if "memory: measured" in line)
    assert bar < measured and lines[measured].startswith("memory: measured"), lines


def test_held_bytes_counts_this_processs_weights_and_optimizer_states(head_only):
    """Measured on the tensors: 824 fp32 weights; AdamW's two moments of the 80 trained ones
    (and its scalar step counter) once it has stepped."""
    from lmforge.training.callbacks import held_bytes

    optimizer = torch.optim.AdamW([p for p in head_only.parameters() if p.requires_grad])
    assert held_bytes(head_only, optimizer) == {"weights": 824 * 4, "optimizer": 0}
    head_only(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    wrapped = type("Wrapper", (), {"optimizer": optimizer})()  # as accelerate wraps it
    assert held_bytes(head_only, wrapped) == {"weights": 824 * 4, "optimizer": 2 * 80 * 4 + 4}
