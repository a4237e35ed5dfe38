"""Generation speed: KV cache on/off, batch 1 vs 8, lmforge's engine vs a plain transformers loop, and
the server's round-trip overhead against a direct call.

Model: the quickstart's pre-trained tiny Llama (built once in --workdir) with its merged SFT model.
Every variant generates exactly --new-tokens tokens per prompt (min = max new tokens, greedy), for
the same 32 chat prompts, best of 2 runs, so tokens/s compare like for like.

- engine, batch 8 / batch 1: `Engine.generate` (template, left padding, KV cache);
- engine, no KV cache: the same with `use_cache=False`;
- plain transformers loop: `model.generate` one prompt at a time on the template-rendered text, the
  way a script without an engine does it;
- server: `lmforge serve` on 127.0.0.1 answering the same prompts one by one through the `openai`
  client, against `Engine.generate` on one prompt at a time (the overhead is HTTP + JSON + queueing).

Usage::

    .venv/bin/python bench/generate.py --out bench/generate.json
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from pathlib import Path

import torch


def best_of(runs: int, work) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("runs/bench-generate"))
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    torch.set_num_threads(2)
    if not (a.workdir / "merged").is_dir():
        from lmforge.pipeline.quickstart import run_quickstart

        run_quickstart(a.workdir)
    from lmforge.data.templates import Conversation
    from lmforge.inference.engine import Engine, SamplingParams

    engine = Engine.load(str(a.workdir / "merged"))
    records = json.loads((a.workdir / "data" / "heldout.json").read_text())[:32]
    prompts = [r["instruction"] for r in records]
    conversations = [Conversation(turns=[(q, "")]) for q in prompts]
    n = a.new_tokens
    params = SamplingParams(max_new_tokens=n)
    tokens = len(prompts) * n
    original = engine._generate_kwargs  # min_new_tokens = n below: every variant makes exactly n tokens

    def forced(p, use_cache=True):
        return {**original(p), "min_new_tokens": n, "use_cache": use_cache}

    rows = {}
    engine._generate_kwargs = lambda p: forced(p)
    rows["engine, batch 8"] = best_of(2, lambda: engine.generate(conversations, params, batch_size=8))
    rows["engine, batch 1"] = best_of(2, lambda: engine.generate(conversations, params, batch_size=1))
    engine._generate_kwargs = lambda p: forced(p, use_cache=False)
    rows["engine, batch 8, no KV cache"] = best_of(
        2, lambda: engine.generate(conversations, params, batch_size=8)
    )
    engine._generate_kwargs = lambda p: forced(p)

    tokenizer, model = engine.tokenizer, engine.model

    def plain_loop() -> None:
        for conversation in conversations:
            ids = tokenizer(engine.prompt_text(conversation), return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                model.generate(
                    **ids,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )

    rows["plain transformers loop, batch 1"] = best_of(2, plain_loop)
    engine._generate_kwargs = original  # the server and the direct call both stop at the stop token

    # Server round trip, one prompt at a time, against the engine on one prompt at a time.
    import openai
    import uvicorn

    from lmforge.inference.server import Served, create_app

    served = Served(engine, "tiny", [], None)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(served, "k", n), host="127.0.0.1", port=port, log_level="error")
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)

    def through_server() -> None:
        for q in prompts:
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": q}], max_tokens=n, temperature=0
            )

    served_seconds = best_of(2, through_server)
    server.should_exit = True
    direct_one = best_of(2, lambda: [engine.generate([c], params) for c in conversations])

    base = rows["engine, batch 8"]
    print(f"{'variant':<36} {'seconds':>8} {'tok/s':>8} {'vs engine b8':>13}")
    for name, seconds in rows.items():
        print(f"{name:<36} {seconds:>8.3f} {tokens / seconds:>8.0f} {base / seconds:>12.2f}x")
    overhead = (served_seconds - direct_one) / len(prompts) * 1000
    print(
        f"server round trip: {served_seconds:.3f} s vs direct {direct_one:.3f} s "
        f"({overhead:.1f} ms per request)"
    )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "new_tokens": n,
            "prompts": len(prompts),
            "seconds": rows,
            "server": served_seconds,
            "direct": direct_one,
        }
        a.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
