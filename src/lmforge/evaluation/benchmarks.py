"""Multiple-choice benchmarks (MMLU, CMMLU, C-Eval) read from local folders, and their k-shot prompts.

Each loader reads exactly the layout its benchmark publishes, so a downloaded copy is used as is:

- MMLU (hendrycks/test `data/`): `{split}/{subject}_{split}.csv` for dev/val/test, no header row,
  columns question,A,B,C,D,answer.
- CMMLU (haonan-li/CMMLU `data/`): `{split}/{subject}.csv` for dev/test, header `,Question,A,B,C,D,Answer`
  (the first, unnamed column is a row index).
- C-Eval (ceval-exam): `{split}/{subject}_{split}.csv` for dev/val/test, header `id,question,A,B,C,D,answer`;
  dev adds `explanation`; test leaves `answer` empty (its answers are not published), so score on val.

The root may be the folder holding the split folders or its parent holding `data/` (a git checkout).

Subject groups are data from the publishers: MMLU's `categories.py` in hendrycks/test (the paper's four
groups: STEM 18, humanities 13, social sciences 12, other 14; lm-evaluation-harness departs from it by
putting anatomy in STEM), CMMLU's `src/categories.py` (STEM 17, Humanities 13, Social Science 22, Other 15,
and 15 of those subjects also count as "China specific") and C-Eval's `subject_mapping.json` (STEM 20,
Social Science 10, Humanities 11, Other 11; an early version of that file left clinical_medicine without a
group, later fixed to Other).

Prompts: MMLU's follows hendrycks' `evaluate.py`. CMMLU and C-Eval share one Chinese prompt: C-Eval's item
format ("...\\n答案：") under CMMLU's direct-answer header; it departs from CMMLU's own items ("题目：" before
the question, "答案是：" as the cue) and from C-Eval's own header ("以下是中国关于{subject}考试的单项选择题，
请选出其中的正确答案。"), so scores are comparable with each other, not digit-for-digit with either paper.
"""

from __future__ import annotations

import csv
import difflib
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Kind = Literal["mmlu", "cmmlu", "ceval"]
KINDS: tuple[Kind, ...] = ("mmlu", "cmmlu", "ceval")
LETTERS = ("A", "B", "C", "D")
SPLITS: dict[Kind, tuple[str, ...]] = {
    "mmlu": ("dev", "val", "test"),
    "cmmlu": ("dev", "test"),
    "ceval": ("dev", "val", "test"),
}
DEV_SIZE = 5  # every published dev split holds 5 questions per subject

_LAYOUT: dict[Kind, str] = {
    "mmlu": "MMLU layout (hendrycks/test data/): {split}/{{subject}}_{split}.csv, no header row, "
    "columns question,A,B,C,D,answer",
    "cmmlu": "CMMLU layout: {split}/{{subject}}.csv with header ',Question,A,B,C,D,Answer'",
    "ceval": "C-Eval layout: {split}/{{subject}}_{split}.csv with header 'id,question,A,B,C,D,answer' "
    "(dev adds 'explanation')",
}

# --- subject groups, as published -------------------------------------------------------------------

_MMLU_GROUPS: dict[str, tuple[str, ...]] = {
    "STEM": (
        "abstract_algebra", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
        "college_mathematics", "college_physics", "computer_security", "conceptual_physics",
        "electrical_engineering", "elementary_mathematics", "high_school_biology", "high_school_chemistry",
        "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios",
        "philosophy", "prehistory", "professional_law", "world_religions",
    ),
    "social sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
        "human_sexuality", "professional_psychology", "public_relations", "security_studies", "sociology",
        "us_foreign_policy",
    ),
    "other": (
        "anatomy", "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
        "management", "marketing", "medical_genetics", "miscellaneous", "nutrition",
        "professional_accounting", "professional_medicine", "virology",
    ),
}  # fmt: skip

