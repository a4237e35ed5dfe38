"""Every preference method from the same SFT start: step time, peak memory, held-out accuracy.

Runs `lmforge quickstart` once (unless its output is already in --workdir), trains a LoRA SFT
adapter for 30 steps on the digit-sorting task, and writes on-policy pairs from it (400 for
training, 100 held out; the rejected side is the SFT model's own wrong answer). Then each variant
trains the same steps, batch and data from that adapter, each in its own process (peak RSS is its
own), and is judged on the held-out pairs and prompts:

- dpo, dpo with `precompute_ref`, orpo, simpo, kto (the pairs split into good and bad answers);
- trl's `DPOTrainer` used directly with its defaults, on the same model, adapter and pairs (the
  peer: lmforge's DPO runs on it, so this row shows what lmforge's wrapping costs).

"peak RSS" is the process's peak from the start of the run (the count is reset after imports).
"s/step" is the trainer's own runtime over its steps; "total s" is the whole run (loading,
tokenizing, the precompute pass, training, saving). Default steps = one epoch of the pairs, so the
precompute pass covers exactly the data the run trains on.

Usage::

    .venv/bin/python bench/preference.py --out bench/preference.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

LR = {"dpo": 5e-4, "dpo_precompute": 5e-4, "trl_dpo": 5e-4, "orpo": 2e-3, "simpo": 5e-4, "kto": 5e-4}
VARIANTS = list(LR)
BATCH = 16
ADAPTER = {"r": 16, "alpha": 32, "dropout": 0.0}


def stage_config(workdir: Path, method: str, data: Path, out: Path, steps: int, lr: float, **extra) -> dict:
    return {
        "method": {"name": method, **extra},
        "model": {"name_or_path": str(workdir / "pretrain" / "model")},
        "adapter": dict(ADAPTER),
        "data": {"path": str(data), "template": "chatml", "max_length": 64},
        "train": {
            "output_dir": str(out),
            "max_steps": steps,
            "batch_size": BATCH,
            "lr": lr,
            "warmup_ratio": 0.0,
            "logging_steps": 5,
            "tensorboard": False,
            "progress": False,
            "save_steps": 0,
        },
    }


def prepare(workdir: Path) -> None:
    """The SFT adapter and the on-policy pairs every variant starts from."""
    from lmforge.config import validate_config
    from lmforge.config.model import ModelConfig
    from lmforge.data.templates import get_template
    from lmforge.methods import sft
    from lmforge.models.loading import load_tokenizer
    from lmforge.pipeline.preference_task import judge, write_pairs

    if not (workdir / "pretrain" / "model").is_dir():
        from lmforge.pipeline.quickstart import run_quickstart

        run_quickstart(workdir)
    start = workdir / "preference"
    if (start / "start.json").is_file():
        return
    data = workdir / "data"
    config = stage_config(workdir, "sft", data / "sft_train.json", start / "sft", 30, 3e-3)
    adapter = sft.run(validate_config(config, source="bench"), quiet=True).artifact
    model = _with_adapter(workdir, adapter)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(workdir / "pretrain" / "model")))
    template = get_template("chatml")
    train, held = _tasks(data / "sft_train.json", 400), _tasks(data / "heldout.json", 100)
    write_pairs(model, tokenizer, template, train, start / "pairs.json")
    write_pairs(model, tokenizer, template, held, start / "held_pairs.json", seed=1)
    scores, exact = judge(model, tokenizer, template, held, start / "held_pairs.json")
    summary = {
        "adapter": str(adapter),
        "preference_accuracy": scores.normalized_accuracy(),
        "exact_match": exact,
        "chosen": scores.chosen.tolist(),
        "rejected": scores.rejected.tolist(),
    }
    (start / "start.json").write_text(json.dumps(summary))


def _tasks(path: Path, n: int):
    from lmforge.data.synthetic import TaskExample

    return [TaskExample(r["instruction"], r["output"]) for r in json.loads(path.read_text())[:n]]


def _with_adapter(workdir: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(workdir / "pretrain" / "model")
    return PeftModel.from_pretrained(base, adapter).eval()


def train_lmforge(variant: str, workdir: Path, steps: int) -> tuple[Path, dict]:
    from lmforge.config import validate_config
    from lmforge.methods import dpo, kto

    start = workdir / "preference"
    method = "dpo" if variant == "dpo_precompute" else variant
    extra = {"precompute_ref": True} if variant == "dpo_precompute" else {}
    raw = stage_config(workdir, method, start / "pairs.json", start / variant, steps, LR[variant], **extra)
    raw["adapter"]["path"] = json.loads((start / "start.json").read_text())["adapter"]
    result = (kto if method == "kto" else dpo).run(validate_config(raw, source="bench"), quiet=True)
    return result.artifact, result.metrics


def train_trl(workdir: Path, steps: int) -> tuple[Path, dict]:
    """trl's DPOTrainer with its defaults: the same model, SFT adapter, pairs, batch, lr and steps."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from lmforge.config.data import DatasetSource
    from lmforge.data.loader import read_source
    from lmforge.data.registry import resolve
    from lmforge.data.templates import get_template
    from lmforge.training.preference import pair_dataset, use_template

    start = workdir / "preference"
    model_dir = workdir / "pretrain" / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    use_template(tokenizer, get_template("chatml"))  # the same rendering as lmforge's runs
    examples = list(read_source(resolve(DatasetSource(path=str(start / "pairs.json")), ".")))
    adapter = json.loads((start / "start.json").read_text())["adapter"]
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), adapter, is_trainable=True
    )
    out = start / "trl_dpo"
    args = DPOConfig(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=LR["trl_dpo"],
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        max_length=64,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=pair_dataset(examples, "dpo"), processing_class=tokenizer
    )
    result = trainer.train()
    trainer.model.delete_adapter("ref")
    trainer.model.save_pretrained(out / "adapter")
    return out / "adapter", dict(result.metrics)


