"""Reading records: alpaca and messages normalise alike; every bad record is named."""

from __future__ import annotations

import json

import pytest

from lmforge.data.formats import DataError, load_conversations, load_texts, read_records


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_alpaca_with_input_history_and_system(tmp_path):
    path = write(
        tmp_path,
        "a.json",
        [
            {
                "instruction": "translate",
                "input": "chat",
                "output": "cat",
                "system": "be short",
                "history": [["hi", "hello"]],
            }
        ],
    )
    [conv] = load_conversations(path)
    assert conv.system == "be short"
    assert conv.turns == [("hi", "hello"), ("translate\nchat", "cat")]


def test_messages_jsonl(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"},
            ]
        }
    ]
    path = write(tmp_path, "m.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    [conv] = load_conversations(path)
    assert conv.system == "s" and conv.turns == [("u", "a")]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.json does not exist"):
        load_conversations(tmp_path / "nope.json")


def test_malformed_record_names_file_and_index(tmp_path):
    path = write(tmp_path, "a.json", [{"instruction": "x", "output": "y"}, {"instruction": "x", "output": 3}])
    with pytest.raises(DataError) as err:
        load_conversations(path)
    assert str(path) in str(err.value)
    assert "record 1" in str(err.value)
    assert "`output` is a int, expected a string" in str(err.value)


def test_bad_jsonl_line_is_named(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_records(path)


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "second user message"),
        ([{"role": "assistant", "content": "a"}], "no user message before it"),
        ([{"role": "user", "content": "a"}], "must end with the assistant"),
        ([{"role": "bot", "content": "a"}], "role `bot`"),
        ([{"role": "user"}], "`role` and `content`"),
    ],
)
def test_bad_messages(tmp_path, messages, problem):
    path = write(tmp_path, "m.json", [{"messages": messages}])
    with pytest.raises(DataError, match=problem) as err:
        load_conversations(path)
    assert "record 0" in str(err.value)


def test_unknown_format_says_what_is_expected(tmp_path):
    with pytest.raises(DataError, match="cannot tell its format"):
        load_conversations(write(tmp_path, "a.json", [{"question": "q", "answer": "a"}]))


def test_text_records_rejected_for_sft_but_read_for_pretraining(tmp_path):
    path = write(tmp_path, "t.json", [{"text": "hello"}])
    with pytest.raises(DataError, match="pretrain"):
        load_conversations(path)
    assert load_texts(path) == ["hello"]
    assert load_texts(write(tmp_path, "t.txt", "a\n\nb\n")) == ["a", "b"]