_CMMLU_GROUPS: dict[str, tuple[str, ...]] = {
    "STEM": (
        "anatomy", "astronomy", "college_actuarial_science", "college_engineering_hydrology",
        "college_mathematics", "college_medical_statistics", "computer_science", "conceptual_physics",
        "electrical_engineering", "elementary_mathematics", "genetics", "high_school_biology",
        "high_school_chemistry", "high_school_mathematics", "high_school_physics", "machine_learning",
        "virology",
    ),
    "Humanities": (
        "arts", "chinese_history", "chinese_literature", "college_law", "global_facts", "international_law",
        "jurisprudence", "logical", "marxist_theory", "philosophy", "professional_law", "world_history",
        "world_religions",
    ),
    "Social Science": (
        "ancient_chinese", "business_ethics", "chinese_civil_service_exam", "chinese_food_culture",
        "chinese_foreign_policy", "chinese_teacher_qualification", "college_education", "economics",
        "education", "elementary_chinese", "ethnology", "high_school_geography", "high_school_politics",
        "journalism", "management", "marketing", "modern_chinese", "professional_accounting",
        "professional_psychology", "public_relations", "security_study", "sociology",
    ),
    "Other": (
        "agronomy", "chinese_driving_rule", "clinical_knowledge", "college_medicine", "computer_security",
        "construction_project_management", "elementary_commonsense", "elementary_information_and_technology",
        "food_science", "human_sexuality", "legal_and_moral_basis", "nutrition", "professional_medicine",
        "sports_science", "traditional_chinese_medicine",
    ),
}  # fmt: skip

# CMMLU averages these subjects twice: in their field above and in "China specific".
_CMMLU_CHINA_SPECIFIC = frozenset({
    "ancient_chinese", "chinese_civil_service_exam", "chinese_driving_rule", "chinese_food_culture",
    "chinese_foreign_policy", "chinese_history", "chinese_literature", "chinese_teacher_qualification",
    "construction_project_management", "elementary_chinese", "elementary_commonsense", "ethnology",
    "high_school_politics", "modern_chinese", "traditional_chinese_medicine",
})  # fmt: skip

_CMMLU_NAMES = {
    "agronomy": "农学",
    "anatomy": "解剖学",
    "ancient_chinese": "古汉语",
    "arts": "艺术学",
    "astronomy": "天文学",
    "business_ethics": "商业伦理",
    "chinese_civil_service_exam": "中国公务员考试",
    "chinese_driving_rule": "中国驾驶规则",
    "chinese_food_culture": "中国饮食文化",
    "chinese_foreign_policy": "中国外交政策",
    "chinese_history": "中国历史",
    "chinese_literature": "中国文学",
    "chinese_teacher_qualification": "中国教师资格",
    "clinical_knowledge": "临床知识",
    "college_actuarial_science": "大学精算学",
    "college_education": "大学教育学",
    "college_engineering_hydrology": "大学工程水文学",
    "college_law": "大学法律",
    "college_mathematics": "大学数学",
    "college_medical_statistics": "大学医学统计",
    "college_medicine": "大学医学",
    "computer_science": "计算机科学",
    "computer_security": "计算机安全",
    "conceptual_physics": "概念物理学",
    "construction_project_management": "建设工程管理",
    "economics": "经济学",
    "education": "教育学",
    "electrical_engineering": "电气工程",
    "elementary_chinese": "小学语文",
    "elementary_commonsense": "小学常识",
    "elementary_information_and_technology": "小学信息技术",
    "elementary_mathematics": "初等数学",
    "ethnology": "民族学",
    "food_science": "食品科学",
    "genetics": "遗传学",
    "global_facts": "全球事实",
    "high_school_biology": "高中生物",
    "high_school_chemistry": "高中化学",
    "high_school_geography": "高中地理",
    "high_school_mathematics": "高中数学",
    "high_school_physics": "高中物理学",
    "high_school_politics": "高中政治",
    "human_sexuality": "人类性行为",
    "international_law": "国际法学",
    "journalism": "新闻学",
    "jurisprudence": "法理学",
    "legal_and_moral_basis": "法律与道德基础",
    "logical": "逻辑学",
    "machine_learning": "机器学习",
    "management": "管理学",
    "marketing": "市场营销",
    "marxist_theory": "马克思主义理论",
    "modern_chinese": "现代汉语",
    "nutrition": "营养学",
    "philosophy": "哲学",
    "professional_accounting": "专业会计",
    "professional_law": "专业法学",
    "professional_medicine": "专业医学",
    "professional_psychology": "专业心理学",
    "public_relations": "公共关系",
    "security_study": "安全研究",
    "sociology": "社会学",
    "sports_science": "体育学",
    "traditional_chinese_medicine": "中医中药",
    "virology": "病毒学",
    "world_history": "世界历史",
    "world_religions": "世界宗教",
}

