"""Exceptions that carry their CLI exit code, so one handler maps them all."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class OpsgateError(Exception):
    """Base: an expected failure with a one-line message that says what to do."""

    exit_code = 1


def _printable(text: str) -> str:
    # Escaped, not collapsed (unlike opsgate.shared.one_line): a control character in a
    # field name is evidence of what was sent, so it is shown, never interpreted.
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """`; did you mean 'x'?` for the closest choice, or nothing when none is close."""
    close = difflib.get_close_matches(value, sorted(set(choices)), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


class InvalidInput(OpsgateError):
    """The input is malformed or outside the schema; the message names the field."""

    exit_code = 2

    def __init__(self, field: str, problem: str) -> None:
        # Field names can carry user-supplied keys; an error stays one printable line.
        self.field = _printable(field)
        self.problem = _printable(problem)
        super().__init__(f"{self.field}: {self.problem}" if self.field else self.problem)


class Refused(OpsgateError):
    """Policy or a hard rule said no."""

    exit_code = 3

    def __init__(self, message: str, codes: list[str] | None = None) -> None:
        self.codes = codes or []
        super().__init__(message)


class NotFound(OpsgateError):
    exit_code = 4


class StateConflict(OpsgateError):
    """The action is not in a state that allows this (or the idempotency key clashes)."""

    exit_code = 5


class ConfigError(OpsgateError):
    exit_code = 2


class ActionFailed(OpsgateError):
    """The action ran but did not succeed (rolled back, failed, rollback failed)."""

    exit_code = 1
