"""Typed run configuration: schema, YAML loading, overrides and error messages."""

from lmforge.config.loader import (
    ConfigError,
    dump_config,
    iter_keys,
    load_config,
    parse_overrides,
    validate_config,
)
from lmforge.config.root import RunConfig

__all__ = [
    "ConfigError",
    "RunConfig",
    "dump_config",
    "iter_keys",
    "load_config",
    "parse_overrides",
    "validate_config",
]
