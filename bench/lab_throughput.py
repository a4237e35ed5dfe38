"""Lab model training throughput on CPU: tokens/s and achieved FLOP/s per architecture, and the
LLaMA-like lab model against transformers' own LlamaForCausalLM of the same shape.

Every variant trains the same random token batches (batch x seq tokens) for the same number of
AdamW steps after warm-up steps, in this process, one variant after another, with the same torch
thread count. Achieved FLOP/s counts 3 x the forward FLOPs per token (`lmforge lab info`'s
formula: matrix multiplies + attention) x tokens/s; the peak FLOP/s of a CPU core is not known
here, so the number is for comparing variants, not for an MFU claim.

Usage::

    .venv/bin/python bench/lab_throughput.py
    .venv/bin/python bench/lab_throughput.py --d-model 256 --layers 4 --seq 256 --steps 10
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.lab.build import flops_per_token
from lmforge.lab.configuration import LabConfig
from lmforge.lab.modeling import LabForCausalLM

VARIANTS = {
    "llama-like (rope, rmsnorm, swiglu, GQA)": {
        "position_type": "rope",
        "norm_type": "rmsnorm",
        "hidden_act": "swiglu",
        "kv": 2,
    },
    "alibi, layernorm, gelu, MHA": {
        "position_type": "alibi",
        "norm_type": "layernorm",
        "hidden_act": "gelu",
        "kv": None,
    },
    "sinusoidal, layernorm, relu, MHA": {
        "position_type": "sinusoidal",
        "norm_type": "layernorm",
        "hidden_act": "relu",
        "kv": None,
    },
    "yarn, rmsnorm, silu, MQA": {
        "position_type": "yarn",
        "norm_type": "rmsnorm",
        "hidden_act": "silu",
        "kv": 1,
    },
}


def lab_config(args: argparse.Namespace, variant: dict) -> LabConfig:
    heads = args.heads
    rope = None
    if variant["position_type"] == "yarn":
        rope = {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": args.seq,
        }
    width = 8 * -(-8 * args.d_model // 3 // 8) if variant["hidden_act"] == "swiglu" else 4 * args.d_model
    return LabConfig(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        intermediate_size=width,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=variant["kv"] or heads,
        hidden_act=variant["hidden_act"],
        norm_type=variant["norm_type"],
        position_type=variant["position_type"],
        rope_parameters=rope,
        max_position_embeddings=4 * args.seq,
        tie_word_embeddings=False,
    )


def measure(model: torch.nn.Module, args: argparse.Namespace) -> float:
    """Seconds per optimizer step (median of the timed steps)."""
    model.train()
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
        for _ in range(args.steps + args.warmup)
    ]
    times = []
    for i, ids in enumerate(batches):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokens = args.batch * args.seq
    print(f"torch threads {torch.get_num_threads()}; {args.batch}x{args.seq} tokens per step, ", end="")
    print(f"{args.steps} timed steps")
    print(f"{'variant':44} {'params':>9} {'tok/s':>9} {'GFLOP/s':>8}")
    results = {}
    for name, variant in VARIANTS.items():
        config = lab_config(args, variant)
        model = LabForCausalLM(config)
        seconds = measure(model, args)
        flops = 3 * flops_per_token(config, args.seq) * tokens / seconds
        params = sum(p.numel() for p in model.parameters())
        results[name] = tokens / seconds
        print(f"{name:44} {params:9,} {tokens / seconds:9,.0f} {flops / 1e9:8.2f}")

    # The peer: transformers' LlamaForCausalLM of exactly the llama-like lab model's shape.
    lab = lab_config(args, VARIANTS["llama-like (rope, rmsnorm, swiglu, GQA)"])
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.d_model,
            intermediate_size=lab.intermediate_size,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=lab.num_key_value_heads,
            max_position_embeddings=lab.max_position_embeddings,
            rms_norm_eps=lab.norm_eps,
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )
    )
    seconds = measure(llama, args)
    peer = tokens / seconds
    params = sum(p.numel() for p in llama.parameters())
    print(f"{'transformers LlamaForCausalLM (same shape)':44} {params:9,} {peer:9,.0f}")
    ratio = results["llama-like (rope, rmsnorm, swiglu, GQA)"] / peer
    print(f"llama-like lab model / transformers Llama tokens/s: {ratio:.2f}x")


if __name__ == "__main__":
    main()
