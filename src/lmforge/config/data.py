"""`data:` — where records come from, how they are read, mixed, templated, cut and packed."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmforge.config.base import Section

Format = Literal["auto", "alpaca", "sharegpt", "messages", "prompt", "text"]


class Columns(Section):
    """Which field of a record holds what (LLaMA-Factory's `columns` names). None = the default."""

    prompt: str | None = Field(None, description="Instruction text (alpaca; default `instruction`).")
    query: str | None = Field(None, description="Extra input appended to the prompt (default `input`).")
    response: str | None = Field(None, description="The answer (default `output`).")
    history: str | None = Field(None, description="Earlier [user, assistant] pairs (default `history`).")
    messages: str | None = Field(
        None, description="The message list (sharegpt; default `conversations`, or `messages`)."
    )
    system: str | None = Field(None, description="System prompt (default `system`).")
    images: str | None = Field(None, description="List of image paths (default `images`).")
    chosen: str | None = Field(None, description="Preferred response (default `chosen`).")
    rejected: str | None = Field(None, description="Dispreferred response (default `rejected`).")
    kto_tag: str | None = Field(None, description="KTO desirability boolean (default `label` or `kto_tag`).")
    tools: str | None = Field(
        None, description="The functions a record offers: a list or JSON string of schemas (default `tools`)."
    )


class Tags(Section):
    """Message keys and role names of sharegpt-style message lists (LLaMA-Factory's `tags`)."""

    role_tag: str = Field("from", description="Key holding the speaker.")
    content_tag: str = Field("value", description="Key holding the text.")
    user_tag: str = Field("human", description="Speaker name of the user.")
    assistant_tag: str = Field("gpt", description="Speaker name of the assistant.")
    system_tag: str = Field("system", description="Speaker name of a system message.")
    observation_tag: str = Field("observation", description="Speaker of a tool's result (docs/tools.md).")
    function_tag: str = Field(
        "function_call", description="Speaker of the assistant's tool call; its text is the call's JSON."
    )


class DatasetSource(Section):
    """One dataset in a mix: a file, a folder, a registry name or a hub id."""

    path: str = Field(
        ...,
        description="A .json/.jsonl/.csv/.parquet/.txt file, a folder of them, a name from the "
        "registry (datasets.yaml or dataset_info.json in data.dataset_dir) or a hub dataset id.",
    )
    format: Format = Field("auto", description="Record layout; auto detects it from the first record.")
    weight: float = Field(1.0, gt=0, description="Relative sampling weight when mixing datasets.")
    max_samples: int | None = Field(None, gt=0, description="Use only the first N records.")
    split: str = Field("train", description="Split of a hub dataset.")
    subset: str | None = Field(None, description="Subset (config name) of a hub dataset.")
    columns: Columns = Field(default_factory=Columns, description="Field names, when not the defaults.")
    tags: Tags | None = Field(None, description="sharegpt message keys/roles; None detects them.")


class DataConfig(Section):
    path: str = Field(
        "",
        description="The training data (one dataset): a file, folder, registry name or hub id. "
        "Use data.datasets to mix several.",
    )
    format: Format = Field(
        "auto",
        description="Layout of data.path: alpaca (instruction/input/output), sharegpt "
        "(conversations from/value), messages (role/content), prompt (prompt/chosen/rejected/"
        "completion/label fields), text (pre-training); auto detects it.",
    )
    datasets: list[DatasetSource] = Field(
        default_factory=list, description="Several datasets, each with its own format and weight."
    )
    dataset_dir: str = Field(
        ".",
        description="Folder holding the registry (datasets.yaml or LLaMA-Factory's dataset_info.json); "
        "registry names and their files resolve inside it.",
    )
    mix: Literal["auto", "concat", "interleave_under", "interleave_over"] = Field(
        "auto",
        description="How datasets combine: concat, or interleave by relative weight until the first runs out "
        "(under) or the last runs out (over); auto = concat when all weights are equal, else "
        "interleave_under (pre-training mixes usually want over).",
    )
    seed: int = Field(42, description="Seed of mixing, the validation split and prompt-template draws.")
    template: str = Field(
        "auto",
        description="Chat template: llama2, llama3, mistral, chatml, qwen2.5, qwen2-vl, deepseek-r1, "
        "alpaca, plain, or `tokenizer` (the tokenizer's own chat_template); auto reads the one saved "
        "with the model, else guesses from its name.",
    )
    system: str | None = Field(None, description="System prompt for records that have none.")
    prompt_templates: list[str] = Field(
        default_factory=list,
        description="Phrasings of the user turn, each containing `{prompt}`; one is drawn per example "
        "(seeded) so the model does not overfit one wording.",
    )
    train_on: Literal["all_turns", "last_turn"] = Field(
        "all_turns", description="Learn every assistant turn of a multi-turn record, or only the last."
    )
    reasoning: Literal["keep", "drop"] = Field(
        "keep",
        description="<think>…</think> blocks in responses: keep (and learn them) or drop them.",
    )
    max_length: int = Field(1024, gt=8, description="Tokens per example; longer ones are truncated.")
    min_pixels: int | None = Field(
        None, gt=0, description="Vision-language models: smaller images are scaled up to this many pixels."
    )
    max_pixels: int | None = Field(
        None, gt=0, description="Vision-language models: larger images are scaled down to this many pixels."
    )
    packing: bool = Field(
        False,
        description="Pack several examples into each max_length row (position ids restart, attention "
        "never crosses examples).",
    )
    streaming: bool = Field(
        False,
        description="Read and tokenize records lazily (large files); needs train.max_steps and no val_size.",
    )
    num_proc: int | None = Field(
        None,
        gt=0,
        description="Worker processes that tokenize the data (from 2,000 examples); default: the cores "
        "available.",
    )
    cache: bool = Field(
        True,
        description="Keep the tokenized data on disk, keyed on the data files, tokenizer, template and data "
        "settings, so a rerun starts training without tokenizing again (local files only).",
    )
    cache_dir: str | None = Field(
        None, description="Where data.cache keeps it: default $LMFORGE_CACHE_DIR, else ~/.cache/lmforge."
    )
    eval_path: str | None = Field(None, description="Separate evaluation data (same kinds of source).")
    val_size: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of the training data held out for evaluation."
    )
    max_samples: int | None = Field(None, gt=0, description="Use only the first N records of data.path.")

    @model_validator(mode="after")
    def _one_source_list(self) -> DataConfig:
        if self.path and self.datasets:
            raise ValueError("give either data.path (one dataset) or data.datasets (a mix), not both")
        for text in self.prompt_templates:
            if "{prompt}" not in text:
                raise ValueError(f"data.prompt_templates entry {text!r} has no `{{prompt}}` placeholder")
        if self.streaming and self.val_size:
            raise ValueError("data.streaming cannot hold out data.val_size; give data.eval_path instead")
        return self

    def sources(self) -> list[DatasetSource]:
        """The datasets to read: data.datasets, or data.path as a one-item mix."""
        if self.datasets:
            return list(self.datasets)
        if not self.path:
            return []
        return [DatasetSource(path=self.path, format=self.format, max_samples=self.max_samples)]
