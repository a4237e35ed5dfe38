"""lmforge/artifacts.py: a file or folder is either whole at its path or not there."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
from typer.testing import CliRunner

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


def dead_pid() -> int:
    """The id of a process that has ended (a killed run's)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def stale_and_live(parent, name: str) -> tuple[list, list]:
    """Temporaries of `name` a killed run left (a folder and a file), and a live run's (kept)."""
    dead, live = dead_pid(), os.getppid()  # the process that started pytest runs
    stale = [parent / f".{name}.tmp-{dead}", parent / f".{name}.tmp-{dead}.0123abcd.tmp"]
    kept = [parent / f".{name}.tmp-{live}", parent / f".{name}.tmp-{live}.89ef.tmp"]
    for path in (stale[0], kept[0]):
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"half")
    for path in (stale[1], kept[1]):
        path.write_bytes(b"half")
    return stale, kept


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_a_write_removes_the_temporaries_a_killed_run_left_and_keeps_live_ones(tmp_path, kind):
    stale, kept = stale_and_live(tmp_path, "out")
    other = tmp_path / f".other.tmp-{dead_pid()}"  # another destination's: not this write's to remove
    other.mkdir()
    if kind == "folder":
        with atomic_folder(tmp_path / "out") as tmp:
            assert tmp.name == f".out.tmp-{os.getpid()}"
            (tmp / "a").write_text("1")
    else:
        write_atomic(tmp_path / "out", "1")
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept) and other.exists()
    assert (tmp_path / "out" / "a" if kind == "folder" else tmp_path / "out").read_text() == "1"


def test_an_export_run_removes_a_killed_exports_temporaries(tmp_path, base_dir):
    from lmforge.cli import app

    stale, kept = stale_and_live(tmp_path, "m.gguf")
    out = tmp_path / "m.gguf"
    result = CliRunner().invoke(
        app, ["export", "--model", str(base_dir), "--out", str(out), "--no-modelfile"]
    )
    assert result.exit_code == 0, result.output
    assert out.is_file() and not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["m.gguf", *(p.name for p in kept)]), json.dumps(names)