# subject -> (Chinese name, group), in subject_mapping.json's order
_CEVAL: dict[str, tuple[str, str]] = {
    "computer_network": ("计算机网络", "STEM"),
    "operating_system": ("操作系统", "STEM"),
    "computer_architecture": ("计算机组成", "STEM"),
    "college_programming": ("大学编程", "STEM"),
    "college_physics": ("大学物理", "STEM"),
    "college_chemistry": ("大学化学", "STEM"),
    "advanced_mathematics": ("高等数学", "STEM"),
    "probability_and_statistics": ("概率统计", "STEM"),
    "discrete_mathematics": ("离散数学", "STEM"),
    "electrical_engineer": ("注册电气工程师", "STEM"),
    "metrology_engineer": ("注册计量师", "STEM"),
    "high_school_mathematics": ("高中数学", "STEM"),
    "high_school_physics": ("高中物理", "STEM"),
    "high_school_chemistry": ("高中化学", "STEM"),
    "high_school_biology": ("高中生物", "STEM"),
    "middle_school_mathematics": ("初中数学", "STEM"),
    "middle_school_biology": ("初中生物", "STEM"),
    "middle_school_physics": ("初中物理", "STEM"),
    "middle_school_chemistry": ("初中化学", "STEM"),
    "veterinary_medicine": ("兽医学", "STEM"),
    "college_economics": ("大学经济学", "Social Science"),
    "business_administration": ("工商管理", "Social Science"),
    "marxism": ("马克思主义基本原理", "Social Science"),
    "mao_zedong_thought": ("毛泽东思想和中国特色社会主义理论体系概论", "Social Science"),
    "education_science": ("教育学", "Social Science"),
    "teacher_qualification": ("教师资格", "Social Science"),
    "high_school_politics": ("高中政治", "Social Science"),
    "high_school_geography": ("高中地理", "Social Science"),
    "middle_school_politics": ("初中政治", "Social Science"),
    "middle_school_geography": ("初中地理", "Social Science"),
    "modern_chinese_history": ("近代史纲要", "Humanities"),
    "ideological_and_moral_cultivation": ("思想道德修养与法律基础", "Humanities"),
    "logic": ("逻辑学", "Humanities"),
    "law": ("法学", "Humanities"),
    "chinese_language_and_literature": ("中国语言文学", "Humanities"),
    "art_studies": ("艺术学", "Humanities"),
    "professional_tour_guide": ("导游资格", "Humanities"),
    "legal_professional": ("法律职业资格", "Humanities"),
    "high_school_chinese": ("高中语文", "Humanities"),
    "high_school_history": ("高中历史", "Humanities"),
    "middle_school_history": ("初中历史", "Humanities"),
    "civil_servant": ("公务员", "Other"),
    "sports_science": ("体育学", "Other"),
    "plant_protection": ("植物保护", "Other"),
    "basic_medicine": ("基础医学", "Other"),
    "clinical_medicine": ("临床医学", "Other"),
    "urban_and_rural_planner": ("注册城乡规划师", "Other"),
    "accountant": ("注册会计师", "Other"),
    "fire_engineer": ("注册消防工程师", "Other"),
    "environmental_impact_assessment_engineer": ("环境影响评价工程师", "Other"),
    "tax_accountant": ("税务师", "Other"),
    "physician": ("医师资格", "Other"),
}

