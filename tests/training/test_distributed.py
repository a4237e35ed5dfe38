"""Several processes (docs/distributed.md): 2 CPU processes on gloo, launched by torch's elastic
launcher (`lmforge train --nproc 2`), train exactly as one process with the same global batch;
only the main process prints and writes; a run killed with kill -9 resumes to the uninterrupted
run's result; two launchers on one machine posing as two nodes train as one 2-process run; and the
launches that would silently train alone, or shard nothing, are refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import sft_config
from lmforge import distributed
from lmforge.config import validate_config
from lmforge.training.checkpoints import complete_checkpoints, mark_complete, resolve_resume

STEPS = 24  # x 4 examples per step = 96 of the 100 records: no batch wraps around
TOLERANCE = 1e-5  # all-reduce sums in another order than one process's batch: ~1e-7 relative


def write_config(tmp_path: Path, base_dir: Path, data: Path, name: str, full: bool = False, **train) -> Path:
    """An SFT config of STEPS steps, LoRA or (`full`) a full fine-tune."""
    config = sft_config(base_dir, data, tmp_path / name, max_steps=STEPS, **train)
    if full:
        config["adapter"] = {"method": "none"}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def lmforge(*args: str, extra_env: dict | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "lmforge", "train", *args]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def finished(process: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def losses(output_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def adapter(output_dir: Path) -> dict[str, torch.Tensor]:
    """The trained weights saved: the adapter's, or a full fine-tune's whole model."""
    if (output_dir / "model").exists():
        return load_file(output_dir / "model" / "model.safetensors")
    return load_file(output_dir / "adapter" / "adapter_model.safetensors")


def update_rows(output_dir: Path) -> list[dict]:
    """metrics.jsonl's rows of training steps (the memory report's row aside)."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row]


def assert_same_weights(a: Path, b: Path, tolerance: float = TOLERANCE) -> None:
    first, second = (load_file(folder / "adapter_model.safetensors") for folder in (a, b))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=tolerance, atol=tolerance)


def assert_same_run(a: Path, b: Path) -> None:
    assert len(losses(a)) == STEPS
    assert losses(a) == pytest.approx(losses(b), rel=TOLERANCE, abs=TOLERANCE)
    first, second = adapter(a), adapter(b)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=TOLERANCE, atol=TOLERANCE)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, base_dir, alpaca_file) -> Path:
    """One process, 4 examples per step."""
    tmp_path = tmp_path_factory.mktemp("one")
    finished(lmforge(str(write_config(tmp_path, base_dir, alpaca_file, "run", batch_size=4))))
    return tmp_path / "run"


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, base_dir, alpaca_file) -> tuple[Path, str]:
    """Two processes of 2 examples each per step, checkpointing every 4 steps."""
    tmp_path = tmp_path_factory.mktemp("two")
    config = write_config(tmp_path, base_dir, alpaca_file, "run", batch_size=2, save_steps=4)
    output = finished(lmforge(str(config), "--nproc", "2"))
    return tmp_path / "run", output


@pytest.mark.xdist_group("distributed")
def test_two_processes_train_as_one_with_the_same_global_batch(one_process, two_processes) -> None:
    """Every step's loss and the final adapter, within all-reduce rounding; the token accuracy
    logged is over both processes' tokens."""
    output_dir, _ = two_processes
    assert_same_run(output_dir, one_process)
    accuracy = [row["mean_token_accuracy"] for row in update_rows(output_dir)]
    assert accuracy == pytest.approx([row["mean_token_accuracy"] for row in update_rows(one_process)])
    marker = json.loads((complete_checkpoints(output_dir)[-1] / "LMFORGE_COMPLETE").read_text())
    assert marker["world_size"] == 2
    assert {p.name for p in complete_checkpoints(output_dir)[-1].glob("rng_state_*.pth")} == {
        "rng_state_0.pth",
        "rng_state_1.pth",
    }  # marked complete with both processes' parts in it


