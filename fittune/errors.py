"""One exception type for every problem a user can fix, printed as a single clear line."""

from __future__ import annotations

from dataclasses import dataclass


class FittuneError(Exception):
    """A problem with the user's input (config, data, checkpoint) that says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Refusal:
    """Why a setting cannot run where it was asked to (a launch's strategy, its precision)."""

    setting: str
    """The setting refused there, as the user wrote it (`train.compile`, `model.dtype`): the planner's short
    reason, `not with SETTING`."""
    why: str
    """The whole error: the reason and the fix."""


class DataNotFound(FittuneError):
    """A data file the config names is not there (evaluate.py adds how to point at the run's moved data)."""


def first_line(e: BaseException) -> str:
    """An exception's first line for a one-line message (its type's name when it has no text)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
