"""Short action ids: any unique prefix of at least MIN_PREFIX characters names an action.

Ids are ULIDs (26 Crockford base32 characters, upper case). The first ten encode the
creation time, so a prefix that fits a terminal names one action unless another was
proposed within the same moment; an ambiguous prefix is refused, never guessed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from opsgate.errors import InvalidInput, NotFound

MIN_PREFIX = 6
ID_LENGTH = 26
# Shown in tables: never shorter, so a printed id stays unique as later actions arrive
# (eight characters resolve the creation time to about a second).
MIN_SHOWN = 8
# Worker and run logs cannot ask the store per line: 13 characters carry the creation
# millisecond and 15 random bits, unique in practice and accepted by every command.
LOG_LENGTH = 13
_ALPHABET = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_SHOWN_CANDIDATES = 5


class IdStore(Protocol):
    def get_action(self, action_id: str) -> object | None: ...

    def action_ids_with_prefix(self, prefix: str, limit: int) -> list[str]: ...

    def neighbour_ids(self, action_id: str) -> tuple[str | None, str | None]: ...


def normalize(raw: str, field: str = "action_id") -> str:
    """The id or prefix as stored (upper case); InvalidInput naming `field` if it cannot
    be one."""
    text = raw.strip().upper()
    if not text:
        raise InvalidInput(field, "empty; give an action id or a prefix of one")
    if len(text) > ID_LENGTH:
        raise InvalidInput(field, f"longer than an action id ({ID_LENGTH} characters)")
    if not set(text) <= _ALPHABET:
        raise InvalidInput(field, f"{raw!r} is not an action id (letters and digits only)")
    if len(text) < MIN_PREFIX:
        raise InvalidInput(
            field, f"{raw!r} is too short; give at least {MIN_PREFIX} characters of the id"
        )
    return text


def resolve(store: IdStore, raw: str, field: str = "action_id") -> str:
    """The full id of the one action whose id starts with `raw` (case-insensitive).

    InvalidInput (exit 2) for a malformed or ambiguous prefix, NotFound (exit 4) when no
    action matches."""
    prefix = normalize(raw, field)
    if len(prefix) == ID_LENGTH and store.get_action(prefix) is not None:
        return prefix
    matches = store.action_ids_with_prefix(prefix, _SHOWN_CANDIDATES + 1)
    if not matches:
        raise NotFound(f"no action {prefix}; list them with `opsgate list`")
    if len(matches) > 1:
        shown = ", ".join(matches[:_SHOWN_CANDIDATES])
        more = ", ..." if len(matches) > _SHOWN_CANDIDATES else ""
        raise InvalidInput(
            field,
            f"{prefix} is ambiguous: it matches {shown}{more}; give more characters",
        )
    return matches[0]


def shortest_unique(action_id: str, neighbours: Iterable[str | None]) -> str:
    """The shortest prefix (>= MIN_SHOWN) of `action_id` that no neighbour shares."""
    length = MIN_SHOWN
    for other in neighbours:
        if other is None:
            continue
        common = 0
        for a, b in zip(action_id, other, strict=False):
            if a != b:
                break
            common += 1
        length = max(length, common + 1)
    return action_id[: min(length, len(action_id))]


def short_ids(store: IdStore, ids: Iterable[str]) -> dict[str, str]:
    """Each id's shortest unique prefix in the store today (two indexed reads per id)."""
    return {i: shortest_unique(i, store.neighbour_ids(i)) for i in dict.fromkeys(ids)}


def log_id(action_id: str) -> str:
    return action_id[:LOG_LENGTH]
