"""One error channel: every error a user can cause is a :class:`LosscmpError`.

Its message is one line that says what is wrong and, where there is one, the mend.
``losscmp.cli.main`` turns any of them into ``losscmp: error: <message>`` and exit 2;
library callers catch the base class.  Anything else that escapes is a bug in losscmp.
"""
from __future__ import annotations


class LosscmpError(Exception):
    """Bad usage or bad input; the message is one line."""


class UsageError(LosscmpError, ValueError):
    """Options that do not make sense together, or out of range."""


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'bce_on_sigmoid'?)' for a near miss among ``choices``, else ''."""
    import difflib  # only on the error path

    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def shown(text: str, limit: int = 160, quote: bool = True) -> str:
    """``repr(text)`` (or the text itself), its middle elided past ``limit`` characters: a
    message echoes the input it refuses without becoming a page of it."""
    q = repr if quote else str
    if len(text) <= limit:
        return q(text)
    half = limit // 2
    return f"{q(text[:half])}...{q(text[-half:])} ({len(text)} characters)"
