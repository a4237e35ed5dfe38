"""Every layout and file type normalises to the same Example; every bad record is named."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.config.data import Columns, DataConfig, Tags
from lmforge.data.files import DataError, read_records
from lmforge.data.formats import Example, problems, to_example
from lmforge.data.loader import load_examples
from lmforge.data.templates import ToolCall


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def load(path, needs="sft", **data):
    return load_examples(DataConfig(path=str(path), **data), needs).train


def test_alpaca_with_input_history_and_system(tmp_path):
    record = {
        "instruction": "translate",
        "input": "chat",
        "output": "cat",
        "system": "be short",
        "history": [["hi", "hello"]],
    }
    [ex] = load(write(tmp_path, "a.json", [record]))
    assert ex.kind == "sft"
    assert ex.system == "be short"
    assert ex.turns == (("hi", "hello"), ("translate\nchat", "cat"))
    assert ex.where.endswith("a.json: record 0")


def test_sharegpt_messages_and_parts_agree(tmp_path):
    sharegpt = {
        "conversations": [
            {"from": "system", "value": "s"},
            {"from": "human", "value": "u"},
            {"from": "gpt", "value": "a"},
        ]
    }
    openai = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "u"}]},
            {"role": "assistant", "content": "a"},
        ]
    }
    path = write(tmp_path, "m.jsonl", json.dumps(sharegpt) + "\n\n" + json.dumps(openai) + "\n")
    first, second = load(path)
    assert first.turns == second.turns == (("u", "a"),)
    assert first.system == second.system == "s"


def test_custom_sharegpt_tags_and_tool_turns(tmp_path):
    record = {
        "dialog": [
            {"who": "person", "text": "call it"},
            {"who": "tool_call", "text": '{"name": "f", "arguments": {}}'},
            {"who": "tool", "text": "42"},
            {"who": "bot", "text": "it is 42"},
        ]
    }
    tags = Tags(
        role_tag="who",
        content_tag="text",
        user_tag="person",
        assistant_tag="bot",
        observation_tag="tool",
        function_tag="tool_call",
    )
    ex = to_example(record, "r", "sharegpt", Columns(messages="dialog"), tags)
    # The call is the first answer's tool call and the tool's output the next turn's results
    # (docs/tools.md), not assistant and user text.
    assert ex.turns == (("call it", ""), ("", "it is 42"))
    assert ex.calls == {0: (ToolCall("f", {}),)} and ex.results == {1: ("42",)}
    record["dialog"][1]["text"] = "f()"
    with pytest.raises(DataError, match=r"r: dialog\[1\]: `text` is not valid JSON"):
        to_example(record, "r", "sharegpt", Columns(messages="dialog"), tags)


@pytest.mark.parametrize(
    "record",
    [
        {"instruction": "q", "input": "", "chosen": "good", "rejected": "bad"},
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        },
        {
            "conversations": [{"from": "human", "value": "q"}],
            "chosen": {"from": "gpt", "value": "good"},
            "rejected": {"from": "gpt", "value": "bad"},
        },
        {  # TRL implicit prompt: whole chats sharing a prefix
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}],
        },
    ],
)
def test_preference_layouts_agree(record):
    ex = to_example(record, "r", "auto")
    assert ex.kind == "preference"
    assert (ex.prompt, ex.response, ex.rejected) == ("q", "good", "bad")
    assert ex.conversation(ex.rejected).turns == [("q", "bad")]


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": "q", "completion": "a", "label": False},
        {"instruction": "q", "output": "a", "kto_tag": "false"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "kto_tag": 0},
    ],
)
def test_kto_layouts_agree(record):
    ex = to_example(record, "r", "auto")
    assert ex.kind == "kto" and ex.label is False and (ex.prompt, ex.response) == ("q", "a")


def test_prompt_only_keeps_reference_fields():
    ex = to_example({"prompt": "2+2?", "answer": "4", "difficulty": 1}, "r", "auto")
    assert ex.kind == "prompt" and ex.prompt == "2+2?" and ex.response == ""
    assert ex.reference == {"answer": "4", "difficulty": 1}
    chat = to_example({"messages": [{"role": "user", "content": "hi"}], "solution": "x"}, "r", "auto")
    assert chat.kind == "prompt" and chat.reference == {"solution": "x"}


def test_images_resolve_inside_the_dataset_folder(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"png")
    record = {
        "messages": [{"role": "user", "content": "<image>what?"}, {"role": "assistant", "content": "a"}]
    }
    ex = to_example({**record, "images": ["img/a.png"]}, "r", "auto", root=tmp_path)
    assert ex.images == ((tmp_path / "img" / "a.png").resolve(),)
    assert problems(ex, "sft") == []
    for escape in ("../secret.png", "/etc/passwd", "img/../../x.png"):
        with pytest.raises(DataError, match="outside the dataset folder"):
            to_example({**record, "images": [escape]}, "r", "auto", root=tmp_path)


def test_image_count_must_match_placeholders_and_files_must_exist(tmp_path):
    record = {"instruction": "<image><image> compare", "output": "same", "images": ["a.png"]}
    codes = [code for code, _ in problems(to_example(record, "r", "auto", root=tmp_path), "sft")]
    assert codes == ["image_mismatch", "missing_image"]


def test_training_refuses_bad_records_naming_each(tmp_path):
    records = [
        {"instruction": "a", "output": "b"},
        {"instruction": "c"},  # prompt-only: nothing to learn
        {"instruction": "<image>", "output": "d"},  # placeholder without an image
    ]
    with pytest.raises(DataError) as err:
        load(write(tmp_path, "a.json", records))
    message = str(err.value)
    assert "2 problem(s)" in message
    assert "record 1 has an empty response" in message
    assert "record 2 has 1 `<image>` placeholder(s) but 0 image(s)" in message


@pytest.mark.parametrize("suffix", ["json", "jsonl", "csv", "parquet"])
def test_every_file_type_reads_the_same(tmp_path, suffix):
    rows = [
        {"instruction": "add 1 and 2", "input": "", "output": "3"},
        {"instruction": "say hi", "input": "now", "output": 'hi, "you"'},
    ]
    path = tmp_path / f"d.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(rows))
    elif suffix == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif suffix == "csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    assert [e.turns for e in load(path)] == [(("add 1 and 2", "3"),), (("say hi\nnow", 'hi, "you"'),)]


def test_folder_of_files_and_txt_lines(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second\n\nthird\n")
    (folder / "sub" / "a.jsonl").write_text('{"text": "first"}\n')
    (folder / "notes.md").write_text("ignored")
    texts = [e.text for e in load(folder, needs="text")]
    assert texts == ["second", "third", "first"]  # b.txt before sub/a.jsonl: sorted paths


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(DataError, match="not a file or folder"):
        load(tmp_path / "nope.json")


def test_malformed_record_names_file_and_index(tmp_path):
    path = write(
        tmp_path, "a.json", [{"instruction": "x", "output": "y"}, {"instruction": "x", "output": [3]}]
    )
    with pytest.raises(DataError) as err:
        load(path)
    assert f"{path}: record 1: `output` is a list, expected a string" in str(err.value)


def test_bad_jsonl_line_is_named(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_records(path)


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "two user messages in a row"),
        ([{"role": "assistant", "content": "a"}], "an assistant message first"),
        ([{"role": "user", "content": "a"}], "empty response"),
        ([{"role": "bot", "content": "a"}], "role `bot`"),
        ([{"role": "user"}], "`role` and `content`"),
    ],
)
def test_bad_messages(tmp_path, messages, problem):
    path = write(tmp_path, "m.json", [{"messages": messages}])
    with pytest.raises(DataError, match=problem) as err:
        load(path)
    assert "record 0" in str(err.value)


def test_unknown_format_says_what_is_expected(tmp_path):
    with pytest.raises(DataError, match="cannot tell its format"):
        load(write(tmp_path, "a.json", [{"query_text": "q", "reply": "a"}]))


def test_gsm8k_question_answer_records(tmp_path):
    """`question`/`answer` (GSM8K) reads as a prompt with its reference; mapped columns make it SFT."""
    path = write(tmp_path, "g.json", [{"question": "2+2?", "answer": "2+2=4\n#### 4"}])
    example = load(path, needs="prompt")[0]
    assert (example.kind, example.prompt, example.reference) == (
        "prompt",
        "2+2?",
        {"answer": "2+2=4\n#### 4"},
    )
    source = {"path": str(path), "columns": {"prompt": "question", "response": "answer"}}
    assert load_examples(DataConfig(datasets=[source]), "sft").train[0].response == "2+2=4\n#### 4"


def test_text_records_rejected_for_sft_but_read_for_pretraining(tmp_path):
    path = write(tmp_path, "t.json", [{"text": "hello"}])
    with pytest.raises(DataError, match="this stage needs an instruction"):
        load(path)
    assert [e.text for e in load(path, needs="text")] == ["hello"]


def test_example_kind_table():
    assert Example(text="t").kind == "text"
    assert Example(turns=(("q", ""),)).kind == "prompt"
    assert Example(turns=(("q", "a"),)).kind == "sft"
    assert Example(turns=(("q", "a"),), label=True).kind == "kto"
    assert Example(turns=(("q", "a"),), rejected="b").kind == "preference"


def test_a_label_that_is_not_boolean_is_an_ordinary_field():
    ex = to_example({"instruction": "q", "output": "a", "label": "math"}, "r", "auto")
    assert ex.kind == "sft" and ex.reference == {"label": "math"}
    assert to_example({"instruction": "q", "output": "a", "label": 1}, "r", "auto").kind == "sft"


def test_csv_keeps_answers_as_text_and_decodes_message_columns(tmp_path):
    path = tmp_path / "d.csv"
    messages = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    with path.open("w", newline="", encoding="utf-8-sig") as handle:  # with a BOM, as Excel writes
        writer = csv.writer(handle)
        writer.writerow(["instruction", "output"])
        writer.writerow(["Is the sky blue?", "true"])
        writer.writerow(["List two", "[1, 2]"])
    assert [e.response for e in load(path)] == ["true", "[1, 2]"]
    chat = tmp_path / "c.csv"
    with chat.open("w", newline="") as handle:
        csv.writer(handle).writerows([["messages"], [messages]])
    assert load(chat)[0].turns == (("hi", "yo"),)


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"messages": [{"role": ["user"], "content": "x"}]}, "has role"),
        (
            {
                "chosen": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a1"},
                    {"role": "assistant", "content": "a2"},
                ],
                "rejected": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a1"},
                    {"role": "assistant", "content": "b"},
                ],
            },
            "same conversation up to a user message",
        ),
        (
            {
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] * 1
                + [{"role": "assistant", "content": "b"}]
            },
            "two assistant messages in a row",
        ),
        ({"instruction": "q", "output": "a", "images": ["."]}, "is empty"),
    ],
)
def test_more_malformed_records(tmp_path, record, problem):
    with pytest.raises(DataError, match=problem):
        to_example(record, "r", "auto", root=tmp_path)


def test_max_samples_stops_before_later_bad_lines(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"text": "a"}\n{"text": "b"}\n{oops\n')
    assert [e.text for e in load(path, needs="text", max_samples=2)] == ["a", "b"]
    with pytest.raises(DataError, match="line 3 is not valid JSON"):
        load(path, needs="text")


@pytest.mark.parametrize(
    ("record", "answer"),
    [
        ({"instruction": "add 1 and 2", "answer": "3"}, "answer"),
        ({"prompt": "add 1 and 2", "reply": "3"}, "reply"),
    ],
)
def test_an_answer_in_a_field_lmforge_does_not_read_is_named_with_the_mapping(tmp_path, record, answer):
    path = write(tmp_path, "a.json", [record])
    with pytest.raises(DataError) as err:
        load(path)
    message = str(err.value)
    fields = ", ".join(f"`{key}`" for key in record)
    assert f"{path}: record 0 has fields {fields}, none of which is an answer lmforge reads" in message
    assert "`output` (alpaca" in message and "`completion` or `response`" in message
    assert f"columns: {{response: {answer}}}" in message and "empty response" not in message
    mapped = load_examples(DataConfig(datasets=[{"path": str(path), "columns": {"response": answer}}]), "sft")
    assert mapped.train[0].response == "3", "the mapping the message names works"


def test_a_chat_ending_with_the_user_says_so(tmp_path):
    path = write(tmp_path, "m.json", [{"messages": [{"role": "user", "content": "q"}], "answer": "a"}])
    with pytest.raises(DataError, match="record 0 has fields `messages`, `answer` and its conversation ends"):
        load(path)


def test_an_unterminated_csv_quote_names_the_row_and_the_fix(tmp_path):
    path = write(tmp_path, "d.csv", 'instruction,output\nadd 1 and 2,3\n"add 2 and 2,4\nadd 3 and 3,6\n')
    with pytest.raises(DataError) as err:
        load(path)
    assert str(err.value) == (
        f'{path}: row 3 (line 3) opens a quoted cell (") that never closes, so the rest of the file would '
        'be one cell; close the quote, or write a quote inside a quoted cell as two ("")'
    )
    stray = write(tmp_path, "s.csv", 'instruction,output\n"add" 1,2\n')
    with pytest.raises(DataError, match=r"s.csv: row 2 \(line 2\) cannot be parsed as CSV .*doubled"):
        load(stray)
    # Quoted cells that span lines and doubled quotes still read, and rows after them are numbered.
    good = write(tmp_path, "g.csv", 'instruction,output\n"two\nlines",ok\n"say ""hi""",hi\n')
    assert [e.turns[0] for e in load(good)] == [("two\nlines", "ok"), ('say "hi"', "hi")]


def test_sft_refuses_preference_pairs_naming_the_fix(tmp_path):
    pairs = [
        {"instruction": "add 1 and 2", "output": "3"},
        {"instruction": "q", "chosen": "a", "rejected": "b"},
    ]
    path = write(tmp_path, "p.json", pairs)
    with pytest.raises(DataError) as err:
        load(path)
    assert "1 problem(s)" in str(err.value)
    assert f"{path}: record 1 is a preference pair (`chosen`/`rejected`)" in str(err.value)
    assert "method dpo, orpo or simpo" in str(err.value)
    assert load(write(tmp_path, "q.json", pairs[1:]), needs="preference")[0].rejected == "b"
