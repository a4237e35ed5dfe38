"""Every adapter method on the same model, data and steps: parameters, memory, speed, accuracy.

Runs `lmforge quickstart` once (unless its output is already in --workdir) for a pre-trained tiny
Llama and the digit-sorting task, then trains each method with the same steps, batch and
schedule, each in its own process (peak RSS is per method), and measures held-out exact match
on the 200 prompts never seen in training. Learning rates are per method, as each paper
recommends a different scale (vector-only methods need larger ones).

Usage::

    .venv/bin/python bench/adapters.py --out bench/adapters.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

LR = {
    "lora": 3e-3,
    "dora": 3e-3,
    "adalora": 1e-2,
    "moe_dora": 3e-3,
    "fourierft": 5e-2,
    "vera": 5e-2,
    "ia3": 5e-2,
    "oft": 3e-3,
}
METHODS = list(LR)
# The same settings for every method; AdaLoRA starts at rank 24 and prunes to an average of 16;
# MoE-DoRA has 4 rank-16 experts per layer, 2 per token, on all layers (`layers: auto` = top 8).
ADAPTER = {"r": 16, "alpha": 32, "dropout": 0.0, "preset": "all", "adalora": {"init_r": 24}}


def run_one(method: str, workdir: Path, steps: int) -> dict:
    """Train one method and measure it (runs in a child process)."""
    from lmforge.config import validate_config
    from lmforge.data.synthetic import TaskExample
    from lmforge.inference.engine import Engine
    from lmforge.methods import sft
    from lmforge.pipeline.quickstart import accuracy

    model = workdir / "pretrain" / "model"
    config = validate_config(
        {
            "model": {"name_or_path": str(model)},
            "adapter": {"method": method, **ADAPTER},
            "data": {
                "path": str(workdir / "data" / "sft_train.json"),
                "template": "chatml",
                "max_length": 64,
            },
            "train": {
                "output_dir": str(workdir / "bench" / method),
                "max_steps": steps,
                "batch_size": 32,
                "lr": LR[method],
                "warmup_ratio": 0.05,
                "logging_steps": 10,
                "tensorboard": False,
                "progress": False,
                "save_steps": 0,
            },
        },
        source="bench",
    )
    start = time.perf_counter()
    result = sft.run(config, quiet=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    records = json.loads((workdir / "data" / "heldout.json").read_text())
    heldout = [TaskExample(prompt=r["instruction"], answer=r["output"]) for r in records]
    engine = Engine.load(str(model), adapter=str(result.artifact))
    metrics = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    tokens = max((m.get("num_input_tokens_seen", 0) for m in metrics), default=0)
    return {
        "method": method,
        "trainable": _trainable(model, method),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if tokens else None,
        "peak_rss_mib": peak,
        "final_loss": result.train_loss,
        "heldout_exact_match": accuracy(engine, heldout, 16),
    }


def _trainable(model: Path, method: str) -> int:
    """Trainable parameters as `lmforge adapters` counts them (same settings as the run)."""
    from lmforge.adapters.build import adapter_table
    from lmforge.config.adapter import AdapterConfig

    rows = adapter_table(str(model), AdapterConfig(**ADAPTER))
    return next(row["trainable"] for row in rows if row["method"] == method)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("runs/bench-adapters"))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--_child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._child:
        print(json.dumps(run_one(a._child, a.workdir, a.steps)))
        return
    if not (a.workdir / "pretrain" / "model").is_dir():
        from lmforge.pipeline.quickstart import run_quickstart

        run_quickstart(a.workdir)
    rows = []
    for method in a.methods.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--_child",
            method,
            "--workdir",
            str(a.workdir),
            "--steps",
            str(a.steps),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-3000:])
            rows.append({"method": method, "error": f"exit code {proc.returncode}"})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{method}: done", flush=True)
    header = (
        f"{'method':<10} {'trainable':>10} {'tok/s':>8} {'peak RSS MiB':>13} {'final loss':>11} "
        f"{'held-out EM':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<10} ERROR {r['error']}")
            continue
        speed = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
        print(
            f"{r['method']:<10} {r['trainable']:>10,} {speed:>8} {r['peak_rss_mib']:>13.0f} "
            f"{r['final_loss']:>11.4f} {r['heldout_exact_match']:>11.1%}"
        )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"steps": a.steps, "lr": LR, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
