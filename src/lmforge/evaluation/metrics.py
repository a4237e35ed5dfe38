"""Generation metrics over `lmforge predict` output: exact match, ROUGE, BLEU and BERTScore.

Each metric compares a model's outputs with the references pair by pair and returns corpus numbers.
The scoring itself is the libraries' own, so numbers agree with what papers report:

- ROUGE is Google's `rouge-score` (the reimplementation of ROUGE-1.5.5 that papers cite). We pass it
  our tokenizer for one reason: its default one keeps only [a-z0-9], so Chinese or Japanese text
  scored 0. Ours is the default tokenizer plus one token per CJK character (see `CJKTokenizer`).
- BLEU is `sacrebleu`, the reference implementation: 13a tokenization, or sacrebleu's `zh`
  tokenizer when the references contain CJK text. Effective order is on (see `bleu`).
- BERTScore is `bert_score`, run from a local model folder only, so evaluation never downloads.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING

import sacrebleu
from rouge_score import rouge_scorer, tokenizers

from lmforge.data.files import DataError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

METRICS = ("exact_match", "rouge", "bleu", "bertscore")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

# Han ideographs (with extensions and compatibility forms) and Japanese kana: scripts written
# without spaces between words, where a character is the natural unit to compare.
_CJK = re.compile(
    "([\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f])"
)
_SPACES = re.compile(r"\s+")
_DOWNLOAD_HINT = (
    "download the model once (e.g. `huggingface-cli download roberta-large --local-dir "
    "models/roberta-large`) and pass that folder"
)


def _check_pairs(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references; "
            "metrics compare them pair by pair, so give as many of each"
        )
    if not predictions:
        raise ValueError("no predictions to score; give at least one prediction-reference pair")


def _normalize(text: str) -> str:
    text = _SPACES.sub(" ", text).strip().casefold()
    return text[:-1].rstrip() if text.endswith(".") else text


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of pairs equal once stripped, whitespace collapsed, casefolded and a final period dropped."""
    _check_pairs(predictions, references)
    matches = sum(_normalize(p) == _normalize(r) for p, r in zip(predictions, references, strict=True))
    return matches / len(predictions)


class CJKTokenizer(tokenizers.Tokenizer):
    """rouge-score's default tokenizer, except that every CJK character is a token of its own.

    Text is NFKC-normalised first, so full-width letters and digits, common in CJK text, read as
    ASCII (`２０２４` -> `2024`). Other text goes through the default tokenizer unchanged
    (lower-cased runs of [a-z0-9], optionally Porter-stemmed), so English scores are the standard ones.
    """

    def __init__(self, stem: bool = False) -> None:
        self._latin = tokenizers.DefaultTokenizer(use_stemmer=stem)

    def tokenize(self, text: str) -> list[str]:
        tokens: list[str] = []
        # Splitting on a capturing group puts the CJK characters at the odd positions.
        for position, piece in enumerate(_CJK.split(unicodedata.normalize("NFKC", text))):
            if position % 2:
                tokens.append(piece)
            else:
                tokens.extend(self._latin.tokenize(piece))
        return tokens


def rouge(predictions: list[str], references: list[str], stem: bool = False) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 in [0, 1]; `stem` Porter-stems Latin words of 4+ letters."""
    _check_pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=CJKTokenizer(stem))
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: total / len(predictions) for name, total in totals.items()}


def bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU (0-100) from sacrebleu, with its `zh` tokenizer when any reference has CJK text.

    Effective order is on, as sacrebleu recommends for short segments: BLEU is the geometric mean of
    the 1- to 4-gram precisions, and a corpus of short answers (`Paris`, `42`) has no 4-grams at all,
    which plain BLEU scores 0 even when every answer is right. Effective order averages only the
    orders the corpus has; whenever the outputs contain 4-grams the score is the standard one.
    """
    _check_pairs(predictions, references)
    tokenize = "zh" if any(_CJK.search(reference) for reference in references) else "13a"
    return sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize, use_effective_order=True).score


def _bertscore_folder(model: str) -> Path:
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"BERTScore model folder {folder} does not exist; BERTScore runs offline from a local "
            f"folder: {_DOWNLOAD_HINT}"
        )
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"BERTScore model folder {folder} has no config.json, so it is not a saved model; "
            f"{_DOWNLOAD_HINT}"
        )
    return folder


