"""Score prompt/response pairs with a reward model (`lmforge reward score`, PPO and GRPO).

A reward folder is what `method.name: reward` saves: a peft adapter with the trained score head,
over a base named in its adapter_config.json, plus the tokenizer and template. A full
sequence-classification model folder (one output) works too. A pair is scored on the whole
conversation rendered with the folder's template, exactly as in training.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from lmforge.artifacts import write_atomic
from lmforge.config.model import ModelConfig
from lmforge.data.templates import AnyTemplate, Conversation, pick_template
from lmforge.models.loading import (
    adapter_base,
    expected_head_swap,
    load_tokenizer,
    model_location,
    quiet_library_bars,
    saved_template_name,
)


class RewardModel:
    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, template: AnyTemplate
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", base: str | None = None) -> RewardModel:
        """A reward folder (adapter + head over its base) or a full one-output classifier."""
        path = Path(path)
        tokenizer = load_tokenizer(ModelConfig(name_or_path=str(path)))
        backbone = adapter_base(path, base)  # None: a full classifier folder
        if backbone is not None:
            from peft import PeftModel

            with expected_head_swap():  # the trained head comes from the adapter folder
                model = AutoModelForSequenceClassification.from_pretrained(
                    model_location(backbone), num_labels=1, use_safetensors=True
                )
            model = PeftModel.from_pretrained(model, str(path))
        else:
            model = AutoModelForSequenceClassification.from_pretrained(str(path), use_safetensors=True)
            if model.config.num_labels != 1:
                raise ValueError(f"{path} has {model.config.num_labels} outputs; a reward model has one")
        model.config.pad_token_id = tokenizer.pad_token_id
        template = pick_template(
            None, [saved_template_name(str(path))], tokenizer, backbone or base or str(path)
        )
        return cls(model.to(device), tokenizer, template)

    def encode(self, prompt: str, response: str, system: str | None = None) -> list[int]:
        segments = self.template.encode(
            Conversation(turns=[(prompt, response)], system=system), self.tokenizer
        )
        return [token for prompt_ids, response_ids in segments for token in prompt_ids + response_ids]

    @torch.no_grad()
    def score(self, pairs: list[tuple[str, str]], batch_size: int = 16) -> list[float]:
        """One scalar reward per (prompt, response)."""
        pad = self.tokenizer.pad_token_id
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(pairs), batch_size):
            rows = [self.encode(p, r) for p, r in pairs[start : start + batch_size]]
            width = max(len(row) for row in rows)
            ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=device)
            mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
            scores += self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
        return scores


def score_command(
    model: Path,
    prompt: str | None,
    response: str | None,
    data: str | None,
    out: Path | None,
    base: str | None = None,
) -> list[str]:
    """What `lmforge reward score` prints: one score, or a data set's summary (records to `out`)."""
    if (prompt is None) != (response is None) or (prompt is None) == (data is None):
        raise ValueError("give --prompt with --response, or --data (not both)")
    with quiet_library_bars():
        reward = RewardModel.load(model, base=base)
    if prompt is not None and response is not None:
        return [f"{reward.score([(prompt, response)])[0]:.4f}"]
    from lmforge.inference.predict import read_examples

    assert data is not None
    examples = read_examples(data)
    scores = reward.score([(e.prompt, e.response) for e in examples])
    pairs = [e for e in examples if e.rejected is not None]
    rejected = iter(reward.score([(e.prompt, e.rejected or "") for e in pairs]) if pairs else [])
    records = []
    for example, score in zip(examples, scores, strict=True):
        record = {"prompt": example.prompt, "response": example.response, "score": score}
        if example.rejected is not None:
            record.update(rejected=example.rejected, rejected_score=next(rejected))
        records.append(record)
    if out is not None:
        write_atomic(out, "".join(json.dumps(r) + "\n" for r in records))
    mean = sum(scores) / len(scores)
    lines = [f"{len(records)} records scored, mean reward {mean:.4f}"]
    if pairs:
        wins = sum(r["score"] > r["rejected_score"] for r in records if "rejected" in r)
        lines.append(f"chosen scored above rejected in {wins}/{len(pairs)} pairs ({wins / len(pairs):.1%})")
    if out is not None:
        lines.append(f"written to {out}")
    return lines