# Each benchmark's groups in the order its papers report them; a subject's "main" group is one of the
# first four (CMMLU's "China specific" overlaps the others, see groups_of).
CATEGORIES: dict[Kind, tuple[str, ...]] = {
    "mmlu": ("STEM", "humanities", "social sciences", "other"),
    "cmmlu": ("STEM", "Humanities", "Social Science", "Other", "China specific"),
    "ceval": ("STEM", "Social Science", "Humanities", "Other"),
}
_OTHER: dict[Kind, str] = {"mmlu": "other", "cmmlu": "Other", "ceval": "Other"}
_CATEGORY: dict[Kind, dict[str, str]] = {
    "mmlu": {subject: group for group, subjects in _MMLU_GROUPS.items() for subject in subjects},
    "cmmlu": {subject: group for group, subjects in _CMMLU_GROUPS.items() for subject in subjects},
    "ceval": {subject: group for subject, (_, group) in _CEVAL.items()},
}
# The published subject ids of each benchmark, sorted.
SUBJECTS: dict[Kind, tuple[str, ...]] = {kind: tuple(sorted(table)) for kind, table in _CATEGORY.items()}


@dataclass(frozen=True)
class Question:
    """One multiple-choice question as its file gives it."""

    subject: str  # file-derived subject id, e.g. "abstract_algebra"
    question: str
    choices: tuple[str, ...]  # texts of A..D
    answer: str  # "A".."D"; "" when the split publishes no answers (C-Eval test)
    where: str  # "path/to/file.csv:row N" for error messages

    def __post_init__(self) -> None:
        if len(self.choices) != len(LETTERS):
            raise ValueError(f"{self.where}: {len(self.choices)} choices, expected {len(LETTERS)} (A-D)")
        if self.answer not in (*LETTERS, ""):
            raise ValueError(f"{self.where}: answer {self.answer!r} is not one of A, B, C, D")


def _check_kind(kind: str) -> Kind:
    if kind not in KINDS:
        raise ValueError(f"unknown benchmark kind {kind!r}: expected one of {', '.join(KINDS)}")
    return kind  # type: ignore[return-value]


def _suffix(kind: Kind, split: str) -> str:
    return ".csv" if kind == "cmmlu" else f"_{split}.csv"


def _layout(kind: Kind, split: str) -> str:
    return _LAYOUT[kind].format(split=split)


def _listing(folder: Path, limit: int = 12) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "nothing"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _split_dir(kind: Kind, root: Path, split: str) -> Path:
    if split not in SPLITS[kind]:
        raise ValueError(f"{kind} has no split {split!r}: its splits are {', '.join(SPLITS[kind])}")
    root = Path(root)
    if not root.is_dir():
        raise ValueError(
            f"{kind} folder {root} does not exist or is not a folder: give the folder that holds the "
            f"split folders, or its parent holding data/ ({_layout(kind, split)})"
        )
    for base in (root, root / "data"):
        if (base / split).is_dir():
            return base / split
    raise ValueError(
        f"no {split}/ folder in {root} (nor in {root}/data): expected the {_layout(kind, split)}; "
        f"{root} holds: {_listing(root)}"
    )


def _subjects_in(kind: Kind, folder: Path, split: str) -> list[str]:
    suffix = _suffix(kind, split)
    subjects = sorted(
        p.name[: -len(suffix)]
        for p in folder.iterdir()
        if p.is_file()
        and p.name.endswith(suffix)
        and len(p.name) > len(suffix)
        and not p.name.startswith(".")
    )
    if not subjects:
        raise ValueError(
            f"{folder} holds no {kind} question files: expected the {_layout(kind, split)}; "
            f"it holds: {_listing(folder)}"
        )
    return subjects


