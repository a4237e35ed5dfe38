"""Data preparation speed: SFT's read + tokenize of a generated alpaca set, in one process and in N
worker processes (`data.num_proc`), and a cold run against a rerun served by the tokenized-data
cache (`data.cache`). Prints records/s per variant and writes JSON with ``--out``.

The set is generated (no download): alpaca records with a long-tailed length mix (most short, a
few long), tokenized with a byte-level BPE tokenizer trained on a sample of it (vocabulary 8,000)
in the chatml template at max length 512. The rows of every variant are checked equal.

Usage::

    .venv/bin/python bench/data_prep.py                       # 200,000 records
    .venv/bin/python bench/data_prep.py --records 20000 --out bench/data_prep.json
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from lmforge.config.data import DataConfig
from lmforge.data.cache import sft_rows
from lmforge.data.templates import get_template
from lmforge.data.tokenize import workers
from lmforge.models.tiny import build_tiny_tokenizer

WORDS = "the model reads each record and writes an answer that is short or long as the task asks".split()


def write_records(path: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def text(mean: float) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, int(rng.expovariate(1 / mean)))))

    with path.open("w") as out:
        for i in range(count):
            record = {"instruction": f"Task {i}: {text(20)}", "input": text(8), "output": text(60)}
            out.write(json.dumps(record) + "\n")


def timed(data: DataConfig, template, tokenizer) -> tuple[float, object, bool]:
    start = time.perf_counter()
    (train, _, _), cached = sft_rows(data, template, tokenizer)
    return time.perf_counter() - start, train, cached is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--num-proc", type=int, default=workers(None))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "alpaca.jsonl"
        write_records(path, args.records)
        sample = [json.loads(line)["output"] for line in path.open().readlines()[:2000]]
        tokenizer = build_tiny_tokenizer(sample, vocab_size=8000)
        template = get_template("chatml")
        base = {"path": str(path), "template": "chatml", "max_length": 512}
        runs = {}
        one, rows, _ = timed(DataConfig(**base, num_proc=1, cache=False), template, tokenizer)
        runs["1 process"] = one
        many, many_rows, _ = timed(
            DataConfig(**base, num_proc=args.num_proc, cache=False), template, tokenizer
        )
        runs[f"{args.num_proc} processes"] = many
        cached = DataConfig(**base, num_proc=args.num_proc, cache_dir=str(Path(folder) / "cache"))
        runs["cold (writes the cache)"], _, _ = timed(cached, template, tokenizer)
        runs["rerun (from the cache)"], cached_rows, hit = timed(cached, template, tokenizer)
        assert hit, "the rerun did not read the cache"
        assert many_rows.to_dict() == rows.to_dict() == cached_rows.to_dict(), "rows differ"

    results = {
        name: {"seconds": round(s, 2), "records_per_s": round(args.records / s)} for name, s in runs.items()
    }
    print(f"{args.records:,} alpaca records, chatml, max_length 512, {workers(None)} cores")
    for name, result in results.items():
        print(f"  {name:<26} {result['seconds']:>8.2f} s  {result['records_per_s']:>10,} records/s")
    rerun = one / runs["rerun (from the cache)"]
    print(f"  speed-up over 1 process: {one / many:.2f}x with {args.num_proc}; the rerun {rerun:.0f}x")
    if args.out:
        args.out.write_text(
            json.dumps({"records": args.records, "num_proc": args.num_proc, "runs": results}, indent=1)
        )


if __name__ == "__main__":
    main()
