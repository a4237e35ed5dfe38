"""One process against two on the same total work: tokens/s and peak memory per process.

Every run trains the same Llama (built from a config, no downloads; ~20M parameters by default)
on the same data for the same optimizer steps and global batch, through `lmforge train` in a
subprocess, so each run's start-up, tokenization and saving are what a user gets:

* ``1 x 2 threads``: one process, batch B, torch on both cores (OMP_NUM_THREADS=2);
* ``2 x 1 thread``: ``--nproc 2`` (torch's elastic launcher, DDP on gloo), batch B/2 each,
  one core per process: the same machine split the other way.

Runs: LoRA under DDP (the usual multi-GPU case), and a full fine-tune under DDP and FSDP2, where
FSDP2's sharding of weights, gradients and AdamW states shows in each process's peak memory.

tokens/s is the Trainer's own ``train_tokens_per_second`` (tokens over both processes, training
loop only). Memory per process is the main process's (every process holds the same share):
``held`` is measured on its tensors at the end of training (FSDP2's shards are its local parts);
peak RSS is the whole process's, which on CPU is set by loading (every process loads the whole
model before FSDP2 shards it) and by the save (the full weights are gathered), not by training. On CPU two
processes of one thread split the same two cores one process of two threads uses, so scaling
efficiency (2-process tokens/s over 1-process tokens/s) measures the cost of the all-reduce and
of the smaller per-process batch, not a speed-up; on a machine with N GPUs the same script with
``--nproc N`` measures the real one.

Usage::

    .venv/bin/python bench/distributed.py --out bench/distributed.json
    .venv/bin/python bench/distributed.py --hidden 128 --layers 2 --steps 10   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from lmforge.models.tiny import build_tiny_llama, build_tiny_tokenizer, save_tiny


def records(count: int) -> list[dict]:
    """Additions written out, each a sentence or two long, so that batches carry real tokens."""
    rows = []
    for i in range(count):
        a, b = i % 97, (i * 7) % 89
        text = f"The sum of {a} and {b} is {a + b}; their difference is {a - b}."
        rows.append({"instruction": f"Work out {a} and {b}.", "input": "", "output": text})
    return rows


def config(base: Path, data: Path, out: Path, args, batch: int, full: bool, strategy: str) -> dict:
    return {
        "model": {"name_or_path": str(base)},
        "adapter": {"method": "none"} if full else {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"path": str(data), "template": "chatml", "max_length": 128},
        "train": {
            "output_dir": str(out),
            "max_steps": args.steps,
            "batch_size": batch,
            "lr": 1e-4 if full else 1e-3,
            "logging_steps": 1,
            "save_steps": 0,
            "progress": False,
            "tensorboard": False,
            "distributed": {"strategy": strategy},
        },
    }


def run(work: Path, name: str, raw: dict, nproc: int) -> dict:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // nproc)}
    command = [
        sys.executable,
        "-m",
        "lmforge",
        "train",
        str(path),
        *(["--nproc", str(nproc)] if nproc > 1 else []),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rows = [
        json.loads(line)
        for line in (Path(raw["train"]["output_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    final = next(row for row in rows if "train_tokens_per_second" in row)
    memory = next(row for row in rows if "peak_rss_mb" in row)
    losses = [row["loss"] for row in rows if "loss" in row]
    return {
        "tokens_per_s": final["train_tokens_per_second"],
        "runtime_s": final["train_runtime"],
        "peak_rss_mb": memory["peak_rss_mb"],
        "held_weights_mb": memory["held_weights_mb"],
        "held_optimizer_mb": memory["held_optimizer_mb"],
        "estimated_peak_mb": memory["estimated_peak_mb"],
        "final_loss": losses[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="global batch (per process: batch / processes)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lmforge-bench-distributed-"))
    rows = records(2000)
    tokenizer = build_tiny_tokenizer([r["output"] for r in rows[:500]], vocab_size=1000)
    model = build_tiny_llama(tokenizer, hidden_size=args.hidden, num_layers=args.layers, num_heads=8)
    parameters = sum(p.numel() for p in model.parameters())
    base = save_tiny(model, tokenizer, work / "base")
    data = work / "data.json"
    data.write_text(json.dumps(rows))

    plans = [
        ("lora_ddp", False, "ddp"),
        ("full_ddp", True, "ddp"),
        ("full_fsdp2", True, "fsdp"),
    ]
    results: dict[str, dict] = {"parameters": parameters, "steps": args.steps, "global_batch": args.batch}
    for name, full, strategy in plans:
        if strategy == "ddp":
            one = config(base, data, work / f"{name}_1", args, args.batch, full, "ddp")
            results[f"{name}_1proc"] = run(work, f"{name}_1", one, 1)
        two = config(base, data, work / f"{name}_2", args, args.batch // 2, full, strategy)
        results[f"{name}_2proc"] = run(work, f"{name}_2", two, 2)

    print(f"model: {parameters / 1e6:.1f}M parameters; {args.steps} steps of global batch {args.batch}")
    header = ("tokens/s", "held weights MB", "held AdamW MB", "peak RSS MB", "final loss")
    print(f"{'run':<18}" + "".join(f"{h:>17}" for h in header))
    for key, value in results.items():
        if isinstance(value, dict):
            numbers = (value["tokens_per_s"], value["held_weights_mb"], value["held_optimizer_mb"])
            row = f"{key:<18}" + "".join(f"{n:>17,.1f}" for n in numbers)
            print(f"{row}{value['peak_rss_mb']:>17,.0f}{value['final_loss']:>17.4f}")
    for name in ("lora_ddp", "full_ddp"):
        ratio = results[f"{name}_2proc"]["tokens_per_s"] / results[f"{name}_1proc"]["tokens_per_s"]
        results[f"{name}_scaling"] = ratio
        print(f"{name}: 2 processes x 1 thread / 1 process x 2 threads tokens/s = {ratio:.2f}")
    ddp, fsdp = results["full_ddp_2proc"], results["full_fsdp2_2proc"]
    held = {
        name: run["held_weights_mb"] + run["held_optimizer_mb"]
        for name, run in (("ddp", ddp), ("fsdp", fsdp))
    }
    results["fsdp2_held_share"] = held["fsdp"] / held["ddp"]
    print(
        f"full fine-tune, each process holds {held['ddp']:,.1f} MB of weights and AdamW states under DDP, "
        f"{held['fsdp']:,.1f} MB under FSDP2 ({results['fsdp2_held_share']:.2f}x); FSDP2 tokens/s "
        f"{fsdp['tokens_per_s'] / ddp['tokens_per_s']:.2f}x DDP's (its all-gathers on gloo)"
    )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