def find_subjects(kind: Kind, root: Path, split: str) -> list[str]:
    """The subject ids that have a file in `split`'s folder under `root`, sorted."""
    kind = _check_kind(kind)
    return _subjects_in(kind, _split_dir(kind, root, split), split)


def load_split(
    kind: Kind, root: Path, split: str, subjects: list[str] | None = None
) -> dict[str, list[Question]]:
    """Subject -> its questions in file order, for the given subjects (all found ones when None)."""
    kind = _check_kind(kind)
    folder = _split_dir(kind, root, split)
    available = _subjects_in(kind, folder, split)
    if subjects is not None and not subjects:
        raise ValueError(f"no {kind} subjects asked for: pass None to load all {len(available)} in {folder}")
    for subject in subjects or ():
        if subject not in available:
            close = difflib.get_close_matches(subject, available, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"unknown {kind} subject {subject!r}: not among the {len(available)} subjects found in "
                f"{folder} (file names give the ids, e.g. {available[0]!r}){hint}"
            )
    wanted = available if subjects is None else subjects
    return {s: _read_file(kind, split, s, folder / f"{s}{_suffix(kind, split)}") for s in wanted}


def _columns(kind: Kind, split: str, header: list[str] | None, path: Path) -> tuple[int, int, int | None]:
    """(question column, row width, answer column or None) for a file with that header row."""
    if kind == "mmlu":
        return 0, 6, 5
    assert header is not None
    if kind == "cmmlu":
        expected = ["Question", "A", "B", "C", "D", "Answer"]
        if len(header) == 7 and header[1:] == expected:
            return 1, 7, 6
        raise ValueError(
            f"{path}:row 1: header {','.join(header)!r} is not CMMLU's ',Question,A,B,C,D,Answer' "
            f"(an index column, then the question, choices and answer); expected the {_layout(kind, split)}"
        )
    base = ["id", "question", "A", "B", "C", "D"]
    allowed = [[*base, "answer"], [*base, "answer", "explanation"]]
    if split == "test":
        allowed.append(base)
    if header in allowed:
        return 1, len(header), header.index("answer") if "answer" in header else None
    raise ValueError(
        f"{path}:row 1: header {','.join(header)!r} is not C-Eval's; expected the {_layout(kind, split)}"
    )


def _read_file(kind: Kind, split: str, subject: str, path: Path) -> list[Question]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:  # utf-8-sig drops a byte-order mark
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None
    except csv.Error as e:
        raise ValueError(f"{path}: not readable as CSV ({e}); expected the {_layout(kind, split)}") from None
    if not rows:
        raise ValueError(f"{path}: empty file; re-download it")
    header = None if kind == "mmlu" else rows[0]
    first = 1 if header is not None else 0
    q_col, width, a_col = _columns(kind, split, header, path)
    questions = []
    for number, row in enumerate(rows[first:], start=first + 1):
        if not row:  # a blank line
            continue
        where = f"{path}:row {number}"
        if len(row) != width:
            raise ValueError(
                f"{where}: {len(row)} columns, expected {width} ({_layout(kind, split)}); "
                "quote fields that hold commas or line breaks"
            )
        answer = row[a_col].strip() if a_col is not None else ""
        if answer not in LETTERS and not (answer == "" and kind == "ceval" and split == "test"):
            if kind == "mmlu" and number == 1 and answer.lower() == "answer":
                raise ValueError(f"{where}: looks like a header row; MMLU files have none, delete it")
            raise ValueError(f"{where}: answer {answer!r} is not one of A, B, C, D; fix or drop the row")
        choices = tuple(row[q_col + 1 : q_col + 5])
        questions.append(Question(subject, row[q_col], choices, answer, where))
    if not questions:
        raise ValueError(f"{path}: no questions (an empty file or a header only); re-download it")
    return questions