@pytest.mark.xdist_group("distributed")
def test_only_the_main_process_prints(two_processes) -> None:
    _, output = two_processes
    assert "launching: torchrun --nproc-per-node=2 --standalone -m lmforge train" in output
    for line in ("train data:", "parameters:", "saved adapter", "done: 24 steps"):
        assert output.count(line) == 1, line
    # The global batch: per process x processes x accumulation.
    assert output.count("batch: 2 per process x 2 processes x 1 accumulation = 4 examples per step") == 1
    assert "error" not in output


@pytest.mark.xdist_group("distributed")
def test_a_killed_two_process_run_resumes_to_the_uninterrupted_result(
    tmp_path, base_dir, alpaca_file, two_processes
) -> None:
    """kill -9 of the launcher and both processes once step 4's checkpoint is complete (20 steps
    before the end); the same command again resumes there (train.resume: auto) and ends as the run
    that was never killed."""
    config = write_config(tmp_path, base_dir, alpaca_file, "run", batch_size=2, save_steps=4)
    killed = lmforge(str(config), "--nproc", "2")
    kill_after_first_checkpoint(killed, tmp_path / "run")
    output = finished(lmforge(str(config), "--nproc", "2"))
    assert "resuming from" in output and output.count("resuming from") == 1
    assert_same_run(tmp_path / "run", two_processes[0])


def kill_after_first_checkpoint(killed: subprocess.Popen, output_dir: Path) -> None:
    """kill -9 the launcher and every process it started once a checkpoint is complete."""
    deadline = time.monotonic() + 300
    while not complete_checkpoints(output_dir) and killed.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    # Every process of the job at once, as a scheduler kills it: torchrun starts its workers in
    # sessions of their own, so they are not in the launcher's process group.
    job = [killed.pid, *(child.pid for child in psutil.Process(killed.pid).children(recursive=True))]
    for pid in job:
        os.kill(pid, signal.SIGKILL)
    killed.communicate()
    assert not (output_dir / "adapter").exists()  # killed before the end


def addition_pairs(tmp_path: Path) -> Path:
    """100 preference pairs: the right sum chosen, one more rejected."""
    pairs = [
        {"instruction": f"add {a} and {b}", "chosen": str(a + b), "rejected": str(a + b + 1)}
        for a in range(10)
        for b in range(10)
    ]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(pairs))
    return path


@pytest.mark.xdist_group("distributed")
def test_dpo_on_two_processes_trains_as_one_with_the_same_global_batch(tmp_path, base_dir) -> None:
    """The preference stages' shared tail under DDP: DPO's losses and adapter, within rounding."""
    data = addition_pairs(tmp_path)
    runs = {}
    for name, batch, launch in (("one", 4, []), ("two", 2, ["--nproc", "2"])):
        config = sft_config(base_dir, data, tmp_path / name, max_steps=STEPS, lr=5e-3, batch_size=batch)
        config["method"] = {"name": "dpo"}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        finished(lmforge(str(path), *launch))
        runs[name] = tmp_path / name
    assert_same_run(runs["two"], runs["one"])


@pytest.mark.xdist_group("distributed")
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_zero_on_two_processes_trains_as_one(
    tmp_path, base_dir, alpaca_file, one_process, zero_stage
):
    """DeepSpeed's CPU backend (gloo): ZeRO-2 shards gradients and optimizer states, ZeRO-3 the
    parameters too (the adapter is gathered from both processes to be saved)."""
    pytest.importorskip("deepspeed", reason="pip install 'lmforge[deepspeed]' (make test installs it)")
    spread = {"strategy": "deepspeed", "zero_stage": zero_stage}
    config = write_config(tmp_path, base_dir, alpaca_file, "run", batch_size=2, distributed=spread)
    output = finished(lmforge(str(config), "--nproc", "2"))
    assert output.count("done: 24 steps") == 1
    assert_same_run(tmp_path / "run", one_process)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.xdist_group("distributed")
