"""Named datasets: datasets.yaml and LLaMA-Factory's dataset_info.json, read as-is."""

from __future__ import annotations

import json

import pytest

from lmforge.config.data import DataConfig, DatasetSource
from lmforge.data.files import DataError
from lmforge.data.loader import load_examples


def dump(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


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
