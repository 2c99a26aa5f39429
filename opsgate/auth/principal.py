"""An authenticated principal: who acts, proven by a credential, never self-asserted."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from opsgate.errors import InvalidInput, OpsgateError
from opsgate.models import Identity

# Principal and group names end up in policy input, audit data and terminal output:
# a conservative alphabet keeps them one printable, unambiguous token.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+:-]{0,127}$")
MAX_GROUPS = 64


class Unauthenticated(OpsgateError):
    """No valid credential: the request is refused before anything is read or written."""

    exit_code = 3


@dataclass(frozen=True)
class Principal:
    """Who a request is from and how that was proven."""

    id: str
    kind: Literal["human", "agent"]
    groups: tuple[str, ...] = ()
    method: str = "token"  # token | oidc | proxy | local
    credential: str = ""  # e.g. the token id, so the audit trail can tell credentials apart

    @property
    def identity(self) -> Identity:
        return Identity(id=self.id, kind=self.kind)

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "kind": self.kind,
            "groups": list(self.groups),
            "method": self.method,
            "credential": self.credential,
        }


def check_name(field: str, value: str) -> str:
    if not NAME.match(value):
        raise InvalidInput(
            field,
            "expected 1-128 characters: letters, digits and _ . @ + : - (not first)",
        )
    return value


def check_groups(groups: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    if len(groups) > MAX_GROUPS:
        raise InvalidInput("groups", f"more than {MAX_GROUPS}")
    for group in groups:
        check_name("groups", group)
    return tuple(sorted(set(groups)))