def test_two_launchers_as_two_nodes_train_as_one_two_process_run(
    tmp_path, base_dir, alpaca_file, two_processes
) -> None:
    config = write_config(tmp_path, base_dir, alpaca_file, "run", batch_size=2, save_steps=4)
    where = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    nodes = [lmforge(str(config), *where, "--node-rank", str(rank)) for rank in (0, 1)]
    outputs = [finished(node) for node in nodes]
    assert "--nnodes=2 --node-rank=0 --master-addr=127.0.0.1" in outputs[0]
    assert "done: 24 steps" in outputs[0] and "done:" not in outputs[1]  # node 1 holds rank 1 only
    assert_same_run(tmp_path / "run", two_processes[0])


def test_resuming_with_another_number_of_processes_is_refused(tmp_path, monkeypatch) -> None:
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    monkeypatch.setenv("WORLD_SIZE", "2")
    mark_complete(checkpoint, 4, "run")
    assert resolve_resume(tmp_path, "auto", "run") == str(checkpoint)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match=r"written by 2 process\(es\) and this run has 1.*--nproc 2"):
        resolve_resume(tmp_path, "auto", "run")
    with pytest.raises(ValueError, match="written by 2"):
        resolve_resume(tmp_path, str(checkpoint), "run")


def test_a_launch_that_started_one_process_of_several_is_refused(monkeypatch) -> None:
    """`accelerate launch --cpu --num_processes 2` sets these and starts one process."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"started one process.*--multi_gpu --num_processes N"):
        distributed.check_launch()
    monkeypatch.setenv("WORLD_SIZE", "2")  # its multi-process launcher sets WORLD_SIZE
    distributed.check_launch()


def test_rank_and_device_come_from_the_launcher(monkeypatch) -> None:
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.device_for("cuda") == "cuda"
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert not distributed.is_main() and distributed.device_for("cuda") == "cuda:1"
    assert distributed.device_for("cpu") == "cpu"


@pytest.mark.parametrize(
    ("spread", "message"),
    [
        ({"strategy": "ddp", "offload": "optimizer"}, "offload applies to strategy fsdp or deepspeed"),
        ({"strategy": "fsdp", "zero_stage": 3}, "zero_stage and config_file apply to strategy deepspeed"),
        ({"strategy": "fsdp", "offload": "optimizer"}, "FSDP2 offloads parameters"),
        ({"strategy": "deepspeed", "offload": "all"}, "needs zero_stage 3"),
        ({"strategy": "ddp", "fsdp": {"reshard_after_forward": False}}, "fsdp applies to strategy fsdp"),
        ({"strategy": "nccl"}, "strategy"),
    ],
)
def test_distributed_settings_that_do_not_go_together_are_refused(tmp_path, spread, message) -> None:
    raw = sft_config(Path("m"), Path("d.json"), tmp_path, distributed=spread)
    with pytest.raises(Exception, match=message):
        validate_config(raw)


def test_fsdp2_settings_and_deepspeed_without_the_package_refused_with_the_fix(tmp_path, monkeypatch):
    from lmforge.models.hardware import Hardware
    from lmforge.training.trainer import distributed_arguments

    cpu = Hardware(device="cpu", dtype=torch.float32, attn_implementation="sdpa", reasons=[])
    spread = {"strategy": "fsdp", "offload": "all", "fsdp": {"reshard_after_forward": False}}
    fsdp = validate_config(sft_config(Path("m"), Path("d"), tmp_path, distributed=spread))
    cuda = Hardware(device="cuda", dtype=torch.bfloat16, attn_implementation="sdpa", reasons=[])
    arguments = distributed_arguments(fsdp.train, cuda)
    assert arguments["fsdp"] is True and arguments["fsdp_config"]["version"] == 2
    assert arguments["fsdp_config"]["cpu_offload"] is True
    assert arguments["fsdp_config"]["reshard_after_forward"] is False  # the user's own keys win
    zero = {"strategy": "deepspeed", "zero_stage": 3, "offload": "all"}
    deepspeed = validate_config(sft_config(Path("m"), Path("d"), tmp_path, distributed=zero))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match=r"pip install 'lmforge\[deepspeed\]'"):
        distributed_arguments(deepspeed.train, cpu)


def test_the_deepspeed_config_leaves_batch_and_precision_to_train(tmp_path) -> None:
    from lmforge.training.trainer import deepspeed_config

    zero = {"strategy": "deepspeed", "zero_stage": 3, "offload": "all"}
    spread = validate_config(sft_config(Path("m"), Path("d"), tmp_path, distributed=zero)).train.distributed
    config = deepspeed_config(spread)
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert config["train_micro_batch_size_per_gpu"] == "auto" and config["bf16"] == {"enabled": "auto"}


@pytest.mark.xdist_group("distributed")
def test_fsdp2_on_two_processes_trains_lora_as_one_and_resumes_from_its_shards(
    tmp_path, base_dir, alpaca_file, one_process
) -> None:
    """FSDP2 (torch's fully_shard, on gloo): each process holds half of every parameter; its
    checkpoints are sharded (one file per process, torch.distributed.checkpoint). Killed with
    kill -9 after the first, the run resumes from the shards to the one-process result."""
    spread = {"strategy": "fsdp"}
    config = write_config(
        tmp_path, base_dir, alpaca_file, "run", batch_size=2, save_steps=4, distributed=spread
    )
    kill_after_first_checkpoint(lmforge(str(config), "--nproc", "2"), tmp_path / "run")
    shards = complete_checkpoints(tmp_path / "run")[0] / "pytorch_model_fsdp_0"
    assert {p.name for p in shards.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    output = finished(lmforge(str(config), "--nproc", "2"))
    assert output.count("resuming from") == 1 and output.count("done: 24 steps") == 1
    assert_same_run(tmp_path / "run", one_process)


@pytest.mark.xdist_group("distributed")
def test_fsdp2_on_two_processes_trains_a_full_fine_tune_as_one(tmp_path, base_dir, alpaca_file) -> None:
    """Every weight of the model sharded, trained and gathered into one model.safetensors."""
    for name, batch, launch in (("one", 4, []), ("two", 2, ["--nproc", "2"])):
        spread = {"strategy": "fsdp" if launch else "ddp"}
        config = write_config(
            tmp_path, base_dir, alpaca_file, name, full=True, batch_size=batch, lr=1e-4, distributed=spread
        )
        finished(lmforge(str(config), *launch))
    assert_same_run(tmp_path / "two", tmp_path / "one")


def test_qlora_weights_are_stored_so_fsdp2_and_zero3_can_shard_them(tmp_path) -> None:
    """4-bit weights are stored in the compute dtype when the strategy shards parameters (uint8
    otherwise); 8-bit weights, which cannot be sharded, are refused with the choices that work."""
    from lmforge.models.hardware import Hardware
    from lmforge.models.loading import quantization_config
    from lmforge.training.stage import check_stage

    cuda = Hardware(device="cuda", dtype=torch.bfloat16, attn_implementation="sdpa", reasons=[])
    for spread, storage in (({"strategy": "ddp"}, torch.uint8), ({"strategy": "fsdp"}, torch.bfloat16)):
        raw = sft_config(Path("m"), Path("d"), tmp_path, distributed=spread)
        raw["model"]["quantization"] = "4bit"
        config = validate_config(raw)
        sharded = config.train.distributed.shards_parameters
        assert quantization_config(config.model, cuda, sharded).bnb_4bit_quant_storage == storage
    zero3 = {"strategy": "deepspeed", "zero_stage": 3}
    raw = sft_config(Path("m"), Path("d"), tmp_path, distributed=zero3)
    raw["model"]["quantization"] = "8bit"
    with pytest.raises(ValueError, match="8bit cannot be sharded.*quantization 4bit.*or strategy ddp"):
        check_stage(validate_config(raw))


@pytest.mark.xdist_group("distributed")
def test_grpo_on_two_processes_trains_on_one_process_prompts_and_logs_every_completion(
    tmp_path, base_dir, alpaca_file
) -> None:
    """GRPO samples on each process with a seed of its own (trl: so that a prompt's group split
    over processes gets distinct completions), so its losses cannot equal one process's. What can:
    each step's prompts are the one-process run's; the logged reward is the mean over every
    process's completions; samples.jsonl holds them all (4 per process here)."""
    runs = {}
    for name, batch, launch in (("one", 8, []), ("two", 4, ["--nproc", "2"])):
        raw = sft_config(base_dir, alpaca_file, tmp_path / name, max_steps=4, lr=5e-3, batch_size=batch)
        raw["method"] = {
            "name": "grpo",
            "rewards": [{"builtin": "regex", "pattern": "[aeiou]"}],
            "sampling": {"num_generations": 4, "max_completion_length": 8},
            "samples_every": 1,
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        output = finished(lmforge(str(path), *launch))
        assert output.count("done: 4 steps") == 1
        samples = [json.loads(line) for line in (tmp_path / name / "samples.jsonl").read_text().splitlines()]
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = samples, {row["step"]: row["reward"] for row in rows if "reward" in row}
    (one, _), (two, logged) = runs["one"], runs["two"]
    for step in range(1, 5):
        ones = [s for s in one if s["step"] == step]
        twos = [s for s in two if s["step"] == step]
        assert len(twos) == len(ones) == 8
        assert sorted(s["prompt"] for s in twos) == sorted(s["prompt"] for s in ones)
        assert logged[step] == pytest.approx(sum(s["total"] for s in twos) / 8)


@pytest.mark.xdist_group("distributed")
def test_a_ppo_update_on_two_processes_equals_one_on_the_whole_rollout(tmp_path, base_dir) -> None:
    """lmforge's own PPO loop: the same fixed rollout of 8 completions, all in one process or 4 in
    each of two. Advantages whitened over all 8, gradients averaged by DDP, statistics averaged:
    the update's loss, KL, reward and the trained adapter and value head agree within rounding."""
    worker = Path(__file__).parent / "ppo_update_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone"]
    for name, command in (("one", [sys.executable]), ("two", launch)):
        done = subprocess.run(
            [*command, str(worker), str(base_dir), str(tmp_path / name)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    for key in ("loss", "policy_loss", "value_loss", "kl", "reward", "reward_std", "grad_norm"):
        assert two[key] == pytest.approx(one[key], rel=TOLERANCE, abs=TOLERANCE), key
    first, second = (load_file(tmp_path / f"{name}.safetensors") for name in ("one", "two"))
    assert first.keys() == second.keys() and len(first) > 0
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.xdist_group("distributed")
def test_ppo_on_two_processes_logs_every_completion_and_resumes_each_processs_state(
    tmp_path, base_dir, alpaca_file
) -> None:
    """The whole loop on 2 processes: each rolls out 2 of the 4 prompts of an update, samples.jsonl
    holds all 8 completions, 2 optimizer steps per epoch (mini-batches of 4 over both processes),
    checkpoints hold both processes' random states, and a run resumed from checkpoint-2 ends as the
    uninterrupted one."""
    raw = sft_config(base_dir, alpaca_file, tmp_path / "full", max_steps=4, lr=5e-3, batch_size=2)
    raw["train"]["save_steps"] = 2
    raw["method"] = {
        "name": "ppo",
        "rewards": [{"builtin": "regex", "pattern": "[aeiou]"}],
        "sampling": {"num_generations": 2, "max_completion_length": 8},
        "samples_every": 1,
        "ppo": {"rollout_batch_size": 4, "mini_batch_size": 4, "ppo_epochs": 2},
    }
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(raw))
    output = finished(lmforge(str(path), "--nproc", "2"))
    assert output.count("done: 4 steps") == 1
    full = tmp_path / "full"
    samples = [json.loads(line) for line in (full / "samples.jsonl").read_text().splitlines()]
    assert [sum(s["step"] == step for s in samples) for step in range(1, 5)] == [8, 8, 8, 8]
    assert len({s["prompt"] for s in samples if s["step"] == 1}) == 4
    checkpoint = full / "checkpoint-2"
    assert json.loads((checkpoint / "loop.json").read_text())["optimizer_step"] == 2 * 2 * 2
    assert {p.name for p in checkpoint.glob("rng_*.pt")} == {"rng_0.pt", "rng_1.pt"}

    resumed = tmp_path / "resumed"  # an interrupted run: only checkpoint-2 survived
    shutil.copytree(checkpoint, resumed / "checkpoint-2")
    raw["train"]["output_dir"] = str(resumed)
    path.write_text(yaml.safe_dump(raw))
    assert "resuming from" in finished(lmforge(str(path), "--nproc", "2"))
    last, again = (update_rows(folder) for folder in (full, resumed))
    assert [row["step"] for row in again] == [3, 4]
    for key in ("loss", "reward", "kl", "value_loss"):
        assert again[-1][key] == pytest.approx(last[-1][key], rel=TOLERANCE, abs=TOLERANCE), key
    assert_same_weights(full / "adapter", resumed / "adapter")


def test_ppo_settings_that_cannot_split_over_the_processes_are_refused(tmp_path, monkeypatch) -> None:
    from lmforge.methods.ppo import check

    raw = sft_config(Path("m"), Path("d.json"), tmp_path)
    raw["method"] = {"name": "ppo", "rewards": [{"builtin": "length"}], "sampling": {"num_generations": 2}}
    raw["method"]["ppo"] = {"rollout_batch_size": 3, "mini_batch_size": 2}
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"split over the 2 processes: make both multiples of 2"):
        check(validate_config(raw))
    raw["method"]["ppo"] = {"rollout_batch_size": 4, "mini_batch_size": 4}
    check(validate_config(raw))
    raw["train"]["distributed"] = {"strategy": "deepspeed"}
    with pytest.raises(ValueError, match="ppo's own loop runs on several processes as DDP"):
        check(validate_config(raw))


# Where a stage's own statistics are per process, its 2-process run is close to one process but
# not equal: (losses' relative tolerance, the weights' difference relative to their norm). trl's
# ORPO averages its NLL term over each process's tokens, then over the processes, instead of over
# the batch's tokens; trl's KTO pairs completions with mismatched prompts for its KL estimate
# within each process's batch. Their losses differ by a few 1e-5; Adam's steps on the adapter's
# near-zero gradients turn that into ~2.5% (ORPO) of the weights after 8 steps.
CLOSE = {"orpo": (1e-3, 5e-2), "kto": (1e-3, 5e-2)}


@pytest.mark.xdist_group("distributed")
@pytest.mark.parametrize("method", ["orpo", "simpo", "kto", "reward", "distill"])
def test_the_other_trainer_stages_on_two_processes_train_as_one(tmp_path, base_dir, alpaca_file, method):
    """The rest of the Trainer stages through the same head and tail: losses and trained weights of
    8 steps, 2 processes x batch 2 against 1 x batch 4 (within CLOSE where the stage's own
    statistics are per process)."""
    data = alpaca_file if method == "distill" else addition_pairs(tmp_path)
    runs = {}
    for name, batch, launch in (("one", 4, []), ("two", 2, ["--nproc", "2"])):
        raw = sft_config(base_dir, data, tmp_path / name, max_steps=8, lr=5e-3, batch_size=batch)
        raw["method"] = {"name": method}
        if method == "distill":
            raw["method"]["distill"] = {"teacher": str(base_dir)}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        finished(lmforge(str(path), *launch))
        runs[name] = tmp_path / name
    assert len(losses(runs["two"])) == 8
    folder = "reward" if method == "reward" else "adapter"
    if method not in CLOSE:
        assert losses(runs["two"]) == pytest.approx(losses(runs["one"]), rel=TOLERANCE, abs=TOLERANCE)
        assert_same_weights(runs["two"] / folder, runs["one"] / folder, 1e-4)  # Adam amplifies rounding
        return
    loss_close, weights_close = CLOSE[method]
    assert losses(runs["two"]) == pytest.approx(losses(runs["one"]), rel=loss_close)
    first, second = (load_file(runs[name] / folder / "adapter_model.safetensors") for name in ("one", "two"))
    for key in first:
        assert (second[key] - first[key]).norm() <= weights_close * first[key].norm(), key


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny random BERT (2 layers, hidden 64) with its pre-training heads."""
    from conftest import corpus
    from lmforge.models.tiny import build_tiny_bert, build_tiny_encoder_tokenizer, save_tiny

    tokenizer = build_tiny_encoder_tokenizer(corpus(), vocab_size=320)
    return save_tiny(build_tiny_bert(tokenizer), tokenizer, tmp_path_factory.mktemp("tiny-bert"))


def encoder_config(bert_dir: Path, data: Path, output_dir: Path, method: str, batch: int) -> dict:
    return {
        "model": {"name_or_path": str(bert_dir)},
        "method": {"name": method},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": str(data), "max_length": 32},
        "train": {
            "output_dir": str(output_dir),
            "max_steps": 8,
            "batch_size": batch,
            "lr": 3e-3,
            "logging_steps": 1,
            "progress": False,
            "tensorboard": False,
        },
    }


@pytest.mark.xdist_group("distributed")
def test_classification_on_two_processes_trains_as_one_and_mlm_runs(tmp_path, bert_dir) -> None:
    """The stages on transformers' own Trainer (classification, masked LM): a classifier's losses
    and adapter as one process's; masked LM draws its masks on each process (the collator's
    random masking), so its run is checked to train (loss falls), not compared."""
    from conftest import WORDS

    texts = [" ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(6)) for i in range(64)]
    labelled = tmp_path / "labelled.json"
    labelled.write_text(json.dumps([{"text": t, "label": "yes" if "cat" in t else "no"} for t in texts]))
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"text": t} for t in texts]))
    runs = {}
    for name, batch, launch in (("one", 8, []), ("two", 4, ["--nproc", "2"])):
        path = tmp_path / f"{name}.yaml"
        raw = encoder_config(bert_dir, labelled, tmp_path / name, "classify", batch)
        path.write_text(yaml.safe_dump(raw))
        finished(lmforge(str(path), *launch))
        runs[name] = tmp_path / name
    assert losses(runs["two"]) == pytest.approx(losses(runs["one"]), rel=TOLERANCE, abs=TOLERANCE)
    assert_same_weights(runs["two"] / "adapter", runs["one"] / "adapter", 1e-4)

    path = tmp_path / "mlm.yaml"
    raw = encoder_config(bert_dir, plain, tmp_path / "mlm", "mlm", 4)
    raw["train"].update(max_steps=40, lr=1e-2)
    path.write_text(yaml.safe_dump(raw))
    assert finished(lmforge(str(path), "--nproc", "2")).count("done: 40 steps") == 1
    mlm = losses(tmp_path / "mlm")
    assert sum(mlm[-8:]) / 8 < sum(mlm[:8]) / 8


def test_an_epoch_takes_fewer_optimizer_steps_on_more_processes(tmp_path, monkeypatch) -> None:
    """AdaLoRA's rank schedule is sized from this count."""
    from lmforge.training.stage import optimizer_steps

    config = validate_config(sft_config(Path("m"), Path("d"), tmp_path, max_steps=-1, batch_size=4, epochs=2))
    assert optimizer_steps(config, 100) == 50
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert optimizer_steps(config, 100) == 26  # 13 global batches of 8 per epoch


