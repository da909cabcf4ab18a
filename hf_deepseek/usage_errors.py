"""`UsageError`: a mistake in how a command or recipe was called. The `hf-deepseek` command prints its message as
one line and exits with status 2; the message names the fix. It is a `ValueError`, so Python callers catch it too.
"""

import difflib
from collections.abc import Iterable


class UsageError(ValueError):
    """Raised for a wrong argument, override, recipe, path or device; the message says what to do instead."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`; did you mean 'x'?` for the closest of `choices`, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
