"""One exception type for every problem a user can fix, printed as a single clear line."""

from __future__ import annotations


class FittuneError(Exception):
    """A problem with the user's input (config, data, checkpoint) that says what is wrong and how to fix it."""


class DataNotFound(FittuneError):
    """A data file the config names is not there (evaluate.py adds how to point at the run's moved data)."""


def first_line(e: BaseException) -> str:
    """An exception's first line for a one-line message (its type's name when it has no text)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
