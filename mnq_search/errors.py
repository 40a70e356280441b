"""The one exception type the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UsageError(ValueError):
    """Bad input from the user: unknown name, bad value, missing or corrupt file, empty data."""


def unknown_choice(kind: str, name: str, choices: Iterable[str]) -> UsageError:
    """A UsageError naming the valid choices and the closest match, e.g. for an unknown strategy."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UsageError(f"unknown {kind} {name!r}{hint}; choose from: {', '.join(choices)}")