def bertscore(
    predictions: list[str],
    references: list[str],
    model: str,
    num_layers: int | None = None,
    batch_size: int = 32,
    device: str | None = None,
) -> dict[str, float]:
    """Mean BERTScore precision, recall and F1 with the encoder saved in the local folder `model`.

    `num_layers` picks the layer whose embeddings are compared. By default it is bert_score's tuned
    layer when the folder is named like a model bert_score knows (`models/roberta-large` -> 17, as
    in published BERTScore numbers), else the model's last layer.
    """
    _check_pairs(predictions, references)
    folder = _bertscore_folder(model)
    # Imported here: bert_score pulls in pandas and matplotlib, and the model needs torch.
    import torch
    from bert_score.utils import model2layers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    depth = config.num_hidden_layers
    if num_layers is None:
        tuned = {name.rsplit("/", 1)[-1]: layer for name, layer in model2layers.items()}
        num_layers = min(tuned.get(folder.resolve().name, depth), depth)
    if not 0 <= num_layers <= depth:
        raise ValueError(f"bertscore num_layers is {num_layers}; {folder} has layers 0 to {depth}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    # bert_score gives a pair with a blank side 0, but its code for that calls a tokenizer method
    # transformers 5 removed; so blank pairs are left out of its input and count 0 here.
    pairs = enumerate(zip(predictions, references, strict=True))
    scored = [i for i, (prediction, reference) in pairs if prediction.strip() and reference.strip()]
    totals = torch.zeros(3)
    if scored:
        totals = _bertscore_sums(
            [predictions[i] for i in scored],
            [references[i] for i in scored],
            folder,
            config,
            num_layers,
            batch_size,
            device,
        )
    precision, recall, f1 = (totals / len(predictions)).tolist()
    return {"bertscore_precision": precision, "bertscore_recall": recall, "bertscore_f1": f1}


def _bertscore_sums(
    predictions: list[str],
    references: list[str],
    folder: Path,
    config: PretrainedConfig,
    num_layers: int,
    batch_size: int,
    device: str,
) -> torch.Tensor:
    """Summed (precision, recall, F1) of non-blank pairs: bert_score.score's steps, our tokenizer.

    bert_score.score would load the tokenizer itself and truncate to its model_max_length; a
    tokenizer saved without one reports a 1e30 sentinel that overflows the Rust tokenizer. So we
    load it, cap it at the model's position limit, and run bert_score.score's steps (the model cut
    at `num_layers`, greedy cosine matching, no idf weights) with it.
    """
    from collections import defaultdict

    from bert_score.utils import bert_cos_score_idf, get_model
    from transformers import AutoTokenizer

    from lmforge.models.loading import expected_head_swap, quiet_library_bars

    with quiet_library_bars(), expected_head_swap():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        encoder = get_model(str(folder), num_layers).to(device)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and tokenizer.model_max_length > limit:
        tokenizer.model_max_length = limit
    weights = defaultdict(lambda: 1.0)  # every token counts once, [CLS] and [SEP] not at all
    weights[tokenizer.sep_token_id] = 0.0
    weights[tokenizer.cls_token_id] = 0.0
    scores = bert_cos_score_idf(
        encoder, references, predictions, tokenizer, weights, batch_size=batch_size, device=device
    )
    return scores.sum(dim=0)


def generation_metrics(
    predictions: list[str],
    references: list[str],
    metrics: list[str],
    bertscore_model: str | None = None,
    bertscore_layers: int | None = None,
) -> dict[str, float]:
    """The named metrics (of `METRICS`) as one flat dict: exact_match, rouge1/2/L, bleu, bertscore_*."""
    unknown = [name for name in metrics if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    _check_pairs(predictions, references)
    if "bertscore" in metrics:
        if bertscore_model is None:
            raise ValueError(
                "the bertscore metric needs a model: set bertscore_model to a local model folder; "
                + _DOWNLOAD_HINT
            )
        _bertscore_folder(bertscore_model)  # before any scoring, so a typo fails at once
    results: dict[str, float] = {}
    for name in dict.fromkeys(metrics):
        if name == "exact_match":
            results["exact_match"] = exact_match(predictions, references)
        elif name == "rouge":
            results.update(rouge(predictions, references))
        elif name == "bleu":
            results["bleu"] = bleu(predictions, references)
        else:
            results.update(bertscore(predictions, references, bertscore_model, bertscore_layers))
    return results


def _text(value: object) -> str | None:
    """A prediction-file field as text: strings as they are, numbers (`42`) written out, else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def read_predictions(path: Path) -> tuple[list[str], list[str]]:
    """Outputs and references of a `lmforge predict` jsonl file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"predictions file {path} does not exist; give the jsonl that `lmforge predict` wrote"
        )
    predictions: list[str] = []
    references: list[str] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{where} is not JSON ({error.msg}); each line must be one JSON object with "
                    '"output" and "reference", as `lmforge predict` writes them'
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f'{where} is a JSON {type(row).__name__}, not an object with "output" and "reference"'
                )
            for key in ("output", "reference"):
                if key not in row:
                    raise DataError(f'{where} has no "{key}" key; each line needs "output" and "reference"')
            if row["reference"] is None:
                raise DataError(
                    f'{where} has "reference": null: its record had no answer to compare with; '
                    "evaluate on data whose records all have answers, or remove such lines"
                )
            output, reference = _text(row["output"]), _text(row["reference"])
            if output is None or reference is None:
                key = "output" if output is None else "reference"
                raise DataError(f'{where}: "{key}" is {json.dumps(row[key])}; expected a string')
            predictions.append(output)
            references.append(reference)
    if not predictions:
        raise DataError(f"predictions file {path} is empty; run `lmforge predict` to fill it")
    return predictions, references
