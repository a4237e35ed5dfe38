"""Named datasets: datasets.yaml and LLaMA-Factory's dataset_info.json, read as-is."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from lmforge.config import validate_config
from lmforge.config.data import DataConfig, DatasetSource
from lmforge.data.files import DataError
from lmforge.data.loader import iter_examples, load_examples, peek
from lmforge.methods import pretrain


def dump(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


C4_TEXTS = ["the cat sat on a mat", "a dog ran to the hat"]
WIKI_LINES = ["red blue green", "what is the sum of add"]
CSV_TEXTS = ["the dog is red", "a cat is blue"]
PARQUET_TEXTS = ["sum of the cat", "hat and mat"]
SHARD_TEXTS = ["first shard text", "second shard text"]


@pytest.fixture
def llamafactory_dir(tmp_path):
    """A data folder laid out like LLaMA-Factory's `data/`, with its dataset_info.json."""
    root = tmp_path / "data"
    dump(root / "alpaca_demo.json", [{"instruction": "hi", "input": "", "output": "hello", "sys": "s"}])
    dump(
        root / "sharegpt_demo.json",
        [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}],
    )
    dump(
        root / "openai_demo.json",
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
    )
    dump(root / "dpo_alpaca.json", [{"instruction": "q", "input": "", "chosen": "good", "rejected": "bad"}])
    dump(
        root / "dpo_sharegpt.json",
        [
            {
                "conversations": [{"from": "human", "value": "q"}],
                "chosen": {"from": "gpt", "value": "good"},
                "rejected": {"from": "gpt", "value": "bad"},
            }
        ],
    )
    dump(
        root / "kto_demo.json",
        [
            {
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "label": True,
            }
        ],
    )
    (root / "mllm_demo_data").mkdir()
    (root / "mllm_demo_data" / "1.jpg").write_bytes(b"jpg")
    dump(
        root / "mllm_demo.json",
        [
            {
                "messages": [
                    {"role": "user", "content": "<image>Who is this?"},
                    {"role": "assistant", "content": "a cat"},
                ],
                "images": ["mllm_demo_data/1.jpg"],
            }
        ],
    )
    # Pre-training corpora, written as LLaMA-Factory writes c4_demo / wiki_demo and the web corpora.
    (root / "c4_demo.jsonl").write_text(
        "\n".join(json.dumps({"text": t, "timestamp": "2019"}) for t in C4_TEXTS) + "\n"
    )
    (root / "wiki_demo.txt").write_text("\n".join(WIKI_LINES) + "\n")
    (root / "web.csv").write_text("content,url\n" + "\n".join(f"{t},http://x" for t in CSV_TEXTS) + "\n")
    pq.write_table(pa.table({"raw_content": PARQUET_TEXTS, "id": [1, 2]}), root / "web.parquet")
    dump(root / "web_shards" / "00.json", [{"text": SHARD_TEXTS[0]}])
    (root / "web_shards" / "01.jsonl").write_text(json.dumps({"text": SHARD_TEXTS[1]}) + "\n")
    dump(root / "titled.json", [{"title": "the cat", "body": "sat on a mat"}, {"title": "a dog", "body": ""}])
    # Instruction data of every other kind, in the file types the registry reads.
    (root / "alpaca.csv").write_text("q,ctx,a\nadd 1 and 2,,3\nwhat is,red,a colour\n")
    pq.write_table(
        pa.table(
            {
                "conversations": [
                    [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                ]
            }
        ),
        root / "sharegpt.parquet",
    )
    dump(root / "alpaca_shards" / "a.json", [{"instruction": "q1", "output": "a1"}])
    dump(root / "alpaca_shards" / "b.json", [{"instruction": "q2", "output": "a2"}])
    dump(root / "kto_alpaca.json", [{"instruction": "q", "output": "a", "kto_tag": False}])
    dump(
        root / "history.json",
        [{"instruction": "and 2?", "output": "4", "history": [["add 1", "2"]], "system": "s"}],
    )
    openai_tags = {
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
    }
    dump(
        root / "dataset_info.json",
        {
            "alpaca_demo": {"file_name": "alpaca_demo.json", "columns": {"system": "sys"}},
            "sharegpt_demo": {"file_name": "sharegpt_demo.json", "formatting": "sharegpt"},
            "openai_demo": {
                "file_name": "openai_demo.json",
                "formatting": "sharegpt",
                "columns": {"messages": "messages"},
                "tags": {**openai_tags, "system_tag": "system"},
            },
            "dpo_alpaca": {
                "file_name": "dpo_alpaca.json",
                "ranking": True,
                "columns": {
                    "prompt": "instruction",
                    "query": "input",
                    "chosen": "chosen",
                    "rejected": "rejected",
                },
            },
            "dpo_sharegpt": {
                "file_name": "dpo_sharegpt.json",
                "ranking": True,
                "formatting": "sharegpt",
                "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
            },
            "kto_demo": {
                "file_name": "kto_demo.json",
                "formatting": "sharegpt",
                "columns": {"messages": "messages", "kto_tag": "label"},
                "tags": openai_tags,
            },
            "mllm_demo": {
                "file_name": "mllm_demo.json",
                "formatting": "sharegpt",
                "columns": {"messages": "messages", "images": "images"},
                "tags": openai_tags,
            },
            "c4_demo": {"file_name": "c4_demo.jsonl", "columns": {"prompt": "text"}},
            "wiki_demo": {"file_name": "wiki_demo.txt", "columns": {"prompt": "text"}},
            "web_csv": {
                "file_name": "web.csv",
                "formatting": "alpaca",
                "ranking": False,
                "columns": {"prompt": "content"},
            },
            "web_parquet": {"file_name": "web.parquet", "columns": {"prompt": "raw_content"}},
            "web_shards": {"file_name": "web_shards", "columns": {"prompt": "text"}},
            "titled": {"file_name": "titled.json", "columns": {"prompt": "title", "query": "body"}},
            "pt_with_answers": {
                "file_name": "alpaca_demo.json",
                "columns": {"prompt": "instruction", "response": "output"},
            },
            "alpaca_csv": {
                "file_name": "alpaca.csv",
                "columns": {"prompt": "q", "query": "ctx", "response": "a"},
            },
            "sharegpt_parquet": {"file_name": "sharegpt.parquet", "formatting": "sharegpt"},
            "alpaca_shards": {"file_name": "alpaca_shards"},
            "kto_alpaca": {
                "file_name": "kto_alpaca.json",
                "columns": {"prompt": "instruction", "response": "output", "kto_tag": "kto_tag"},
            },
            "history": {
                "file_name": "history.json",
                "columns": {
                    "prompt": "instruction",
                    "response": "output",
                    "history": "history",
                    "system": "system",
                },
            },
            "escape": {"file_name": "../outside.json"},
            "hub_only": {"hf_hub_url": "someone/some-data"},
        },
    )
    return root


@pytest.mark.parametrize(
    ("name", "needs", "kind", "turns"),
    [
        ("alpaca_demo", "sft", "sft", (("hi", "hello"),)),
        ("sharegpt_demo", "sft", "sft", (("q", "a"),)),
        ("openai_demo", "sft", "sft", (("q", "a"),)),
        ("dpo_alpaca", "preference", "preference", (("q", "good"),)),
        ("dpo_sharegpt", "preference", "preference", (("q", "good"),)),
        ("kto_demo", "kto", "kto", (("q", "a"),)),
        ("mllm_demo", "sft", "sft", (("<image>Who is this?", "a cat"),)),
        ("sharegpt_parquet", "sft", "sft", (("q", "a"),)),
        ("kto_alpaca", "kto", "kto", (("q", "a"),)),
        ("history", "sft", "sft", (("add 1", "2"), ("and 2?", "4"))),
    ],
)
def test_llamafactory_entries_load(llamafactory_dir, name, needs, kind, turns):
    [example] = load_examples(DataConfig(path=name, dataset_dir=str(llamafactory_dir)), needs).train
    assert example.kind == kind and example.turns == turns
    if name == "alpaca_demo":
        assert example.system == "s"  # the `columns.system` mapping is honoured
    if kind == "preference":
        assert example.rejected == "bad"
    if name == "mllm_demo":
        assert example.images == ((llamafactory_dir / "mllm_demo_data" / "1.jpg").resolve(),)


def test_registry_paths_cannot_escape(llamafactory_dir):
    with pytest.raises(DataError, match="outside the dataset folder"):
        load_examples(DataConfig(path="escape", dataset_dir=str(llamafactory_dir)), "sft")


def test_unknown_name_suggests_a_registered_one(llamafactory_dir):
    with pytest.raises(DataError, match="did you mean the registered dataset `alpaca_demo`"):
        load_examples(DataConfig(path="alpaca_dem", dataset_dir=str(llamafactory_dir)), "sft")


def test_hub_entry_without_network_fails_clearly(llamafactory_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="loading it from the hub failed"):
        load_examples(DataConfig(path="hub_only", dataset_dir=str(llamafactory_dir)), "sft")


def test_lmforge_yaml_registry_and_weights_from_config(tmp_path):
    dump(tmp_path / "chat" / "a.json", [{"dialog": [{"r": "u", "c": "q"}, {"r": "b", "c": "a"}]}] * 5)
    (tmp_path / "datasets.yaml").write_text(
        "mine:\n"
        "  path: chat/a.json\n"
        "  format: sharegpt\n"
        "  columns: {messages: dialog}\n"
        "  tags: {role_tag: r, content_tag: c, user_tag: u, assistant_tag: b}\n"
        "  max_samples: 4\n"
    )
    data = DataConfig(datasets=[DatasetSource(path="mine", max_samples=2)], dataset_dir=str(tmp_path))
    loaded = load_examples(data, "sft")
    assert [e.turns for e in loaded.train] == [(("q", "a"),)] * 2  # the config's max_samples wins
    assert loaded.read == {"mine": 2}


def test_bad_registry_entry_is_named(tmp_path):
    (tmp_path / "datasets.yaml").write_text("mine:\n  path: a.json\n  weight: 2\n  formt: alpaca\n")
    (tmp_path / "a.json").write_text("[]")
    with pytest.raises(DataError, match="dataset `mine`: formt"):
        load_examples(DataConfig(path="mine", dataset_dir=str(tmp_path)), "sft")


def test_llamafactory_csv_and_folder_entries_load(llamafactory_dir):
    csv = load_examples(DataConfig(path="alpaca_csv", dataset_dir=str(llamafactory_dir)), "sft").train
    assert [e.turns for e in csv] == [(("add 1 and 2", "3"),), (("what is\nred", "a colour"),)]
    shards = load_examples(DataConfig(path="alpaca_shards", dataset_dir=str(llamafactory_dir)), "sft")
    assert [e.turns for e in shards.train] == [(("q1", "a1"),), (("q2", "a2"),)]  # files in name order


# --- pre-training entries: `columns: {prompt: text}` is the text when the stage pre-trains ----------

PRETRAIN_ENTRIES = {
    "c4_demo": C4_TEXTS,
    "wiki_demo": WIKI_LINES,
    "web_csv": CSV_TEXTS,
    "web_parquet": PARQUET_TEXTS,
    "web_shards": SHARD_TEXTS,
    # LLaMA-Factory's pt stage: the prompt column, then the query column on a new line when it has text.
    "titled": ["the cat\nsat on a mat", "a dog"],
}


@pytest.mark.parametrize("name", sorted(PRETRAIN_ENTRIES))
def test_pretraining_reads_the_prompt_column_as_text(llamafactory_dir, name):
    data = DataConfig(path=name, dataset_dir=str(llamafactory_dir))
    loaded = load_examples(data, "text")
    assert [e.kind for e in loaded.train] == ["text"] * len(PRETRAIN_ENTRIES[name])
    assert [e.text for e in loaded.train] == PRETRAIN_ENTRIES[name]
    # Streamed (data.streaming) the same way, and the streamed mix passes its up-front check.
    assert [e.text for e in iter_examples(data, "text")] == PRETRAIN_ENTRIES[name]
    peek(data, "text")


def test_the_stage_decides_how_a_prompt_column_reads(llamafactory_dir):
    data = DataConfig(path="c4_demo", dataset_dir=str(llamafactory_dir))
    [first, _] = load_examples(data, "prompt").train  # for GRPO/PPO the same column is a prompt
    assert first.kind == "prompt" and first.prompt == C4_TEXTS[0] and first.reference == {"timestamp": "2019"}
    with pytest.raises(DataError, match="line 1 has fields `text`, `timestamp`, none of which is an answer"):
        load_examples(data, "sft")


@pytest.mark.parametrize("name", ["alpaca_demo", "sharegpt_demo", "dpo_sharegpt", "kto_demo"])
def test_pretraining_refuses_entries_without_a_prompt_column(llamafactory_dir, name):
    with pytest.raises(DataError, match="pre-training reads `text`.*columns.prompt"):
        load_examples(DataConfig(path=name, dataset_dir=str(llamafactory_dir)), "text")


@pytest.mark.parametrize(
    ("name", "dropped"),
    [
        ("pt_with_answers", r"alpaca_demo.json: record 0: `output` \(columns.response\)"),
        ("dpo_alpaca", r"dpo_alpaca.json: record 0: `chosen` \(columns.chosen\)"),
        ("history", r"history.json: record 0: `output` \(columns.response\)"),
    ],
)
def test_pretraining_refuses_to_drop_mapped_answers(llamafactory_dir, name, dropped):
    # LLaMA-Factory's pt stage would train on the instruction alone and silently drop the answers.
    with pytest.raises(DataError, match=f"{dropped} holds text that pre-training would not read"):
        load_examples(DataConfig(path=name, dataset_dir=str(llamafactory_dir)), "text")


def test_method_pretrain_trains_on_llamafactory_corpora(llamafactory_dir, base_dir, tmp_path):
    config = {
        "method": {"name": "pretrain"},
        "model": {"name_or_path": str(base_dir)},
        "adapter": {"method": "none"},
        "data": {
            "datasets": [{"path": "c4_demo"}, {"path": "titled"}, {"path": "web_parquet"}],
            "dataset_dir": str(llamafactory_dir),
            "max_length": 16,
        },
        "train": {
            "output_dir": str(tmp_path / "pt"),
            "max_steps": 2,
            "batch_size": 2,
            "logging_steps": 1,
            "progress": False,
            "tensorboard": False,
        },
    }
    result = pretrain.run(validate_config(config), quiet=True)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    texts = C4_TEXTS + PRETRAIN_ENTRIES["titled"] + PARQUET_TEXTS
    total = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)  # + EOS each
    assert result.stats.tokens == total - (1 if total % 16 == 1 else 0)  # a 1-token tail is no block
    assert result.steps == 2
