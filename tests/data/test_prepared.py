"""Data preparation that scales (docs/data.md): tokenizing over worker processes gives the rows of
one process, and the tokenized data is cached on disk, keyed on everything that decides the rows
(a rerun reads no record; a changed file, setting or tokenizer is tokenized again)."""

from __future__ import annotations

import json

import pytest

from lmforge.config.data import DataConfig
from lmforge.data import cache
from lmforge.data.files import DataError
from lmforge.data.formats import to_example
from lmforge.data.templates import get_template
from lmforge.data.tokenize import PARALLEL_FROM, tokenize_examples


def records(count: int) -> list[dict]:
    """Alpaca records of a long-tailed length mix: some are cut at max_length 48, some dropped."""
    out = []
    for i in range(count):
        words = " ".join(["word"] * (i % 7) ** 2)
        out.append({"instruction": f"Say {i} {words}", "input": "", "output": f"{i} {'ok ' * (i % 5)}"})
    return out


def examples(count: int):
    return [to_example(r, f"data.json record {i}", "alpaca") for i, r in enumerate(records(count))]


def test_workers_tokenize_the_rows_of_one_process(tokenizer):
    many, template = examples(PARALLEL_FROM + 500), get_template("chatml")
    one, one_stats = tokenize_examples(many, template, tokenizer, 48, "all_turns", num_proc=1)
    two, two_stats = tokenize_examples(many, template, tokenizer, 48, "all_turns", num_proc=2)
    assert one.to_dict() == two.to_dict()
    assert one_stats == two_stats and one_stats.truncated > 0 and one_stats.dropped > 0


def test_a_record_a_worker_cannot_write_is_named(tokenizer):
    many = examples(PARALLEL_FROM)
    call = {"function": {"name": "add", "arguments": {}}}
    bad = {
        "messages": [
            {"role": "user", "content": "2+3?"},
            {"role": "assistant", "content": "Sure.", "tool_calls": [call]},
        ]
    }
    many[1500] = to_example(bad, "data.json record 1500", "messages")
    with pytest.raises(DataError, match="data.json record 1500: llama3.1's format writes"):
        tokenize_examples(many, get_template("llama3.1"), tokenizer, 48, num_proc=2)


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records(40)))
    return path


def test_a_rerun_reads_the_cache_and_no_record(tmp_path, data_file, tokenizer, monkeypatch):
    data, template = (
        DataConfig(path=str(data_file), max_length=48, cache_dir=str(tmp_path / "c")),
        get_template("chatml"),
    )
    (first, _, stats), hit = cache.sft_rows(data, template, tokenizer)
    assert hit is None and stats.examples > 0
    monkeypatch.setattr(cache, "load_examples", lambda *a: pytest.fail("a cached rerun read the records"))
    (again, evaluation, cached_stats), hit = cache.sft_rows(data, template, tokenizer)
    assert hit is not None and hit.parent == tmp_path / "c" / "tokenized"
    assert again.to_dict() == first.to_dict() and cached_stats == stats and evaluation is None
    assert not list(hit.parent.glob(".*tmp*"))  # written to a temporary folder, renamed into place


@pytest.mark.parametrize(
    "change",
    ["max_length", "template", "train_on", "file", "tokenizer", "system"],
)
def test_what_decides_the_rows_decides_the_key(tmp_path, data_file, tokenizer, change):
    import copy

    data, template, tok = DataConfig(path=str(data_file), max_length=48), get_template("chatml"), tokenizer
    before = cache.cache_key(data, "sft", tok, template)
    if change == "max_length":
        data = data.model_copy(update={"max_length": 64})
    elif change == "template":
        template = get_template("llama3")
    elif change == "train_on":
        data = data.model_copy(update={"train_on": "last_turn"})
    elif change == "system":
        data = data.model_copy(update={"system": "Be brief."})
    elif change == "file":
        data_file.write_text(json.dumps(records(41)))
    else:
        tok = copy.deepcopy(tokenizer)
        tok.add_tokens(["<new>"])
    assert cache.cache_key(data, "sft", tok, template) not in (None, before)
    # Where it is kept and how many workers tokenize it change no row.
    same = data.model_copy(update={"num_proc": 3, "cache_dir": str(tmp_path)})
    assert cache.cache_key(same, "sft", tok, template) == cache.cache_key(data, "sft", tok, template)


def test_what_is_not_cached(data_file, tokenizer):
    template = get_template("chatml")
    assert cache.cache_key(DataConfig(path=str(data_file), cache=False), "sft", tokenizer, template) is None
    assert cache.cache_key(DataConfig(path="tatsu-lab/alpaca"), "sft", tokenizer, template) is None


def test_sft_reruns_from_the_cache(tmp_path, base_dir, data_file):
    """The second run of a config says where its tokenized data came from and trains the same."""
    from typer.testing import CliRunner

    from lmforge.cli import app

    config = {
        "model": {"name_or_path": str(base_dir)},
        "data": {"path": str(data_file), "template": "chatml", "max_length": 48},
        "train": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 2,
            "batch_size": 4,
            "save_steps": 0,
            "progress": False,
            "tensorboard": False,
        },
    }
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(config))
    first = CliRunner().invoke(app, ["train", str(path)])
    assert first.exit_code == 0, first.output
    assert "from the cache" not in first.output
    config["train"]["output_dir"] = str(tmp_path / "again")
    path.write_text(json.dumps(config))
    second = CliRunner().invoke(app, ["train", str(path)])
    assert second.exit_code == 0 and "tokenized data from the cache" in " ".join(second.output.split())
