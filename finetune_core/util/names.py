"""Hints for mistyped names."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def nearest(word: str, choices: Iterable[str], n: int = 3) -> str:
    """Returns ' Did you mean a, b?' for the closest choices, or ''."""
    close = difflib.get_close_matches(str(word), list(choices), n=n, cutoff=0.5)
    return f" Did you mean {', '.join(close)}?" if close else ""
