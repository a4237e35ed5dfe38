"""Load a run config from YAML, apply `a.b=c` overrides, and explain what is wrong.

pydantic does the validation; this module turns its errors into one message per problem
that names the file, the key, what was expected and, for unknown keys, the closest known
key ("did you mean").
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from lmforge.config.base import closest
from lmforge.config.data import DataConfig
from lmforge.config.eval import EvalConfig
from lmforge.config.root import RunConfig


class ConfigError(ValueError):
    """A config the user wrote cannot be used; the message says why and how to fix it."""


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn ["train.lr=1e-4", "adapter.r=16"] into a nested dict; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override `{item}` is not of the form section.key=value (e.g. train.lr=1e-4)")
        value = yaml.safe_load(raw) if raw.strip() else ""
        # YAML reads 1e-4 as a string (no dot): accept the spelling people type.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in "eE.") else value
            except ValueError:
                pass
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override `{item}`: `{part}` is a value, not a section")
        node[parts[-1]] = value
    return nested


def merge_config(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` laid over `base`, section by section (neither is changed); a new `optimizer`
    drops the old one's `optimizer_args` unless `update` gives its own."""
    out = dict(base)
    if (
        update.get("optimizer", base.get("optimizer")) != base.get("optimizer")
        and "optimizer_args" not in update
    ):
        # Options belong to their optimizer: switching it (an override, a pipeline stage) drops them.
        out.pop("optimizer_args", None)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = value
    return out


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Config sections inside an annotation: `Section`, `Section | None`, `list[Section]`, a union."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _model_at(loc: Sequence[str | int], root: type[BaseModel] = RunConfig) -> type[BaseModel] | None:
    """The pydantic model class that owns the key at `loc` (for did-you-mean suggestions). A list
    index is skipped; a union's tag (pydantic puts the `kind` value in `loc`) picks its member."""
    candidates: list[type[BaseModel]] = [root]
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        tagged = [
            m for m in candidates if part in get_args(getattr(m.model_fields.get("kind"), "annotation", None))
        ]
        if len(candidates) > 1 and tagged:
            candidates = tagged
            continue
        fields = [m.model_fields[str(part)] for m in candidates if str(part) in m.model_fields]
        if not fields:
            return None
        candidates = _models_in(fields[0].annotation)
    return candidates[0] if len(candidates) == 1 else None


def _key_parts(loc: Sequence[str | int], root: type[BaseModel]) -> list[str]:
    """`loc` as the user wrote it: `tasks[0].window` (pydantic's union tag `tasks.0.perplexity` dropped)."""
    parts: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(part, int):
            parts[-1] = f"{parts[-1]}[{part}]" if parts else f"[{part}]"
        elif i and isinstance(loc[i - 1], int) and _model_at([*loc[:i], "?"], root) is None:
            continue  # the tag of a tagged union: not a key the user typed
        else:
            parts.append(str(part))
    return parts


def describe_error(error: Any, source: str, root: type[BaseModel] = RunConfig) -> str:
    """One pydantic error (an item of `ValidationError.errors()`) against the `root` schema as a
    message naming `source` and the key as the user wrote it; an unknown key gets a "did you mean"."""
    loc = _key_parts(error["loc"], root)
    key = ".".join(loc) if loc else "(top level)"
    if error["type"] == "extra_forbidden":
        owner = _model_at(error["loc"], root)
        known = list(owner.model_fields) if owner else []
        close = closest(loc[-1], known)
        hint = f" — did you mean `{'.'.join([*loc[:-1], close])}`?" if close else ""
        section = ".".join(loc[:-1]) or "top level"
        return (
            f"{source}: unknown key `{key}`{hint} (known keys in {section}: {', '.join(known)}; "
            f"`lmforge config keys{' --eval' if root is EvalConfig else ''}` lists them all)"
        )
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] in ("value_error", "assertion_error") and not loc:
        return f"{source}: {message}"
    given = error.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"{source}: `{key}`: {message}{shown}"


def validate_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a nested dict; raise ConfigError listing every problem."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [describe_error(e, source) for e in exc.errors()]
        raise ConfigError("\n".join(problems)) from None


