"""Mixing, limits, validation split, prompt-template randomisation, reasoning, streaming."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest

from lmforge.config.data import DataConfig, DatasetSource
from lmforge.data.files import DataError
from lmforge.data.loader import iter_examples, load_examples


def alpaca(path, tag, n):
    path.write_text(json.dumps([{"instruction": f"{tag} {i}", "output": tag} for i in range(n)]))
    return str(path)


def test_weighted_mix_holds_ratio_over_10k_draws(tmp_path):
    a, b = alpaca(tmp_path / "a.json", "a", 10_000), alpaca(tmp_path / "b.json", "b", 10_000)
    data = DataConfig(datasets=[DatasetSource(path=a, weight=2.0), DatasetSource(path=b, weight=1.0)], seed=3)
    mixed = load_examples(data, "sft").train
    first = Counter(e.response for e in mixed[:10_000])
    assert abs(first["a"] / 10_000 - 2 / 3) < 0.02
    # interleave_under stops when a dataset runs out: the heavier one, after ~15k draws.
    assert sum(e.response == "a" for e in mixed) == 10_000 and len(mixed) < 20_000
    # The same seed gives the same order; another seed another.
    assert [e.prompt for e in load_examples(data, "sft").train[:50]] == [e.prompt for e in mixed[:50]]
    other = load_examples(data.model_copy(update={"seed": 4}), "sft").train
    assert [e.prompt for e in other[:50]] != [e.prompt for e in mixed[:50]]


def test_concat_interleave_over_and_max_samples(tmp_path):
    a, b = alpaca(tmp_path / "a.json", "a", 10), alpaca(tmp_path / "b.json", "b", 3)
    sources = [DatasetSource(path=a, max_samples=6), DatasetSource(path=b)]
    concat = load_examples(DataConfig(datasets=sources), "sft")
    assert [e.response for e in concat.train] == ["a"] * 6 + ["b"] * 3
    assert concat.read == {a: 6, b: 3}
    over = load_examples(DataConfig(datasets=sources, mix="interleave_over"), "sft").train
    counts = Counter(e.prompt for e in over)
    # Every example of both datasets appears; the smaller one is repeated to keep its share.
    assert {f"a {i}" for i in range(6)} | {f"b {i}" for i in range(3)} <= set(counts)
    assert sum(c for p, c in counts.items() if p.startswith("b")) > 3


def test_val_size_split_is_disjoint_and_seeded(tmp_path):
    data = DataConfig(path=alpaca(tmp_path / "a.json", "a", 100), val_size=0.1, seed=1)
    loaded = load_examples(data, "sft")
    assert len(loaded.eval) == 10 and len(loaded.train) == 90
    assert not {e.prompt for e in loaded.eval} & {e.prompt for e in loaded.train}
    assert [e.prompt for e in load_examples(data, "sft").eval] == [e.prompt for e in loaded.eval]


def test_prompt_templates_drawn_per_example_with_seed(tmp_path):
    phrasings = ["Q: {prompt}", "Please answer: {prompt}", "{prompt} (be brief)"]
    data = DataConfig(path=alpaca(tmp_path / "a.json", "a", 300), prompt_templates=phrasings, seed=7)
    prompts = [e.prompt for e in load_examples(data, "sft").train]
    used = Counter(
        next(p for p in phrasings if p.replace("{prompt}", f"a {i}") == text)
        for i, text in enumerate(prompts)
    )
    assert set(used) == set(phrasings) and min(used.values()) > 60  # each drawn about 1/3 of the time
    assert prompts == [e.prompt for e in load_examples(data, "sft").train]  # reproducible
    with pytest.raises(ValueError, match="no `\\{prompt\\}` placeholder"):
        DataConfig(path="x", prompt_templates=["no placeholder"])


def test_reasoning_drop_and_default_system(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"instruction": "2+2", "output": "<think>\n2 and 2\n</think>\n\n4"}]))
    kept = load_examples(DataConfig(path=str(path), system="sys"), "sft").train[0]
    dropped = load_examples(DataConfig(path=str(path), reasoning="drop"), "sft").train[0]
    assert kept.response.startswith("<think>") and kept.system == "sys"
    assert dropped.response == "4" and dropped.system is None


def test_streaming_reads_lazily_in_the_same_order(tmp_path):
    a, b = alpaca(tmp_path / "a.jsonl", "a", 0), alpaca(tmp_path / "b.json", "b", 50)
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"instruction": f"a {i}", "output": "a"}) for i in range(50))
    )
    data = DataConfig(datasets=[DatasetSource(path=a, weight=3), DatasetSource(path=b)], seed=0)
    eager = [e.prompt for e in load_examples(data, "sft").train]
    lazy = [e.prompt for e in itertools.islice(iter_examples(data), len(eager))]
    assert lazy == eager


def test_path_and_datasets_are_exclusive():
    with pytest.raises(ValueError, match="either data.path"):
        DataConfig(path="a.json", datasets=[DatasetSource(path="b.json")])


def test_val_size_keeps_at_least_one_training_example(tmp_path):
    two = DataConfig(path=alpaca(tmp_path / "two.json", "a", 2), val_size=0.96)
    loaded = load_examples(two, "sft")
    assert len(loaded.train) == 1 and len(loaded.eval) == 1
    with pytest.raises(DataError, match="needs at least 2"):
        load_examples(DataConfig(path=alpaca(tmp_path / "one.json", "a", 1), val_size=0.1), "sft")


def test_val_size_is_held_out_before_oversampling(tmp_path):
    a, b = alpaca(tmp_path / "a.json", "a", 40), alpaca(tmp_path / "b.json", "b", 4)
    data = DataConfig(
        datasets=[DatasetSource(path=a), DatasetSource(path=b, weight=3)],
        mix="interleave_over",
        val_size=0.25,
    )
    loaded = load_examples(data, "sft")
    assert not {e.prompt for e in loaded.eval} & {e.prompt for e in loaded.train}
    assert len(loaded.eval) == 10 + 1