FAILING_REWARD = """
import os

def fails_on_rank_1(prompts, completions, **fields):
    if os.environ.get("RANK") == "1":
        raise RuntimeError("rank 1 cannot score")
    return [0.0] * len(completions)
"""


@pytest.mark.xdist_group("distributed")
def test_a_failing_process_ends_the_whole_job_with_its_error(tmp_path, base_dir, alpaca_file) -> None:
    """A reward function that raises in process 1 only: the job ends (no hang waiting for the
    failed process at the next collective), non-zero, with that process's error and rank."""
    (tmp_path / "flaky_rewards.py").write_text(FAILING_REWARD)
    raw = sft_config(base_dir, alpaca_file, tmp_path / "run", max_steps=4, batch_size=4)
    raw["method"] = {
        "name": "grpo",
        "rewards": [{"function": "flaky_rewards:fails_on_rank_1"}],
        "sampling": {"num_generations": 4, "max_completion_length": 4},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    job = lmforge(str(path), "--nproc", "2", extra_env={"PYTHONPATH": str(tmp_path)})
    output, _ = job.communicate(timeout=180)
    assert job.returncode != 0
    assert "error (rank 1): reward fails_on_rank_1 raised RuntimeError: rank 1 cannot score" in output
    assert not (tmp_path / "run" / "adapter").exists()


def run_both(tmp_path: Path, raw_for) -> dict[str, Path]:
    """One process of batch 4 and two of batch 2, each run from `raw_for(name, batch)`."""
    runs = {}
    for name, batch, launch in (("one", 4, []), ("two", 2, ["--nproc", "2"])):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw_for(name, batch)))
        finished(lmforge(str(path), *launch))
        runs[name] = tmp_path / name
    return runs