def category_of(kind: Kind, subject: str) -> str:
    """The subject's group in the benchmark's published mapping (one of CATEGORIES[kind]).

    CMMLU's China-specific subjects get their field here ("China specific" is in groups_of). A subject
    the mapping does not list gets the benchmark's own "other" group ("other" for MMLU, "Other" for CMMLU
    and C-Eval) rather than an error, so a renamed or extra file still counts somewhere.
    """
    kind = _check_kind(kind)
    return _CATEGORY[kind].get(subject, _OTHER[kind])


def groups_of(kind: Kind, subject: str) -> tuple[str, ...]:
    """Every group the publisher averages the subject into: category_of's, plus CMMLU's "China specific"."""
    main = category_of(kind, subject)
    china = kind == "cmmlu" and subject in _CMMLU_CHINA_SPECIFIC
    return (main, "China specific") if china else (main,)


def subject_name(kind: Kind, subject: str) -> str:
    """The name the prompt uses: the Chinese name where CMMLU/C-Eval publish one, else the id with spaces."""
    kind = _check_kind(kind)
    spaced = subject.replace("_", " ")
    if kind == "cmmlu":
        return _CMMLU_NAMES.get(subject, spaced)
    if kind == "ceval":
        return _CEVAL[subject][0] if subject in _CEVAL else spaced
    return spaced


def _item(question: Question, cue: str) -> str:
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, question.choices, strict=True))
    return f"{question.question}{options}\n{cue}"


def _framing(kind: Kind, subject: str) -> tuple[str, str, str]:
    """(header, answer cue, gap between a shot's cue and its answer letter)."""
    kind = _check_kind(kind)
    name = subject_name(kind, subject)
    if kind == "mmlu":
        return f"The following are multiple choice questions (with answers) about {name}.\n\n", "Answer:", " "
    return f"以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n", "答案：", ""


def build_prompt(kind: Kind, subject: str, shots: list[Question], question: Question) -> str:
    """The k-shot prompt for `question`, ending where the answer letter goes (see the module docstring)."""
    header, cue, gap = _framing(kind, subject)
    parts = [header]
    for shot in shots:
        if shot.answer not in LETTERS:
            raise ValueError(
                f"{shot.where}: a few-shot example needs an answer; take shots from the dev split"
            )
        parts.append(f"{_item(shot, cue)}{gap}{shot.answer}\n\n")
    parts.append(_item(question, cue))
    return "".join(parts)


def answer_part(kind: Kind, question: Question) -> str:
    """The end of `question`'s prompt that cropping keeps: its options and the answer cue."""
    _, cue, _ = _framing(kind, question.subject)
    return _item(question, cue)[len(question.question) :]


def shots_for(dev: list[Question], k: int) -> list[Question]:
    """The first k dev questions (all of them when k exceeds the dev split), as the papers take them."""
    if k < 0:
        raise ValueError(f"number of shots must be >= 0, got {k}")
    return list(dev[:k])


# --- synthetic benchmarks for tests -----------------------------------------------------------------

_WORDS = ("apple", "river", "stone", "cloud", "lantern", "meadow", "harbor", "violet", "pencil", "orbit")


def _options(rng: random.Random, correct: int) -> list[int]:
    """Three distinct positive distractors near `correct`."""
    near = [correct + d for d in (-3, -2, -1, 1, 2, 3, 4) if correct + d > 0]
    return rng.sample(near, 3)


