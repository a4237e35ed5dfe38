"""Packed vs unpacked LoRA SFT: tokens/s and padding fraction on the same tiny model and data.

Reuses ``sft_throughput.py``'s data (lognormal lengths, 30–512 tokens, median ~120), model
(tiny Llama, LoRA r=16, fp32) and per-variant subprocesses. Variants:

* ``lmforge_padded``: ``train.padding_free: false`` — every batch right-padded to its longest row.
* ``lmforge``: the default, unpacked but padding-free (each batch concatenated into one row).
* ``lmforge_packed``: ``data.packing: true`` — examples packed best-fit into ``max_length`` rows.
* ``trl_packed``: trl ``SFTTrainer`` defaults with ``packing=True`` (peer).

"padding" is the share of tokens fed to the model that are padding. Packed variants feed more
tokens per step (full rows), so compare tokens/s, not s/step.

Usage::

    .venv/bin/python bench/packing.py --out bench/packing.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sft_throughput as sft  # noqa: E402  (a sibling script, not a package)

VARIANTS = ["lmforge_padded", "lmforge", "lmforge_packed", "trl_packed"]


def print_table(results: list[dict[str, Any]]) -> None:
    base = next((r for r in results if r["variant"] == "lmforge_padded" and "error" not in r), None)
    header = (
        f"{'variant':<16} {'s/step':>7} {'real tok/s':>11} {'padding':>8} {'peak RSS MiB':>13} "
        f"{'vs padded':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<16} ERROR: {r['error']}")
            continue
        padding = 1 - r["real_tokens"] / r["padded_tokens"]
        ratio = r["real_tok_s"] / base["real_tok_s"] if base else float("nan")
        print(
            f"{r['variant']:<16} {r['sec_per_step']:>7.3f} {r['real_tok_s']:>11.0f} {padding:>7.1%} "
            f"{r['peak_rss_mib']:>13.0f} {ratio:>9.2f}x"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2, help="runs per variant (interleaved)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    a = p.parse_args()
    names = a.variants.split(",")
    with tempfile.TemporaryDirectory(prefix="packing_bench_") as workdir:
        cfg = sft.BenchConfig(
            steps=a.steps,
            warmup_steps=a.warmup_steps,
            batch_size=a.batch_size,
            max_length=a.max_length,
            workdir=workdir,
        )
        sft.prepare_data(cfg)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for rep in range(a.repeats):
            for name in names:
                t0 = time.perf_counter()
                runs[name].append(sft._spawn(cfg, name, Path(workdir) / f"{name}.json"))
                print(f"[{rep + 1}/{a.repeats}] {name}: {time.perf_counter() - t0:.1f}s", flush=True)
        results = [sft.aggregate(runs[name]) for name in names]
    print()
    print_table(results)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"config": asdict(cfg), "results": results}, indent=2))


if __name__ == "__main__":
    main()
