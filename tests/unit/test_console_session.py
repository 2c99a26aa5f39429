"""Console cookies: signed, expiring, purpose-bound; CSRF tokens; PKCE pairs."""

from __future__ import annotations

import base64
import hashlib
import json
import time

import pytest

from opsgate.auth.principal import Principal
from opsgate.server.console.session import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    CookieSigner,
    csrf_ok,
    new_session,
    pkce_pair,
    session_from,
)

SIGNER = CookieSigner(b"k" * 32)
ALICE = Principal(id="alice", kind="human", groups=("sre",), method="oidc")


def test_a_session_round_trips() -> None:
    cookie = SIGNER.dump(SESSION_COOKIE, new_session(ALICE), 60)
    session = session_from(SIGNER.load(SESSION_COOKIE, cookie))
    assert session is not None
    assert session.principal.id == "alice" and session.principal.groups == ("sre",)
    assert csrf_ok(session, session.csrf)


def test_an_altered_cookie_is_no_session() -> None:
    cookie = SIGNER.dump(SESSION_COOKIE, new_session(ALICE), 60)
    payload, mac = cookie.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload))
    data["id"], data["groups"] = "carol", ["sre-lead"]  # spoofing another person
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).decode() + "." + mac
    assert SIGNER.load(SESSION_COOKIE, forged) is None


def test_another_secret_or_purpose_is_refused() -> None:
    cookie = SIGNER.dump(SESSION_COOKIE, new_session(ALICE), 60)
    assert CookieSigner(b"o" * 32).load(SESSION_COOKIE, cookie) is None
    assert SIGNER.load(LOGIN_COOKIE, cookie) is None  # a session never passes as a login


def test_an_expired_cookie_is_refused() -> None:
    cookie = SIGNER.dump(SESSION_COOKIE, new_session(ALICE), -1)
    assert SIGNER.load(SESSION_COOKIE, cookie) is None


@pytest.mark.parametrize(
    "value",
    ["", "x", "a.b.c", "." * 5000, "!!!!.0000", "e30." + "0" * 64, "\udcff.ab"],
)
def test_malformed_cookies_are_no_session(value: str) -> None:
    assert SIGNER.load(SESSION_COOKIE, value) is None


@pytest.mark.parametrize(
    "data",
    [
        {"id": "alice", "kind": "agent", "groups": [], "csrf": "c" * 43},  # machines: API only
        {"id": "al ice", "kind": "human", "groups": [], "csrf": "c" * 43},
        {"id": "alice", "kind": "human", "groups": ["<b>"], "csrf": "c" * 43},
        {"id": "alice", "kind": "human", "groups": [], "csrf": "short"},
        {"id": "alice", "kind": "human", "groups": "sre", "csrf": "c" * 43},
    ],
)
def test_a_signed_but_unusable_session_is_refused(data: dict[str, object]) -> None:
    cookie = SIGNER.dump(SESSION_COOKIE, data, 60)
    assert session_from(SIGNER.load(SESSION_COOKIE, cookie)) is None


def test_csrf_needs_the_exact_token() -> None:
    session = session_from(new_session(ALICE) | {"exp": time.time() + 60})
    assert session is not None
    assert not csrf_ok(session, None)
    assert not csrf_ok(session, "")
    assert not csrf_ok(session, session.csrf[:-1])


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        CookieSigner(b"short")


def test_pkce_challenge_is_s256_of_the_verifier() -> None:
    verifier, challenge = pkce_pair()
    assert 43 <= len(verifier) <= 128
    digest = hashlib.sha256(verifier.encode()).digest()
    assert challenge == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert pkce_pair()[0] != verifier


@pytest.mark.parametrize(
    ("path", "safe"),
    [
        ("/console", True),
        ("/console/", True),
        ("/console/actions/01ABC", True),
        ("/console/report", True),
        ("/console/../api/v1/actions", False),
        ("/console/./x", False),
        ("//evil.example", False),
        ("https://evil.example/console", False),
        ("/consolex", False),
        ("/console\\\\evil", False),
        ("/console/actions/%2e%2e", False),
        ("/console/a\nb", False),
    ],
)
def test_login_returns_only_to_console_paths(path: str, safe: bool) -> None:
    from opsgate.server.console.views import SAFE_NEXT

    assert bool(SAFE_NEXT.match(path)) is safe
