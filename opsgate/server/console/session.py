"""Signed cookies for console sessions and the login round trip, and CSRF tokens.

A cookie is `base64url(JSON).hex(HMAC-SHA256)` under the server's session secret: the
browser holds it but cannot forge or alter it, and it expires on its own. Nothing in it
is trusted unless the signature and the expiry check out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from opsgate.auth.principal import NAME, Principal

SESSION_COOKIE = "opsgate_session"
LOGIN_COOKIE = "opsgate_login"
SESSION_TTL = 8 * 3600.0
LOGIN_TTL = 600.0
MAX_COOKIE_BYTES = 4096


class CookieSigner:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("the session secret needs at least 32 bytes")
        # A key per purpose: a login cookie can never pass as a session.
        self._keys = {
            purpose: hmac.new(secret, purpose.encode(), hashlib.sha256).digest()
            for purpose in (SESSION_COOKIE, LOGIN_COOKIE)
        }

    def dump(self, purpose: str, data: dict[str, Any], ttl: float) -> str:
        body = dict(data, exp=time.time() + ttl)
        payload = base64.urlsafe_b64encode(
            json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
        ).decode("ascii")
        mac = hmac.new(self._keys[purpose], payload.encode("ascii"), hashlib.sha256).hexdigest()
        return f"{payload}.{mac}"

    def load(self, purpose: str, value: str | None) -> dict[str, Any] | None:
        """The cookie's data, or None when it is absent, forged, altered or expired."""
        if not value or len(value) > MAX_COOKIE_BYTES or value.count(".") != 1:
            return None
        payload, mac = value.split(".")
        expected = hmac.new(self._keys[purpose], payload.encode("ascii", "replace"), hashlib.sha256)
        if not hmac.compare_digest(expected.hexdigest(), mac):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(payload.encode("ascii")))
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return None
        if not isinstance(data, dict):
            return None
        exp = data.get("exp")
        if not isinstance(exp, int | float) or exp < time.time():
            return None
        return data


@dataclass(frozen=True)
class Session:
    principal: Principal
    csrf: str


def new_session(principal: Principal) -> dict[str, Any]:
    return {
        "id": principal.id,
        "kind": principal.kind,
        "groups": list(principal.groups),
        "credential": principal.credential,
        "csrf": secrets.token_urlsafe(32),
    }


def session_from(data: dict[str, Any] | None) -> Session | None:
    if data is None:
        return None
    user, kind, groups, csrf = (
        data.get("id"),
        data.get("kind"),
        data.get("groups"),
        data.get("csrf"),
    )
    if not isinstance(user, str) or not NAME.match(user) or kind != "human":
        return None
    if not isinstance(groups, list) or not all(
        isinstance(g, str) and NAME.match(g) for g in groups
    ):
        return None
    if not isinstance(csrf, str) or len(csrf) < 32:
        return None
    principal = Principal(
        id=user,
        kind="human",
        groups=tuple(groups),
        method="oidc",
        credential=str(data.get("credential", ""))[:128],
    )
    return Session(principal, csrf)


def csrf_ok(session: Session, sent: str | None) -> bool:
    return bool(sent) and hmac.compare_digest(session.csrf.encode(), str(sent).encode())


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge), RFC 7636."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
    return verifier, challenge
