"""Property: any record, however malformed, gives an Example or one DataError — never a crash."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.config.data import DataConfig
from lmforge.data.files import DataError
from lmforge.data.formats import Example, problems, to_example
from lmforge.data.loader import load_examples

KEYS = [
    "instruction", "input", "output", "history", "system", "messages", "conversations", "prompt",
    "completion", "chosen", "rejected", "label", "kto_tag", "images", "text", "role", "content",
    "from", "value", "answer",
]  # fmt: skip
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8)
json_values = st.recursive(
    scalars | st.sampled_from(["user", "assistant", "system", "human", "gpt", "<image>", "a.png", "../x"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=20,
)
records = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6)
FORMATS = st.sampled_from(["auto", "alpaca", "sharegpt", "messages", "prompt", "text"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record=records, fmt=FORMATS)
def test_any_record_normalises_or_raises_data_error(tmp_path, record, fmt):
    try:
        example = to_example(record, "f.json: record 0", fmt, root=tmp_path)
    except DataError as exc:
        assert "f.json: record 0" in str(exc) or "outside the dataset folder" in str(exc)
        return
    assert isinstance(example, Example)
    for needs in ("sft", "preference", "kto", "prompt", "text"):
        for code, message in problems(example, needs):
            assert code and message


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    content=st.binary(max_size=200) | st.lists(records, max_size=3).map(json.dumps),
    suffix=st.sampled_from(["json", "jsonl", "csv", "txt"]),
)
def test_any_file_loads_or_raises_data_error(tmp_path, content, suffix):
    path = tmp_path / f"d.{suffix}"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    try:
        load_examples(DataConfig(path=str(path)), "sft")
    except DataError as exc:
        assert str(path) in str(exc) or "record" in str(exc)
