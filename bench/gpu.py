"""The GPU fast path, measured: one short prepared script for a lent GPU machine (minutes).

Builds a 1B-class Llama from its config (random weights, real shapes: hidden 2048, 16 layers,
32 query / 8 key-value heads, intermediate 8192, vocabulary 32,000; nothing is downloaded) and
trains it for a few dozen steps on generated alpaca records, each variant in its own process:

* ``lmforge_lora``: lmforge's SFT with its defaults (LoRA r=16 on every linear layer, bf16,
  padding-free batches, flash-attention 2 when installed), ``train.kernels: none``;
* ``lmforge_lora_kernels``: the same with ``train.kernels: auto`` (Liger when installed);
* ``trl_lora``: trl ``SFTTrainer`` with its defaults and the same LoRA adapter;
* ``lmforge_qlora`` / ``lmforge_qlora_kernels``: 4-bit NF4 base (bitsandbytes), as above.

Per variant it prints real tokens/s, MFU (achieved training FLOPs against the device's dense
bf16 peak, counted as ``bench/sft_throughput.py`` counts them), peak GPU memory, and the longest
context (batch 1) whose training step fits in ``--budget-gib``. Then it builds a 7B-shape Llama
(Llama-2-7B's config) in 4-bit and reports QLoRA's peak memory at 2k context.

Usage, on a lent machine (about 6 minutes on an H200)::

    PYTHONUNBUFFERED=1 python bench/gpu.py --out $OUT/gpu.json

and on CPU, for its plumbing only (tiny shapes, fp32, the LoRA variants)::

    .venv/bin/python bench/gpu.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sft_throughput import train_flops_per_token  # bench/ is this script's folder, on sys.path

ONE_B = {"hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "intermediate": 8192, "vocab": 32000}
SEVEN_B = {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 32, "intermediate": 11008, "vocab": 32000}
TINY = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 512}
# Dense bf16 tensor-core peaks (TFLOP/s) by device name; others are measured with a matmul.
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}
VARIANTS = ("lmforge_lora", "lmforge_lora_kernels", "trl_lora", "lmforge_qlora", "lmforge_qlora_kernels")
WORDS = "the model reads the task and writes a careful answer step by step with short words".split()


def build_model(folder: Path, shape: dict, dtype: str) -> Path:
    """A Llama of `shape` with random weights and a small byte-level tokenizer, saved to `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer([" ".join(WORDS)] * 50, vocab_size=min(shape["vocab"], 400))
    config = LlamaConfig(
        vocab_size=max(shape["vocab"], len(tokenizer)),
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=32768,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return folder


def write_records(path: Path, count: int, words: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as out:
        for i in range(count):
            length = max(8, int(rng.expovariate(1 / words)))
            answer = " ".join(rng.choice(WORDS) for _ in range(length))
            out.write(json.dumps({"instruction": f"Task {i}: write.", "input": "", "output": answer}) + "\n")


def flops_per_token(shape: dict, context: float) -> float:
    """Training FLOPs per real token, counted as bench/sft_throughput.py counts them."""
    kv_dim = shape["kv_heads"] * shape["hidden"] // shape["heads"]
    dims = (shape["hidden"], shape["intermediate"], shape["layers"], shape["vocab"], kv_dim)
    return train_flops_per_token(*dims, context, r=16)


def device_peak() -> tuple[str, float]:
    """(device name, dense bf16 peak in TFLOP/s): the table's, else a measured matmul's."""
    import torch

    if not torch.cuda.is_available():
        return "cpu", _matmul_tflops("cpu", torch.float32)
    name = torch.cuda.get_device_name()
    for key, peak in PEAKS.items():
        if key in name:
            return name, peak
    return name, _matmul_tflops("cuda", torch.bfloat16)


def _matmul_tflops(device: str, dtype) -> float:
    import torch

    n = 4096 if device == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    _sync()
    return 10 * 2 * n**3 / (time.perf_counter() - start) / 1e12


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_memory_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _step_timer():
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.stamps: list[float] = []
            self.tokens: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            self.stamps.append(time.perf_counter())
            self.tokens.append(int(state.num_input_tokens_seen))

    return Timer()


def lmforge_trainer(variant: str, model: Path, data: Path, work: Path, args: dict):
    """The Trainer lmforge's SFT builds for this variant (its data, model, adapter and kernels)."""
    from lmforge.config import validate_config
    from lmforge.data.cache import sft_rows
    from lmforge.models.loading import load_tokenizer
    from lmforge.training.stage import load_model_for_training, optimizer_steps, resolve_template
    from lmforge.training.trainer import build_trainer

    config = validate_config(
        {
            "model": {"name_or_path": str(model), "quantization": "4bit" if "qlora" in variant else "none"},
            "adapter": {"r": 16, "alpha": 32, "preset": "all"},
            "data": {
                "path": str(data),
                "template": "chatml",
                "max_length": args["max_length"],
                "cache": False,
            },
            "train": {
                "output_dir": str(work / variant),
                "max_steps": args["steps"],
                "batch_size": args["batch_size"],
                "save_steps": 0,
                "logging_steps": 1000,
                "progress": False,
                "tensorboard": False,
                "kernels": "auto" if variant.endswith("kernels") else "none",
            },
        }
    )
    tokenizer = load_tokenizer(config.model)
    template = resolve_template(config, tokenizer)
    (train, _, _), _ = sft_rows(config.data, template, tokenizer)
    model, hardware = load_model_for_training(config, True, optimizer_steps(config, len(train)))
    return build_trainer(config, model, tokenizer, hardware, train, None, "sft", True)


def trl_trainer(model: Path, data: Path, work: Path, args: dict):
    """trl's SFTTrainer with its defaults (gradient checkpointing, bf16 on GPU) and the same LoRA."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    dataset = load_dataset("json", data_files=str(data), split="train")
    dataset = dataset.map(lambda r: {"prompt": r["instruction"], "completion": r["output"]})
    on_gpu = torch.cuda.is_available()
    config = SFTConfig(
        output_dir=str(work / "trl"),
        max_steps=args["steps"],
        per_device_train_batch_size=args["batch_size"],
        max_length=args["max_length"],
        bf16=on_gpu,
        use_cpu=not on_gpu,
        report_to=[],
        save_strategy="no",
        logging_steps=1000,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    return SFTTrainer(model=str(model), args=config, train_dataset=dataset, peft_config=lora)


def longest_context(trainer, shape: dict, budget_gib: float, limit: int) -> int:
    """The longest context (batch 1) whose forward and backward pass fits in `budget_gib`."""
    import torch

    model, best, context = trainer.model, 0, 512
    device = next(model.parameters()).device
    while context <= limit:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, shape["vocab"], (1, context), device=device)
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                model(input_ids=ids, labels=ids).loss.backward()
        except torch.OutOfMemoryError:
            break
        model.zero_grad(set_to_none=True)
        if torch.cuda.is_available() and torch.cuda.max_memory_allocated() / 2**30 > budget_gib:
            break
        best, context = context, context * 2
    return best


def run_variant(variant: str, model: Path, data: Path, work: Path, args: dict) -> dict[str, Any]:
    import torch

    if "qlora" in variant and not torch.cuda.is_available():
        return {"variant": variant, "skipped": "4-bit training needs CUDA (bitsandbytes)"}
    trainer = (
        trl_trainer(model, data, work, args)
        if variant == "trl_lora"
        else lmforge_trainer(variant, model, data, work, args)
    )
    timer = _step_timer()
    trainer.add_callback(timer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    warm = args["warmup"]
    seconds = timer.stamps[-1] - timer.stamps[warm - 1]
    tokens = timer.tokens[-1] - timer.tokens[warm - 1]
    shape = args["shape"]
    rows = args["batch_size"] * (len(timer.stamps) - warm)
    flops = tokens / seconds * flops_per_token(shape, tokens / max(rows, 1))
    name, peak = device_peak()
    result = {
        "variant": variant,
        "device": name,
        "tokens_per_s": tokens / seconds,
        "mfu": flops / (peak * 1e12),
        "peak_memory_gib": _peak_memory_gib(),
        "liger": bool(trainer.args.use_liger_kernel),
        "attention": getattr(trainer.model.config, "_attn_implementation", None),
    }
    result["longest_context"] = longest_context(trainer, shape, args["budget_gib"], args["context_limit"])
    return result


def seven_b_qlora(work: Path, args: dict) -> dict[str, Any]:
    """QLoRA's peak memory on a 7B-shape Llama in 4-bit at 2k context (batch 1)."""
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "needs CUDA"}
    folder = build_model(work / "seven_b", SEVEN_B, "bfloat16")
    data = work / "seven_b.jsonl"
    write_records(data, 64, 1500)
    torch.cuda.empty_cache()
    trainer = lmforge_trainer(
        "lmforge_qlora_kernels", folder, data, work, {**args, "batch_size": 1, "max_length": 2048, "steps": 4}
    )
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return {"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "context": 2048}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: the plumbing only")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--budget-gib", type=float, default=40.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    parser.add_argument("--_args", help=argparse.SUPPRESS)
    opts = parser.parse_args()

    if opts._child:
        args = json.loads(opts._args)
        work = Path(args["work"])
        if opts._child == "seven_b":
            result = seven_b_qlora(work, args)
        else:
            result = run_variant(opts._child, Path(args["model"]), Path(args["data"]), work, args)
        (work / f"{opts._child}.json").write_text(json.dumps(result))
        return

    shape = TINY if opts.smoke else ONE_B
    args = {
        "shape": shape,
        "steps": 4 if opts.smoke else opts.steps,
        "warmup": 1 if opts.smoke else 5,
        "batch_size": 2 if opts.smoke else opts.batch_size,
        "max_length": 64 if opts.smoke else opts.max_length,
        "budget_gib": opts.budget_gib,
        "context_limit": 1024 if opts.smoke else 65536,
    }
    variants = [v for v in opts.variants.split(",") if v]
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as folder:
        work = Path(folder)
        start = time.perf_counter()
        model = build_model(work / "model", shape, "float32" if opts.smoke else "bfloat16")
        data = work / "data.jsonl"
        write_records(data, 200 if opts.smoke else 2000, 40 if opts.smoke else 600)
        print(f"model and data ready in {time.perf_counter() - start:.0f} s", flush=True)
        args |= {"model": str(model), "data": str(data), "work": str(work)}
        results = []
        for child in [*variants, *([] if opts.smoke else ["seven_b"])]:
            start = time.perf_counter()
            command = [
                sys.executable,
                os.path.abspath(__file__),
                "--_child",
                child,
                "--_args",
                json.dumps(args),
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                sys.stderr.write(done.stdout[-2000:] + done.stderr[-6000:])
                result = {"variant": child, "error": f"exit code {done.returncode}"}
            else:
                result = json.loads((work / f"{child}.json").read_text())
            result.setdefault("variant", child)
            results.append(result)
            print(f"{child}: {time.perf_counter() - start:.0f} s {json.dumps(result)}", flush=True)
    print()
    print(f"{'variant':<24} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9} {'longest context':>16}")
    for r in results:
        if "tokens_per_s" in r:
            print(
                f"{r['variant']:<24} {r['tokens_per_s']:>10.0f} {100 * r['mfu']:>6.1f}% "
                f"{r['peak_memory_gib']:>9.2f} {r['longest_context']:>16}"
            )
        else:
            print(f"{r['variant']:<24} {r.get('error') or r.get('skipped') or r}")
    if opts.out:
        opts.out.write_text(json.dumps({"shape": shape, "args": args, "results": results}, indent=1))


if __name__ == "__main__":
    main()
