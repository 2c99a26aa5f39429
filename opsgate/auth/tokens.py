"""Opaque API tokens: `ogt_<id>_<secret>`, shown once, kept only as a SHA-256 hash.

The secret is 256 random bits, so a plain (unsalted, fast) hash is enough: there is
nothing to brute-force, and the lookup by id keeps verification one row read.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from opsgate.auth.principal import Principal, Unauthenticated, check_groups, check_name
from opsgate.errors import InvalidInput, NotFound, StateConflict
from opsgate.lifecycle import new_id, record_event
from opsgate.models import ApiToken
from opsgate.shared import utcnow
from opsgate.store.base import Store

PREFIX = "ogt_"
# The id is a lowercase ULID (no underscore), the secret url-safe base64 of 32 bytes.
_TOKEN = re.compile(r"^ogt_([0-9a-z]{26})_([A-Za-z0-9_-]{43})$")
MAX_TTL_SECONDS = 400 * 86400


def _digest(token_id: str, secret: str) -> str:
    return "sha256:" + hashlib.sha256(f"{token_id}:{secret}".encode()).hexdigest()


@dataclass(frozen=True)
class IssuedToken:
    record: ApiToken
    plaintext: str  # shown once to whoever created it; never stored


def create_token(
    store: Store,
    *,
    principal: str,
    kind: Literal["human", "agent"],
    groups: tuple[str, ...] | list[str] = (),
    ttl: float | None,
    created_by: str,
    now: datetime | None = None,
) -> IssuedToken:
    """Issue a token and record `token.created` in the same transaction."""
    check_name("principal", principal)
    if kind not in ("human", "agent"):
        raise InvalidInput("kind", "expected human or agent")
    clean_groups = check_groups(groups)
    if ttl is not None and not 0 < ttl <= MAX_TTL_SECONDS:
        raise InvalidInput("ttl", f"expected more than 0 and at most {MAX_TTL_SECONDS // 86400}d")
    now = now or utcnow()
    token_id = new_id().lower()
    secret = secrets.token_urlsafe(32)
    record = ApiToken(
        id=token_id,
        principal=principal,
        kind=kind,
        groups=clean_groups,
        secret_hash=_digest(token_id, secret),
        created_at=now,
        created_by=created_by,
        expires_at=now + timedelta(seconds=ttl) if ttl is not None else None,
    )
    with store.transaction() as tx:
        tx.insert_api_token(record)
        record_event(
            tx,
            action_id=None,
            kind="token.created",
            actor=created_by,
            now=now,
            data={
                "token_id": token_id,
                "principal": principal,
                "principal_kind": kind,
                "groups": list(clean_groups),
                "expires_at": record.expires_at.isoformat() if record.expires_at else None,
            },
        )
    return IssuedToken(record, f"{PREFIX}{token_id}_{secret}")


def revoke_token(
    store: Store, token_id: str, *, revoked_by: str, now: datetime | None = None
) -> ApiToken:
    """Revoke at once: the next request with it gets 401. Recorded as `token.revoked`."""
    now = now or utcnow()
    with store.transaction() as tx:
        revoked = tx.revoke_api_token(token_id, now, revoked_by)
        if revoked is not None:
            record_event(
                tx,
                action_id=None,
                kind="token.revoked",
                actor=revoked_by,
                now=now,
                data={"token_id": token_id, "principal": revoked.principal},
            )
            return revoked
    existing = store.get_api_token(token_id)
    if existing is None:
        raise NotFound(f"no token {token_id}; list them with `opsgate token list`")
    at = existing.revoked_at
    # The CLI's own timestamp form, not Python's str() of a datetime.
    when = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if at is not None else "some time"
    raise StateConflict(f"token {token_id} was already revoked at {when}")


def authenticate_token(store: Store, presented: str, now: datetime | None = None) -> Principal:
    """The principal a presented token stands for, or Unauthenticated.

    Every failure gives the same message: a caller learns nothing about which tokens exist.
    """
    match = _TOKEN.match(presented)
    if match is None:
        raise Unauthenticated("invalid or expired credentials")
    token_id, secret = match.groups()
    record = store.get_api_token(token_id)
    expected = record.secret_hash if record is not None else _digest("0" * 26, "")
    # Compared in constant time even for an unknown id, so timing tells nothing either.
    matches = hmac.compare_digest(expected, _digest(token_id, secret))
    if record is None or not matches or record.status(now or utcnow()) != "active":
        raise Unauthenticated("invalid or expired credentials")
    return Principal(
        id=record.principal,
        kind=record.kind,
        groups=record.groups,
        method="token",
        credential=record.id,
    )