def load_data_config(path: str, overrides: Sequence[str] = ()) -> DataConfig:
    """The `data:` section for one dataset (a file, folder or registry name) given on the command
    line, with `data.key=value` overrides; errors name keys as in a whole config (`data.dataset_dir`)."""
    nested = parse_overrides(overrides)
    others = sorted(set(nested) - {"data"})
    if others:
        raise ConfigError(
            f"only data.* overrides apply to a dataset, not {', '.join(f'{o}.*' for o in others)}; "
            "give the tokenizer with --model and the stage with --stage, or check a config"
        )
    section = nested.get("data", {})
    if not isinstance(section, dict) or "path" in section or "datasets" in section:
        raise ConfigError(f"data.path is the dataset given (`{path}`); give data.key=value overrides")
    try:
        return DataConfig.model_validate({**section, "path": path})
    except ValidationError as exc:
        problems = [describe_error({**e, "loc": ("data", *e["loc"])}, "command line") for e in exc.errors()]
        raise ConfigError("\n".join(problems)) from None


def validate_eval_config(raw: dict[str, Any], source: str = "eval config") -> EvalConfig:
    try:
        return EvalConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("\n".join(describe_error(e, source, EvalConfig) for e in exc.errors())) from None


def load_eval_config(path: str | Path, overrides: Sequence[str] = ()) -> EvalConfig:
    """An `lmforge eval` config from YAML, with `a.b=c` overrides (e.g. output_dir=runs/x)."""
    raw = merge_config(load_yaml(path), parse_overrides(overrides))
    return validate_eval_config(raw, source=str(path))


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges are meant to repeat keys
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key `{key}` is given twice, on lines {seen[key]} and {line}: the second would "
                    "silently replace the first; keep one",
                    key_node.start_mark,
                )
            seen.setdefault(key, line)
        return super().construct_mapping(node, deep)


def strict_yaml(text: str) -> Any:
    """yaml.safe_load, but a key given twice in one mapping is a yaml.YAMLError naming both lines."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give the config's YAML file (e.g. {path}/config.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = strict_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}); save it as UTF-8"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections (model:, data:, ...), got {type(raw).__name__}"
        )
    return raw


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read YAML, apply overrides, validate. Relative data/output paths stay relative to the CWD."""
    raw = merge_config(load_yaml(path), parse_overrides(overrides))
    return validate_config(raw, source=str(path))


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _type_name(get_args(annotation)[0])
    if origin is None:
        return getattr(annotation, "__name__", str(annotation)).replace("NoneType", "None")
    args = [_type_name(a) if not isinstance(a, str) else repr(a) for a in get_args(annotation)]
    if origin in (Union, UnionType):
        return " | ".join(args)
    name = getattr(origin, "__name__", str(origin)).replace("Literal", "one of")
    return f"{name}[{', '.join(args)}]"


def iter_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """Yield (key, type, default, help) for every leaf key of the config."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        key = f"{prefix}{name}"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from iter_keys(annotation, prefix=f"{key}.")
            continue
        default = "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))
        yield key, _type_name(annotation), default, field.description or ""
        if name == "optimizer_args":  # a dict checked against the chosen optimizer's own section
            from lmforge.config.optim import OPTIMIZER_ARGS

            names: dict[type[BaseModel], list[str]] = {}
            for optimizer, section in OPTIMIZER_ARGS.items():
                names.setdefault(section, []).append(optimizer)
            for section, optimizers in names.items():
                label = f"{optimizers[0]}*" if len(optimizers) > 2 else "|".join(optimizers)  # adamw* family
                yield from iter_keys(section, prefix=f"{key}[optimizer={label}].")
            continue
        sections = _models_in(annotation)
        if len(sections) > 1:  # a list of tagged sections (eval tasks): keys per kind
            for section in sections:
                tag = get_args(section.model_fields["kind"].annotation)[0]
                yield from iter_keys(section, prefix=f"{key}[kind={tag}].")
        elif sections:  # a list of sections (data.datasets) or an optional one (tags)
            inner = f"{key}[]." if get_origin(annotation) is list else f"{key}."
            yield from iter_keys(sections[0], prefix=inner)