@pytest.mark.xdist_group("distributed")
@pytest.mark.parametrize("stage", ["pretrain", "sft_vision", "dpo_vision", "sft_seq2seq"])
def test_pretraining_vision_and_seq2seq_stages_on_two_processes_train_as_one(
    tmp_path, base_dir, tokenizer, vlm_dir, stage
) -> None:
    """Pre-training on text, a vision-language model's SFT and DPO (images in the batches), and an
    encoder-decoder's SFT: losses and trained weights of 6 steps, 2 x batch 2 against 1 x 4."""
    from lmforge.data.shapes import COLOURS, write_shapes_task
    from lmforge.models.tiny import build_tiny_t5, save_tiny

    folder = tmp_path / "data"
    if stage == "pretrain":
        data = folder / "text.json"
        folder.mkdir()
        texts = [{"text": f"the cat sat on mat {i} and {i * 7 % 10}"} for i in range(400)]
        data.write_text(json.dumps(texts))  # more packed blocks than 6 steps take: no epoch wraps
    elif stage == "sft_seq2seq":
        data = folder / "pairs.json"
        folder.mkdir()
        data.write_text(json.dumps([{"source": f"{i:03d}", "target": f"{i:03d}"} for i in range(48)]))
    else:
        data = write_shapes_task(folder, 24)
        if stage == "dpo_vision":
            records = json.loads(data.read_text())
            pairs = [
                {
                    "messages": r["messages"][:1],
                    "chosen": r["messages"][1]["content"],
                    "rejected": next(c for c in COLOURS if c != r["messages"][1]["content"]),
                    "images": r["images"],
                }
                for r in records
            ]
            data = folder / "pairs.json"
            data.write_text(json.dumps(pairs))
    model = {"pretrain": base_dir, "sft_seq2seq": None}.get(stage, vlm_dir)
    if model is None:
        model = save_tiny(build_tiny_t5(tokenizer), tokenizer, tmp_path / "t5")

    def raw_for(name: str, batch: int) -> dict:
        raw = sft_config(model, data, tmp_path / name, max_steps=6, lr=5e-3, batch_size=batch)
        raw["method"] = {"name": {"pretrain": "pretrain", "dpo_vision": "dpo"}.get(stage, "sft")}
        if stage in ("sft_vision", "dpo_vision"):
            raw["data"].update(template="qwen2-vl", max_length=128)
            raw["adapter"].update(method="vision_lora", vision_parts=["vision", "language"])
        if stage == "sft_seq2seq":
            del raw["data"]["template"]
        return raw

    runs = run_both(tmp_path, raw_for)
    assert len(losses(runs["two"])) == 6
    assert losses(runs["two"]) == pytest.approx(losses(runs["one"]), rel=TOLERANCE, abs=TOLERANCE)
    assert_same_weights(runs["two"] / "adapter", runs["one"] / "adapter", 1e-4)
