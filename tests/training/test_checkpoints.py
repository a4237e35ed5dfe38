"""Only checkpoints marked complete are resumed from."""

from __future__ import annotations

import pytest

from lmforge.training.checkpoints import COMPLETE_MARKER, complete_checkpoints, resolve_resume


def make(root, step, complete=True):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / COMPLETE_MARKER).write_text("{}")
    return path


def test_auto_takes_latest_complete(tmp_path):
    make(tmp_path, 2)
    ten = make(tmp_path, 10)
    make(tmp_path, 12, complete=False)
    (tmp_path / "checkpoint-x").mkdir()
    assert complete_checkpoints(tmp_path) == [tmp_path / "checkpoint-2", ten]
    assert resolve_resume(tmp_path, "auto") == str(ten)


def test_auto_with_nothing_and_none(tmp_path):
    assert resolve_resume(tmp_path / "missing", "auto") is None
    assert resolve_resume(tmp_path, "none") is None


def test_explicit_incomplete_checkpoint_is_refused(tmp_path):
    half = make(tmp_path, 4, complete=False)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(half))
    with pytest.raises(FileNotFoundError):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-99"))
