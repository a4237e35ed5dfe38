"""Issue 21's last silent acceptances in config and data files: duplicate keys, a folder or
non-UTF-8 file as the config, and peers' key names in "did you mean"."""

from __future__ import annotations

import pytest

from lmforge.config import ConfigError, load_config
from lmforge.data.files import DataError, iter_file


def test_a_duplicate_yaml_section_names_both_lines(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 0.001\nmodel:\n  name_or_path: x\ntrain:\n  lr: 5.0\n")
    with pytest.raises(ConfigError, match=r"key `train` is given twice, on lines 1 and 5"):
        load_config(path)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    from lmforge.config.loader import strict_yaml

    assert strict_yaml("base: &b {lr: 1}\ntrain:\n  <<: *b\n  lr: 2\n")["train"] == {"lr": 2}


def test_a_folder_or_a_non_utf8_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="is a folder; give the config's YAML file"):
        load_config(tmp_path)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("model:\n  name_or_path: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text .* save it as UTF-8"):
        load_config(latin)


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("train.learning_rate", "train.lr"),
        ("train.learnig_rate", "train.lr"),
        ("train.num_train_epochs", "train.epochs"),
        ("train.per_device_train_batch_size", "train.batch_size"),
        ("adapter.rank", "adapter.r"),
        ("adapter.lora_rank", "adapter.r"),
    ],
)
def test_did_you_mean_knows_peers_names(tmp_path, typed, meant):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name_or_path: x\ndata:\n  path: d.jsonl\n")
    with pytest.raises(ConfigError, match=f"did you mean `{meant}`"):
        load_config(path, [f"{typed}=1"])


def test_a_duplicate_json_key_in_a_record_is_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b", "output": "c"}\n')
    with pytest.raises(DataError, match=r"line 1: key `output` appears twice in one record"):
        list(iter_file(path))