def reset_peak_rss() -> None:
    """Start the peak-RSS count at the current RSS (Linux), so the peak is the run's, not the imports'."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(variant: str, workdir: Path, steps: int) -> dict:
    """Train one variant and judge it (runs in a child process)."""
    import torch

    from lmforge.config.model import ModelConfig
    from lmforge.data.templates import get_template
    from lmforge.models.loading import load_tokenizer
    from lmforge.pipeline.preference_task import judge
    from lmforge.training.preference import PairScores

    torch.manual_seed(0)
    reset_peak_rss()
    began = time.perf_counter()
    adapter, metrics = (
        train_trl(workdir, steps) if variant == "trl_dpo" else train_lmforge(variant, workdir, steps)
    )
    total = time.perf_counter() - began
    peak = peak_rss_mib()
    start = json.loads((workdir / "preference" / "start.json").read_text())
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(workdir / "pretrain" / "model")))
    held = _tasks(workdir / "data" / "heldout.json", 100)
    model = _with_adapter(workdir, adapter)
    scores, exact = judge(
        model, tokenizer, get_template("chatml"), held, workdir / "preference" / "held_pairs.json"
    )
    before = PairScores(
        torch.tensor(start["chosen"]), torch.tensor(start["rejected"]), scores.chosen_len, scores.rejected_len
    )
    return {
        "variant": variant,
        "s_per_step": metrics["train_runtime"] / steps,
        "total_s": total,
        "peak_rss_mib": peak,
        "final_loss": metrics["train_loss"],
        "preference_accuracy_before": start["preference_accuracy"],
        "preference_accuracy": scores.normalized_accuracy(),
        "implicit_accuracy": scores.implicit_accuracy(before),
        "exact_match_before": start["exact_match"],
        "exact_match": exact,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("runs/bench-preference"))
    p.add_argument("--steps", type=int, default=25, help="25 = one epoch of the 400 pairs at batch 16")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--_child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._child:
        print(json.dumps(run_one(a._child, a.workdir, a.steps)))
        return
    prepare(a.workdir)
    rows = []
    for variant in a.variants.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--_child",
            variant,
            "--workdir",
            str(a.workdir),
            "--steps",
            str(a.steps),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-3000:])
            rows.append({"variant": variant, "error": f"exit code {proc.returncode}"})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{variant}: done", flush=True)
    dpo = next((r for r in rows if r["variant"] == "dpo" and "error" not in r), None)
    header = (
        f"{'variant':<15} {'s/step':>7} {'total s':>8} {'peak RSS MiB':>13} {'pref acc':>13} "
        f"{'implicit':>9} {'exact match':>13} {'step vs dpo':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<15} ERROR {r['error']}")
            continue
        ratio = f"{r['s_per_step'] / dpo['s_per_step']:.2f}x" if dpo else "-"
        print(
            f"{r['variant']:<15} {r['s_per_step']:>7.3f} {r['total_s']:>8.1f} {r['peak_rss_mib']:>13.0f} "
            f"{r['preference_accuracy_before']:>5.2f} -> {r['preference_accuracy']:.2f} "
            f"{r['implicit_accuracy']:>9.2f} {r['exact_match_before']:>5.2f} -> {r['exact_match']:.2f} "
            f"{ratio:>12}"
        )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"steps": a.steps, "batch": BATCH, "lr": LR, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
