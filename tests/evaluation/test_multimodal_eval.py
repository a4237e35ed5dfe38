"""Multimodal accuracy: exact and option matching, and a run on a tiny Qwen2-VL."""

from __future__ import annotations

import json

import pytest

from lmforge.data.formats import Example
from lmforge.evaluation.multimodal import evaluate_multimodal, is_correct, normalize_text, option_index
from lmforge.inference.engine import Engine, SamplingParams
from lmforge.inference.predict import read_examples

OPTIONS = ["red circle", "blue square", "green triangle", "red square"]


@pytest.mark.parametrize(
    ("text", "index"),
    [
        ("B", 1),
        ("(C)", 2),
        ("The answer is D.", 3),
        ("green triangle", 2),
        ("It is a Blue Square.", 1),
        ("A blue square.", 1),  # the article is not option A
        ("A", 0),
        ("red", None),  # in two options: ambiguous
        ("purple", None),
    ],
)
def test_option_index(text: str, index: int | None) -> None:
    assert option_index(text, OPTIONS) == index


def example(answer: str, **reference) -> Example:
    return Example(turns=(("<image>Which?", answer),), reference=reference, where="vqa.json: record 1")


def test_is_correct_exact_and_option() -> None:
    assert is_correct(" Red. ", example("red"), "exact")
    assert not is_correct("dark red", example("red"), "exact")
    assert is_correct("B", example("blue square", options=OPTIONS), "option")  # reference as text
    assert is_correct("blue square", example("B", options=OPTIONS), "option")  # reference as a letter
    assert not is_correct("A", example("B", options=OPTIONS), "option")
    with pytest.raises(ValueError, match="record 1: match: option needs"):
        is_correct("A", example("B"), "option")
    with pytest.raises(ValueError, match="neither a letter nor one of the options"):
        is_correct("A", example("purple", options=OPTIONS), "option")


def test_normalize_text() -> None:
    assert normalize_text("  The  Cat!\n") == "the cat"
    assert normalize_text("红色。") == "红色"


def test_evaluate_multimodal_passes_each_records_images_and_scores_the_answers(vlm_dir, shapes_file) -> None:
    engine = Engine.load(str(vlm_dir))
    examples = read_examples(str(shapes_file))[:4]
    references = [e.response for e in examples]
    seen = {}
    canned = [references[0], f" {references[1].upper()}.", "purple", references[3] + " and more"]

    def generate(conversations, params, batch_size, images):
        seen.update(prompts=[c.turns[-1][0] for c in conversations], images=images)
        return canned

    engine.generate = generate
    metrics = evaluate_multimodal(engine, examples, SamplingParams(max_new_tokens=3))
    assert seen["images"] == [list(e.images) for e in examples] and all(seen["images"])
    assert seen["prompts"] == [e.prompt for e in examples]
    assert [r["correct"] for r in metrics["_rows"]] == [True, True, False, False]
    assert metrics["accuracy"] == 0.5


def test_evaluate_multimodal_runs_a_tiny_vlm(vlm_dir, shapes_file) -> None:
    engine = Engine.load(str(vlm_dir))
    metrics = evaluate_multimodal(
        engine, read_examples(str(shapes_file))[:3], SamplingParams(max_new_tokens=3)
    )
    assert metrics["items"] == 3 and 0.0 <= metrics["accuracy"] <= 1.0
    assert all(isinstance(r["output"], str) for r in metrics["_rows"])


def test_records_without_images_are_refused(vlm_dir, tmp_path) -> None:
    path = tmp_path / "text.json"
    path.write_text(json.dumps([{"instruction": "What colour?", "output": "red"}]))
    with pytest.raises(ValueError, match="no record has an image"):
        evaluate_multimodal(
            Engine.load(str(vlm_dir)), read_examples(str(path)), SamplingParams(max_new_tokens=2)
        )
