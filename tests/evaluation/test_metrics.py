"""Generation metrics: ROUGE and BLEU against hand counts, CJK text scored, BERTScore on a tiny BERT."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import sacrebleu
import torch
from bert_score.utils import model2layers
from rouge_score import rouge_scorer
from transformers import BertConfig, BertModel, BertTokenizerFast

from lmforge.evaluation.metrics import (
    CJKTokenizer,
    bertscore,
    bleu,
    exact_match,
    generation_metrics,
    read_predictions,
    rouge,
)


def f1(overlap: int, predicted: int, reference: int) -> float:
    precision, recall = overlap / predicted, overlap / reference
    return 2 * precision * recall / (precision + recall)


def test_rouge_matches_hand_counts():
    predictions = ["the cat sat", "the mat sat on the cat"]
    references = ["the cat sat on the mat", "the cat sat on the mat"]
    # Pair 1: all 3 words, both bigrams (of 5) and a 3-word LCS are in the 6-word reference.
    # Pair 2: same words reordered: 6/6 unigrams; bigrams "the mat", "sat on", "on the", "the cat"
    # 4/5; LCS "the sat on the" 4 of 6.
    expected = {
        "rouge1": (f1(3, 3, 6) + f1(6, 6, 6)) / 2,
        "rouge2": (f1(2, 2, 5) + f1(4, 5, 5)) / 2,
        "rougeL": (f1(3, 3, 6) + f1(4, 6, 6)) / 2,
    }
    assert rouge(predictions, references) == pytest.approx(expected)


def test_rouge_equals_rouge_score_defaults_on_english():
    predictions = ["The quick brown fox jumps over the lazy dog!", "It costs $42, roughly."]
    references = ["A quick brown dog jumps on the log.", "roughly 42 dollars"]
    standard = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for prediction, reference in zip(predictions, references, strict=True):
        ours = rouge([prediction], [reference])
        theirs = standard.score(reference, prediction)
        assert ours == pytest.approx({name: score.fmeasure for name, score in theirs.items()})


def test_rouge_stem_option_porter_stems_latin_words():
    assert rouge(["running cats"], ["run cat"])["rouge1"] == 0.0
    assert rouge(["running cats"], ["run cat"], stem=True)["rouge1"] == 1.0


def test_cjk_characters_are_tokens_and_full_width_reads_as_ascii():
    assert CJKTokenizer().tokenize("GPT-4模型很好。") == ["gpt", "4", "模", "型", "很", "好"]
    assert CJKTokenizer().tokenize("２０２４年") == ["2024", "年"]
    assert CJKTokenizer().tokenize("ひらがなカナ") == list("ひらがなカナ")


def test_chinese_rouge_is_character_overlap():
    prediction, reference = "我喜欢猫", "我喜欢狗"
    # The default tokenizer drops every Chinese character: the reason for our tokenizer.
    default = rouge_scorer.RougeScorer(["rouge1"]).score(reference, prediction)
    assert default["rouge1"].fmeasure == 0.0
    # 4 characters each: 3 shared (我喜欢), bigrams 我喜 and 喜欢 of 3, LCS 我喜欢.
    expected = {"rouge1": f1(3, 4, 4), "rouge2": f1(2, 3, 3), "rougeL": f1(3, 4, 4)}
    assert rouge([prediction], [reference]) == pytest.approx(expected)


def test_bleu_perfect_partial_and_hand_computed():
    sentences = ["the cat sat on the mat", "a dog ran to the red hat"]
    assert bleu(sentences, sentences) == pytest.approx(100.0)
    # Against "the cat sat on a mat": n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths, no
    # brevity penalty; BLEU is their geometric mean.
    partial = bleu(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert partial == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    assert 0 < partial < 100


def test_bleu_uses_effective_order_so_short_right_answers_score_100():
    answers = ["Paris", "42"]
    assert bleu(answers, answers) == pytest.approx(100.0)
    # Plain corpus BLEU has no 4-grams to count here and gives 0 for all-correct answers.
    assert sacrebleu.corpus_bleu(answers, [answers]).score == 0.0


def test_bleu_tokenizes_chinese_references_with_sacrebleus_zh():
    predictions, references = ["我喜欢猫。"], ["我喜欢狗。"]
    expected = sacrebleu.corpus_bleu(predictions, [references], tokenize="zh", use_effective_order=True)
    assert bleu(predictions, references) == pytest.approx(expected.score)
    assert bleu(predictions, references) > 0
    # With 13a each sentence is one word and nothing would match.
    assert sacrebleu.corpus_bleu(predictions, [references], tokenize="13a").score == 0.0


@pytest.mark.parametrize(
    ("prediction", "reference", "equal"),
    [
        ("Paris", "paris", True),
        ("  Paris.  ", "Paris", True),
        ("New   York\n", "new york", True),
        ("Straße", "STRASSE", True),  # casefold, not lower
        ("3.", "3", True),
        ("3.5", "3", False),
        ("Paris", "Paris, France", False),
        ("the end..", "the end", False),  # only one final period goes
        ("new york", "newyork", False),
    ],
)
def test_exact_match_normalisation(prediction, reference, equal):
    assert exact_match([prediction], [reference]) == float(equal)


def test_exact_match_is_the_share_of_matching_pairs():
    assert exact_match(["a", "b", "c", "d"], ["A", "b.", "x", "y"]) == 0.5


def test_generation_metrics_returns_one_flat_dict():
    results = generation_metrics(["the cat sat"], ["the cat sat"], ["exact_match", "rouge", "bleu"])
    assert set(results) == {"exact_match", "rouge1", "rouge2", "rougeL", "bleu"}
    assert results["exact_match"] == 1.0
    assert results["rougeL"] == pytest.approx(1.0)
    assert results["bleu"] == pytest.approx(100.0)


def test_length_mismatch_names_both_counts():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        generation_metrics(["a", "b"], ["a"], ["rouge"])
    with pytest.raises(ValueError, match="no predictions"):
        exact_match([], [])


def test_unknown_metric_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown metric.*meteor.*exact_match, rouge, bleu, bertscore"):
        generation_metrics(["a"], ["a"], ["rouge", "meteor"])


def test_bertscore_needs_a_local_model_folder(tmp_path):
    with pytest.raises(ValueError, match="set bertscore_model to a local model folder"):
        generation_metrics(["a"], ["a"], ["bertscore"])
    missing = tmp_path / "roberta-large"
    with pytest.raises(ValueError, match=f"{missing} does not exist.*huggingface-cli download"):
        generation_metrics(["a"], ["a"], ["exact_match", "bertscore"], bertscore_model=str(missing))
    with pytest.raises(ValueError, match="has no config.json"):
        bertscore(["a"], ["a"], str(tmp_path))


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_read_predictions_reads_output_and_reference(tmp_path):
    rows = [{"index": 0, "output": "4", "reference": "4"}, {"index": 1, "output": "5", "reference": 6}]
    path = write_lines(tmp_path / "preds.jsonl", [json.dumps(row) for row in rows] + [""])
    assert read_predictions(path) == (["4", "5"], ["4", "6"])


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"output": "4", "reference": ', r"line 2 is not JSON"),
        ('{"output": "4"}', r'line 2 has no "reference" key'),
        ('{"reference": "4"}', r'line 2 has no "output" key'),
        ('{"output": "4", "reference": null}', r'line 2 has "reference": null'),
        ('{"output": ["4"], "reference": "4"}', r'line 2: "output" is \["4"\]; expected a string'),
        ("[1, 2]", r"line 2 is a JSON list"),
    ],
)
def test_read_predictions_names_the_file_and_line_of_a_bad_row(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "preds.jsonl", ['{"output": "1", "reference": "1"}', bad_line])
    with pytest.raises(ValueError, match=f"{path}, {message}"):
        read_predictions(path)


def test_read_predictions_refuses_an_empty_or_missing_file(tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match=f"{empty} is empty"):
        read_predictions(empty)
    with pytest.raises(ValueError, match="does not exist"):
        read_predictions(tmp_path / "missing.jsonl")


WORDS = "the a cat dog sat ran on to mat hat red blue green big small house tree car".split()


def save_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer BERT (hidden 32) with a word-level vocab, saved like a hub folder.

    In transformers 5 `BertTokenizerFast` takes `vocab` (a dict or file); a `vocab_file=` argument
    is swallowed by **kwargs and the tokenizer keeps a vocab of the 5 special tokens. Every word
    is then [UNK], "a dog" and "the cat" encode to the same ids, and BERTScore is exactly 1.0 for
    any pair of equal length. So the vocab goes in as `vocab=` and the fixture checks the words
    survive. The tokenizer is saved without model_max_length, like many hub tokenizers, which is
    what bertscore's cap at max_position_embeddings is for.
    """
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tokenizer = BertTokenizerFast(vocab=vocab)
    assert tokenizer.unk_token_id not in tokenizer("a dog the cat")["input_ids"]
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def test_bertscore_is_one_for_identical_pairs_and_lower_for_different_ones(tiny_bert):
    same = bertscore(
        ["the cat sat on the mat", "a dog ran"], ["the cat sat on the mat", "a dog ran"], str(tiny_bert)
    )
    assert same == pytest.approx({"bertscore_precision": 1.0, "bertscore_recall": 1.0, "bertscore_f1": 1.0})
    different = bertscore(["a dog ran", "big red car"], ["the cat sat", "small blue house"], str(tiny_bert))
    assert different["bertscore_f1"] < 0.9
    # One word changed scores between the two.
    close = bertscore(["the cat sat on the mat"], ["the dog sat on the mat"], str(tiny_bert))
    assert different["bertscore_f1"] < close["bertscore_f1"] < 1.0
    flat = generation_metrics(["a dog ran"], ["the cat sat"], ["bertscore"], bertscore_model=str(tiny_bert))
    assert flat["bertscore_f1"] == pytest.approx(
        bertscore(["a dog ran"], ["the cat sat"], str(tiny_bert))["bertscore_f1"]
    )


