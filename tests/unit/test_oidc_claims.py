"""How verified OIDC claims become a principal, and how `opsgate login` keeps its
credentials; no network (the token checks themselves run against a real provider in
tests/integration/test_oidc.py)."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from opsgate.auth.oidc import OidcSettings, OidcVerifier, looks_like_jwt
from opsgate.auth.principal import Unauthenticated
from opsgate.client import credentials
from opsgate.errors import ConfigError

VERIFIER = OidcVerifier(
    OidcSettings(issuer="https://idp.example", audience="urn:opsgate", user_claim="email")
)


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "u-1", "email": "alice@example.com", "groups": ["sre"], **extra}


def test_user_and_groups_come_from_the_configured_claims() -> None:
    principal = VERIFIER.principal(claims(jti="abc"))
    assert (principal.id, principal.kind, principal.groups) == (
        "alice@example.com",
        "human",
        ("sre",),
    )
    assert principal.method == "oidc" and principal.credential == "abc"


def test_a_client_credentials_token_is_a_machine() -> None:
    principal = VERIFIER.principal(claims(sub="ci", client_id="ci"))
    assert principal.kind == "agent"


@pytest.mark.parametrize("bad", [None, "", "alice\nbob", "a b", "-rf", "x" * 129, 42, ["alice"]])
def test_a_user_claim_that_is_not_a_name_is_refused(bad: Any) -> None:
    with pytest.raises(Unauthenticated, match="email claim"):
        VERIFIER.principal(claims(email=bad))


def test_groups_that_are_not_names_are_dropped_never_invented() -> None:
    principal = VERIFIER.principal(claims(groups=["sre", "bad group", 7, None, "sre"]))
    assert principal.groups == ("sre",)
    with pytest.raises(Unauthenticated):
        VERIFIER.principal(claims(groups="sre"))
    with pytest.raises(Unauthenticated):
        VERIFIER.principal(claims(groups=[f"g{i}" for i in range(65)]))


def test_what_looks_like_a_jwt() -> None:
    assert looks_like_jwt("a.b.c")
    assert not looks_like_jwt("ogt_x.y.z")
    assert not looks_like_jwt("a.b")


def test_credentials_are_0600_in_a_0700_directory(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    entry = {"access_token": "t1", "expires_at": time.time() + 3600}
    path = credentials.save("https://opsgate.example", entry, env)
    assert path == tmp_path / "opsgate" / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert credentials.access_token("https://opsgate.example", env) == "t1"
    assert credentials.access_token("https://other.example", env) is None


def test_readable_credentials_are_refused(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    path = credentials.save("https://s", {"access_token": "t", "expires_at": 1e12}, env)
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match="readable by others"):
        credentials.access_token("https://s", env)


def test_an_expired_login_without_refresh_says_log_in_again(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    credentials.save("https://s", {"access_token": "t", "expires_at": time.time() - 1}, env)
    with pytest.raises(ConfigError, match="opsgate login"):
        credentials.access_token("https://s", env)


def test_a_relative_config_home_is_refused_and_garbage_is_not_trusted(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="XDG_CONFIG_HOME"):
        credentials.credentials_path({"XDG_CONFIG_HOME": "relative/dir"})
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    path = tmp_path / "opsgate" / "credentials.json"
    path.parent.mkdir(mode=0o700)
    path.write_text("{not json")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="unreadable"):
        credentials.access_token("https://s", env)
    path.write_text(json.dumps({"servers": {"https://s": "not an object"}}))
    assert credentials.access_token("https://s", env) is None
