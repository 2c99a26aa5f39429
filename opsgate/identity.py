"""Who is acting. Chosen in config, never by a flag: there is no `--as`."""

from __future__ import annotations

import os
import pwd
from typing import Protocol

from pydantic import ValidationError

from opsgate.config import Settings
from opsgate.errors import ConfigError
from opsgate.models import Identity
from opsgate.store.base import Store


class IdentityProvider(Protocol):
    def current(self) -> Identity: ...


class OsIdentity:
    """The operating-system user running the command (the default, local mode).

    The real uid's account name: LOGNAME and USER are plain environment variables that
    anyone can set, so they are never consulted.
    """

    def current(self) -> Identity:
        uid = os.getuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            raise ConfigError(f"uid {uid} has no account name; cannot tell who acts") from None
        return Identity(id=name, kind="human")


class PostgresIdentity:
    """Team mode: PostgreSQL authenticated the session, so its session_user is who acts."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def current(self) -> Identity:
        user = self.store.session_user()
        if not user:
            raise ConfigError("OPSGATE_IDENTITY=postgres needs a PostgreSQL store (OPSGATE_DB)")
        return Identity(id=user, kind="human")


class EnvIdentity:
    """Trusted automation and the demo: OPSGATE_USER, only when OPSGATE_IDENTITY=env."""

    def __init__(self, user: str | None, kind: str) -> None:
        self.user = user
        self.kind = kind

    def current(self) -> Identity:
        if not self.user:
            raise ConfigError("OPSGATE_IDENTITY=env needs OPSGATE_USER")
        try:
            return Identity.model_validate({"id": self.user, "kind": self.kind})
        except ValidationError as exc:
            raise ConfigError(f"OPSGATE_USER: {exc.errors()[0]['msg']}") from exc


def identity_provider(settings: Settings, store: Store) -> IdentityProvider:
    if settings.identity == "env":
        if store.url.split(":", 1)[0].startswith("postgres"):
            # A shared store: anyone could name anyone. Teams go through `opsgate server`.
            raise ConfigError(
                "OPSGATE_IDENTITY=env is refused on a PostgreSQL store: use `opsgate server` "
                "with API tokens (or OPSGATE_IDENTITY=postgres on the server side)"
            )
        return EnvIdentity(settings.user, settings.user_kind)
    if settings.identity == "postgres":
        return PostgresIdentity(store)
    return OsIdentity()