def test_bertscore_truncates_at_the_models_position_limit(tiny_bert):
    # 200 words, far past the 64 positions; the saved tokenizer has no model_max_length of its own.
    long = " ".join(WORDS[i % len(WORDS)] for i in range(200))
    scores = bertscore([long], [long], str(tiny_bert))
    assert scores["bertscore_f1"] == pytest.approx(1.0)


def test_bertscore_layer_defaults_to_bert_scores_tuned_one_for_a_known_name(tmp_path):
    name = "bert_uncased_L-2_H-128_A-2"  # bert_score compares layer 1 of this 2-layer model
    assert model2layers[f"google/{name}"] == 1
    folder = save_tiny_bert(tmp_path / name)
    pair = (["a dog ran"], ["the cat sat"])
    default = bertscore(*pair, str(folder))["bertscore_f1"]
    assert default == pytest.approx(bertscore(*pair, str(folder), num_layers=1)["bertscore_f1"])
    assert not math.isclose(default, bertscore(*pair, str(folder), num_layers=2)["bertscore_f1"])
    with pytest.raises(ValueError, match="num_layers is 3; .* has layers 0 to 2"):
        bertscore(*pair, str(folder), num_layers=3)


def test_bertscore_scores_a_blank_side_zero(tiny_bert):
    scores = bertscore(["the cat sat", "", "a dog"], ["the cat sat", "a dog", "  "], str(tiny_bert))
    assert scores["bertscore_f1"] == pytest.approx(1 / 3)
    assert bertscore([""], ["a dog"], str(tiny_bert))["bertscore_recall"] == 0.0
