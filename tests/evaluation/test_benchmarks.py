"""Benchmark loaders (MMLU, CMMLU, C-Eval layouts), subject groups and k-shot prompts."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from lmforge.evaluation.benchmarks import (
    CATEGORIES,
    KINDS,
    SPLITS,
    SUBJECTS,
    Question,
    build_prompt,
    category_of,
    find_subjects,
    fixture_questions,
    groups_of,
    load_split,
    shots_for,
    subject_name,
    write_fixture,
)


def _content(questions: list[Question]) -> list[tuple[str, str, tuple[str, ...], str]]:
    return [(q.subject, q.question, q.choices, q.answer) for q in questions]


def _write(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
    return root


# --- loading ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_fixture_round_trips_exactly(kind, tmp_path):
    root = write_fixture(kind, tmp_path, {"world_religions": 7, "anatomy": 3}, seed=1)
    for split in SPLITS[kind]:
        assert find_subjects(kind, root, split) == ["anatomy", "world_religions"]
        loaded = load_split(kind, root, split)
        assert list(loaded) == ["anatomy", "world_religions"]
        for subject, questions in loaded.items():
            size = 5 if split == "dev" else {"world_religions": 7, "anatomy": 3}[subject]
            assert _content(questions) == _content(fixture_questions(kind, subject, split, size, seed=1))
    dev = load_split(kind, root, "dev", ["world_religions"])["world_religions"]
    name = "world_religions.csv" if kind == "cmmlu" else "world_religions_dev.csv"
    first_row = 1 if kind == "mmlu" else 2  # CMMLU and C-Eval files start with a header row
    assert dev[0].where == f"{root / 'dev' / name}:row {first_row}"
    # the fixture exercises CSV quoting and spreads its answers
    assert {q.answer for q in dev} == {"A", "B", "C", "D"}
    assert any("\n" in q.question and '"' in q.question for q in dev)
    assert any("," in choice for q in dev for choice in q.choices)


def test_fixture_differs_by_seed_and_ceval_test_has_no_answers(tmp_path):
    assert _content(fixture_questions("mmlu", "anatomy", "val", 6, seed=0)) != _content(
        fixture_questions("mmlu", "anatomy", "val", 6, seed=1)
    )
    root = write_fixture("ceval", tmp_path, {"law": 4})
    assert [q.answer for q in load_split("ceval", root, "test")["law"]] == ["", "", "", ""]
    assert all(q.answer for q in load_split("ceval", root, "val")["law"])


def test_mmlu_root_may_be_the_parent_of_data(tmp_path):
    write_fixture("mmlu", tmp_path / "data", {"anatomy": 2})
    assert find_subjects("mmlu", tmp_path, "test") == ["anatomy"]
    from_parent = load_split("mmlu", tmp_path, "test")
    assert from_parent == load_split("mmlu", tmp_path / "data", "test")
    assert from_parent["anatomy"][0].where.startswith(str(tmp_path / "data" / "test" / "anatomy_test.csv"))


def test_hand_written_published_files_parse(tmp_path):
    """Files written here by hand, not by write_fixture, so the reader is checked against the layouts."""
    _write(
        tmp_path / "mmlu",
        {
            "dev/logic_dev.csv": (
                'Plain?,w,x,y,z,A\n"Is 2, 3 ""odd""?",yes,"no, even","line\nbreak",maybe,C\n'
            ),
            "dev/notes.txt": "not a question file",
            "dev/logic_val.csv": "ignored,because,wrong,split,name,A\n",
        },
    )
    mmlu = load_split("mmlu", tmp_path / "mmlu", "dev")
    assert list(mmlu) == ["logic"]
    assert _content(mmlu["logic"]) == [
        ("logic", "Plain?", ("w", "x", "y", "z"), "A"),
        ("logic", 'Is 2, 3 "odd"?', ("yes", "no, even", "line\nbreak", "maybe"), "C"),
    ]
    _write(
        tmp_path / "cmmlu",
        {"test/arts.csv": "\ufeff,Question,A,B,C,D,Answer\n0,问题一，对吗,甲,乙,丙,丁,B\n"},
    )
    assert _content(load_split("cmmlu", tmp_path / "cmmlu", "test")["arts"]) == [
        ("arts", "问题一，对吗", ("甲", "乙", "丙", "丁"), "B")
    ]
    _write(
        tmp_path / "ceval",
        {
            "dev/law_dev.csv": "\ufeffid,question,A,B,C,D,answer,explanation\n0,问,1,2,3,4,D,因为\n",
            "test/law_test.csv": "id,question,A,B,C,D,answer\n0,问,1,2,3,4,\n",
        },
    )
    assert _content(load_split("ceval", tmp_path / "ceval", "dev")["law"]) == [
        ("law", "问", ("1", "2", "3", "4"), "D")
    ]
    assert load_split("ceval", tmp_path / "ceval", "test")["law"][0].answer == ""


# --- errors -----------------------------------------------------------------------------------------

ERRORS = [
    # (kind, files, split, subjects, fragments the message must contain)
    ("mmlu", None, "dev", None, ["does not exist", "MMLU layout", "dev/{subject}_dev.csv"]),
    ("mmlu", {"test/a_test.csv": "q,a,b,c,d,A\n"}, "val", None, ["no val/ folder", "holds: test/"]),
    ("cmmlu", {"dev/a.csv": ""}, "val", None, ["cmmlu has no split 'val'", "dev, test"]),
    ("mmlu", {"dev/notes.txt": ""}, "dev", None, ["holds no mmlu question files", "it holds: notes.txt"]),
    (
        "mmlu",
        {"dev/a_dev.csv": "q,a,b,c,d,A\nq,a,b,c,D\n"},
        "dev",
        None,
        ["a_dev.csv:row 2: 5 columns", "quote"],
    ),
    (
        "mmlu",
        {"dev/a_dev.csv": "q,a,b,c,d,E\n"},
        "dev",
        None,
        ["a_dev.csv:row 1: answer 'E' is not one of A"],
    ),
    ("mmlu", {"dev/a_dev.csv": "question,A,B,C,D,answer\n"}, "dev", None, ["row 1: looks like a header row"]),
    (
        "ceval",
        {"val/a_val.csv": "id,question,A,B,C,D,answer\n0,q,a,b,c,d,\n"},
        "val",
        None,
        ["row 2: answer ''"],
    ),
    ("ceval", {"val/a_val.csv": "id,question,A,B,C,D\n0,q,a,b,c,d\n"}, "val", None, ["is not C-Eval's"]),
    ("cmmlu", {"dev/a.csv": "id,question,A,B,C,D,answer\n"}, "dev", None, ["a.csv:row 1", "is not CMMLU's"]),
    ("cmmlu", {"dev/a.csv": ",Question,A,B,C,D,Answer\n"}, "dev", None, ["a.csv: no questions"]),
    ("ceval", {"dev/a_dev.csv": ""}, "dev", None, ["a_dev.csv: empty file"]),
    ("cmmlu", {"dev/a.csv": "问题".encode("gbk")}, "dev", None, ["a.csv: not UTF-8", "re-save it as UTF-8"]),
    (
        "mmlu",
        {"dev/anatomy_dev.csv": "q,a,b,c,d,A\n"},
        "dev",
        ["anatomyy"],
        ["unknown mmlu subject 'anatomyy'"],
    ),
    ("mmlu", {"dev/anatomy_dev.csv": "q,a,b,c,d,A\n"}, "dev", ["anatomyy"], ["did you mean anatomy?"]),
    ("mmlu", {"dev/anatomy_dev.csv": "q,a,b,c,d,A\n"}, "dev", [], ["no mmlu subjects asked for"]),
]


@pytest.mark.parametrize(("kind", "files", "split", "subjects", "fragments"), ERRORS)
def test_bad_input_gives_one_clear_error(kind, files, split, subjects, fragments, tmp_path):
    root = tmp_path / "bench"
    if files is not None:
        _write(root, files)
    with pytest.raises(ValueError) as caught:
        load_split(kind, root, split, subjects)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_unknown_subject_error_names_the_folder(tmp_path):
    root = write_fixture("ceval", tmp_path, {"law": 1, "logic": 1})
    with pytest.raises(ValueError, match=re.escape(f"found in {root / 'val'}")):
        load_split("ceval", root, "val", ["logik"])


# --- subject groups and names -----------------------------------------------------------------------

PUBLISHED_COUNTS = {
    "mmlu": {"STEM": 18, "humanities": 13, "social sciences": 12, "other": 14},
    "cmmlu": {"STEM": 17, "Humanities": 13, "Social Science": 22, "Other": 15},
    "ceval": {"STEM": 20, "Social Science": 10, "Humanities": 11, "Other": 11},
}


@pytest.mark.parametrize(("kind", "size"), [("mmlu", 57), ("cmmlu", 67), ("ceval", 52)])
def test_every_published_subject_has_one_allowed_group(kind, size):
    assert len(SUBJECTS[kind]) == len(set(SUBJECTS[kind])) == size
    groups = [category_of(kind, subject) for subject in SUBJECTS[kind]]
    assert set(groups) <= set(CATEGORIES[kind])
    assert Counter(groups) == PUBLISHED_COUNTS[kind]


def test_cmmlu_china_specific_subjects_count_twice():
    china = [s for s in SUBJECTS["cmmlu"] if "China specific" in groups_of("cmmlu", s)]
    assert len(china) == 15
    assert groups_of("cmmlu", "chinese_history") == ("Humanities", "China specific")
    assert groups_of("cmmlu", "ancient_chinese") == ("Social Science", "China specific")
    assert groups_of("cmmlu", "world_history") == ("Humanities",)
    assert groups_of("mmlu", "anatomy") == ("other",)


@pytest.mark.parametrize(
    ("kind", "subject", "group"),
    [
        ("mmlu", "abstract_algebra", "STEM"),
        ("mmlu", "computer_security", "STEM"),
        ("mmlu", "anatomy", "other"),  # lm-evaluation-harness puts it in STEM; the paper's grouping does not
        ("mmlu", "professional_accounting", "other"),
        ("mmlu", "human_sexuality", "social sciences"),
        ("mmlu", "world_religions", "humanities"),
        ("mmlu", "formal_logic", "humanities"),
        ("cmmlu", "computer_security", "Other"),
        ("cmmlu", "global_facts", "Humanities"),
        ("cmmlu", "college_medical_statistics", "STEM"),
        ("cmmlu", "chinese_driving_rule", "Other"),
        ("cmmlu", "professional_psychology", "Social Science"),
        (
            "ceval",
            "clinical_medicine",
            "Other",
        ),  # an early subject_mapping.json left this one without a group
        ("ceval", "veterinary_medicine", "STEM"),
        ("ceval", "marxism", "Social Science"),
        ("ceval", "logic", "Humanities"),
        ("ceval", "physician", "Other"),
    ],
)
def test_known_subject_groups(kind, subject, group):
    assert category_of(kind, subject) == group


def test_unknown_subject_falls_into_the_benchmarks_other_group():
    assert category_of("mmlu", "astrology") == "other"
    assert category_of("cmmlu", "astrology") == "Other"
    assert category_of("ceval", "astrology") == "Other"
    assert groups_of("cmmlu", "astrology") == ("Other",)


def test_subject_names():
    assert subject_name("mmlu", "abstract_algebra") == "abstract algebra"
    assert subject_name("cmmlu", "agronomy") == "农学"
    assert subject_name("cmmlu", "high_school_physics") == "高中物理学"
    assert subject_name("ceval", "high_school_physics") == "高中物理"
    assert subject_name("ceval", "mao_zedong_thought") == "毛泽东思想和中国特色社会主义理论体系概论"
    assert subject_name("ceval", "new_subject") == "new subject"


# --- prompts ----------------------------------------------------------------------------------------


def _q(question: str, choices: tuple[str, ...], answer: str) -> Question:
    return Question("x", question, choices, answer, "test.csv:row 1")


def test_mmlu_two_shot_prompt_is_byte_exact():
    shots = [_q("What is 2 + 2?", ("3", "4", "5", "6"), "B"), _q("Pick, one", ("a", '"b"', "c", "d"), "D")]
    prompt = build_prompt("mmlu", "high_school_mathematics", shots, _q("Last?", ("p", "q", "r", "s"), "A"))
    assert prompt == (
        "The following are multiple choice questions (with answers) about high school mathematics.\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
        'Pick, one\nA. a\nB. "b"\nC. c\nD. d\nAnswer: D\n\n'
        "Last?\nA. p\nB. q\nC. r\nD. s\nAnswer:"
    )


def test_ceval_one_shot_prompt_is_byte_exact():
    shot = _q("1 + 1 等于多少？", ("1", "2", "3", "4"), "B")
    prompt = build_prompt(
        "ceval", "logic", [shot], _q("下列正确的是\n哪一项？", ("甲", "乙", "丙", "丁"), "")
    )
    assert prompt == (
        "以下是关于逻辑学的单项选择题，请直接给出正确答案的选项。\n\n"
        "1 + 1 等于多少？\nA. 1\nB. 2\nC. 3\nD. 4\n答案：B\n\n"
        "下列正确的是\n哪一项？\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案："
    )


def test_cmmlu_zero_shot_prompt_uses_the_chinese_name():
    prompt = build_prompt("cmmlu", "agronomy", [], _q("问", ("1", "2", "3", "4"), "A"))
    assert (
        prompt
        == "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n问\nA. 1\nB. 2\nC. 3\nD. 4\n答案："
    )


def test_a_shot_without_answer_is_refused(tmp_path):
    root = write_fixture("ceval", tmp_path, {"law": 2})
    test = load_split("ceval", root, "test")["law"]
    with pytest.raises(ValueError, match=r"law_test\.csv:row 2: a few-shot example needs an answer"):
        build_prompt("ceval", "law", test[:1], test[1])


def test_shots_for_takes_the_first_k():
    dev = fixture_questions("mmlu", "anatomy", "dev", 5)
    assert shots_for(dev, 2) == dev[:2]
    assert shots_for(dev, 0) == []
    assert shots_for(dev, 9) == dev
    with pytest.raises(ValueError, match="shots must be >= 0"):
        shots_for(dev, -1)


def test_question_validates_itself():
    with pytest.raises(ValueError, match="3 choices, expected 4"):
        _q("q", ("a", "b", "c"), "A")
    with pytest.raises(ValueError, match="answer 'E'"):
        _q("q", ("a", "b", "c", "d"), "E")