def fixture_questions(kind: Kind, subject: str, split: str, n: int, seed: int = 0) -> list[Question]:
    """The questions write_fixture puts in that subject's file for `split` (`where` names them, no path).

    Generated by code: arithmetic and letter-counting items, English for MMLU and Chinese for CMMLU/C-Eval,
    cycling through plain text, numbers with thousands commas, and text with quotes, commas and a line
    break. Answers walk A, B, C, D from a per-subject offset, so any 4 consecutive items use all letters.
    C-Eval test items carry no answer, as published.
    """
    kind = _check_kind(kind)
    rng = random.Random(f"{seed}/{kind}/{subject}/{split}")
    offset = rng.randrange(len(LETTERS))
    chinese = kind != "mmlu"
    questions = []
    for i in range(n):
        template = i % 3
        if template == 0:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            text = f"{a} + {b} 等于多少？" if chinese else f"What is {a} + {b}?"
            correct, label = a + b, "{}"
        elif template == 1:
            a, b = rng.randint(1_000, 99_999), rng.randint(2, 9)
            text = f"计算 {a:,} × {b}，结果是？" if chinese else f"Compute {a:,} × {b}, exactly."
            correct, label = a * b, "{:,}"
        else:
            word = rng.choice(_WORDS)
            text = (
                f'路牌上写着"{word}"，对吗？\n"{word}"有几个字母？'
                if chinese
                else f'A sign reads "{word}", right?\nHow many letters does "{word}" have?'
            )
            correct, label = len(word), f'{{}}, as in "{word}"'
        slot = (offset + i) % len(LETTERS)
        values = _options(rng, correct)
        values.insert(slot, correct)
        answer = "" if (kind == "ceval" and split == "test") else LETTERS[slot]
        where = f"synthetic {kind} {subject} {split} #{i + 1}"
        questions.append(Question(subject, text, tuple(label.format(v) for v in values), answer, where))
    return questions


def write_fixture(kind: Kind, root: Path, subjects: dict[str, int], seed: int = 0) -> Path:
    """Write a small synthetic benchmark in `kind`'s published layout under `root`; return `root`.

    `subjects` maps a subject id to its number of questions in each evaluation split (val/test for MMLU
    and C-Eval, test for CMMLU); every dev split gets 5. The contents are fixture_questions(...) for
    each subject and split, so tests can compare a load against them. Nothing is copied from the
    real benchmarks; pass real subject ids to exercise category_of and subject_name.
    """
    kind = _check_kind(kind)
    if not subjects:
        raise ValueError("write_fixture needs at least one subject")
    for subject, n in subjects.items():
        if not re.fullmatch(r"\w+", subject) or n < 1:
            raise ValueError(
                f"fixture subject {subject!r}: ids are letters, digits and _, counts >= 1 (got {n})"
            )
    root = Path(root)
    for split in SPLITS[kind]:
        (root / split).mkdir(parents=True, exist_ok=True)
        for subject, n in subjects.items():
            items = fixture_questions(kind, subject, split, DEV_SIZE if split == "dev" else n, seed)
            path = root / split / f"{subject}{_suffix(kind, split)}"
            with path.open("w", encoding="utf-8", newline="") as f:
                csv.writer(f, lineterminator="\n").writerows(_fixture_rows(kind, split, items))
    return root


def _fixture_rows(kind: Kind, split: str, items: list[Question]) -> list[list[object]]:
    """The CSV rows, header included, of one file in `kind`'s published layout."""
    if kind == "mmlu":
        return [[q.question, *q.choices, q.answer] for q in items]
    rows: list[list[object]] = [[i, q.question, *q.choices, q.answer] for i, q in enumerate(items)]
    if kind == "cmmlu":
        return [["", "Question", *LETTERS, "Answer"], *rows]
    if split == "dev":  # C-Eval's dev split explains each answer
        for row, q in zip(rows, items, strict=True):
            row.append(f"选{q.answer}：{q.choices[LETTERS.index(q.answer)]}，逐项验算可得。")
        return [["id", "question", *LETTERS, "answer", "explanation"], *rows]
    return [["id", "question", *LETTERS, "answer"], *rows]
