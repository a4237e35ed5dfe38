"""The base every config section derives from: typed, documented, strict."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: unknown keys are rejected, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def closest(word: str, known: Sequence[str]) -> str | None:
    """The known name a typo most likely meant (None when nothing is close): for "did you mean"."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.5)
    return close[0] if close else None
