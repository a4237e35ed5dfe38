"""The bench scripts' plumbing (docs/benchmarks.md): each runs end to end on tiny inputs here, so
the numbers a longer run or a lent GPU machine produces come from code that works. Timings are
printed, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "bench"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def test_data_prep_compares_one_process_workers_and_the_cache(tmp_path):
    out = tmp_path / "data_prep.json"
    done = run("data_prep.py", "--records", "3000", "--num-proc", "2", "--out", str(out))
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"1 process", "2 processes", "cold (writes the cache)", "rerun (from the cache)"}
    assert all(r["records_per_s"] > 0 for r in runs.values()) and "speed-up over 1 process" in done.stdout


def test_the_gpu_bench_runs_its_lora_variants_on_tiny_shapes(tmp_path):
    """On CPU: lmforge's LoRA with and without kernels: auto (Liger is off on CPU) and trl's
    defaults train, and each reports tokens/s, MFU, peak memory and the longest context; the
    4-bit variants say they need CUDA."""
    out = tmp_path / "gpu.json"
    run("gpu.py", "--smoke", "--out", str(out))
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    for variant in ("lmforge_lora", "lmforge_lora_kernels", "trl_lora"):
        result = results[variant]
        assert result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1 and result["longest_context"] >= 512, (
            result
        )
        assert result["liger"] is False
    assert results["lmforge_qlora"]["skipped"].startswith("4-bit training needs CUDA")
