"""lmforge/artifacts.py: a file or folder is either whole at its path or not there."""

from __future__ import annotations

import stat

import pytest

from lmforge.artifacts import atomic_file, atomic_folder, save_artifact, write_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "sub" / "results.json"
    write_atomic(path, "old")
    with pytest.raises(RuntimeError, match="disk gone"), atomic_file(path) as temporary:
        temporary.write_bytes(b"half")
        raise RuntimeError("disk gone")
    assert path.read_text() == "old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]
    write_atomic(path, "new")
    assert path.read_text() == "new" and len(list(path.parent.iterdir())) == 1


def test_a_writer_gets_a_temporary_beside_the_destination(tmp_path):
    path = tmp_path / "loss.png"
    with atomic_file(path) as temporary:
        assert temporary.parent == tmp_path and temporary.name.endswith(".tmp") and not path.exists()
        temporary.write_bytes(b"png")
    assert path.read_bytes() == b"png"


def test_an_atomic_file_gets_the_mode_a_plain_write_gives(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = tmp_path / "atomic.txt"
    write_atomic(atomic, "x")
    assert stat.S_IMODE(atomic.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_a_failed_folder_leaves_the_old_folder(tmp_path):
    dest = tmp_path / "model"
    with atomic_folder(dest) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(KeyboardInterrupt), atomic_folder(dest) as tmp:
        (tmp / "a").write_text("2")
        raise KeyboardInterrupt
    assert (dest / "a").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_left_padding_call_is_not_saved_as_the_tokenizers_side(tmp_path, base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.data.templates import get_template

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    assert tokenizer.padding_side == "right"
    tokenizer(["a b c", "a"], padding=True, padding_side="left")  # as trl's GRPO pads its prompts
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    saved = save_artifact(model, tokenizer, get_template("chatml"), tmp_path / "model", "model", None)
    assert AutoTokenizer.from_pretrained(saved).padding_side == "right"
