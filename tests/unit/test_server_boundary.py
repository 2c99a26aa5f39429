"""The server's edge, offline: which proxies are believed, and the failure limiter."""

from __future__ import annotations

from pathlib import Path

import pytest

from opsgate.auth.principal import Unauthenticated
from opsgate.config import Settings
from opsgate.errors import ConfigError
from opsgate.server.boundary import FailureLimiter, TrustedProxy, asserted_headers


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def proxy(trusted: str = "10.0.0.0/8, 192.168.1.7, fd00::/8") -> TrustedProxy:
    configured = TrustedProxy.from_settings(trusted, "X-Forwarded-User", "X-Forwarded-Groups")
    assert configured is not None
    return configured


def test_only_configured_peers_are_trusted() -> None:
    trusted = proxy()
    for peer in ("10.1.2.3", "192.168.1.7", "::ffff:10.0.0.1", "fd00::1"):
        assert trusted.trusts(peer), peer
    for peer in ("127.0.0.1", "192.168.1.8", "11.0.0.1", "", "testclient", "10.0.0.1 "):
        assert not trusted.trusts(peer), peer


@pytest.mark.parametrize(
    ("trusted", "user", "groups"),
    [
        ("10.0.0.0/33", "X-Forwarded-User", None),
        ("not-an-ip", "X-Forwarded-User", None),
        (" , ", "X-Forwarded-User", None),
        ("10.0.0.1", None, None),  # which header carries identity is never guessed
        ("10.0.0.1", "X-Forwarded-User\r\nX-Evil", None),
        ("10.0.0.1", "X-Forwarded-User", "bad header"),
        (None, "X-Forwarded-User", None),  # a header without the proxies it comes from
        (",".join(f"10.0.0.{n}" for n in range(257)), "X-Forwarded-User", None),
    ],
)
def test_bad_proxy_settings_refuse_to_start(
    trusted: str | None, user: str | None, groups: str | None
) -> None:
    with pytest.raises(ConfigError):
        TrustedProxy.from_settings(trusted, user, groups)


def test_no_proxy_configured_is_none() -> None:
    assert TrustedProxy.from_settings(None, None, None) is None


def test_proxy_identity_is_checked() -> None:
    trusted = proxy()
    who = trusted.principal("10.0.0.1", {"x-forwarded-user": "erin", "x-forwarded-groups": "b,a"})
    assert who is not None and who.id == "erin" and who.groups == ("a", "b")
    assert who.kind == "human" and who.method == "proxy"
    assert trusted.principal("10.0.0.1", {"x-forwarded-user": " "}) is None
    assert trusted.principal("10.0.0.1", {}) is None
    for bad in ("erin\x00", "e" * 5000, "erin bob", "\u202eerin"):
        with pytest.raises(Unauthenticated):
            trusted.principal("10.0.0.1", {"x-forwarded-user": bad})


def test_usual_identity_headers_are_noticed_without_a_proxy() -> None:
    assert asserted_headers({"x-remote-user": "a", "accept": "*/*"}, None) == ["x-remote-user"]
    assert asserted_headers({"x-my-user": "a"}, None) == []
    configured = TrustedProxy.from_settings("10.0.0.1", "X-My-User", None)
    assert asserted_headers({"x-my-user": "a"}, configured) == ["x-my-user"]


def test_a_peer_is_limited_after_its_failures_and_recovers() -> None:
    clock = Clock()
    limiter = FailureLimiter(3, 60.0, clock=clock)
    for _ in range(3):
        assert limiter.retry_after("10.0.0.1") is None
        limiter.failure("10.0.0.1")
    wait = limiter.retry_after("10.0.0.1")
    assert wait is not None and 1 <= wait <= 20
    assert limiter.retry_after("10.0.0.2") is None  # other peers are not affected
    clock.now += wait
    assert limiter.retry_after("10.0.0.1") is None  # one try earned back ...
    limiter.failure("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") is not None  # ... and spent


def test_the_limiter_tracks_a_bounded_number_of_peers() -> None:
    limiter = FailureLimiter(1, 60.0, max_peers=100, clock=Clock())
    for n in range(10_000):
        limiter.failure(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}")
    assert len(limiter) == 100
    assert limiter.retry_after("10.0.39.15") is not None  # the most recent is kept


@pytest.mark.parametrize("bad", [(0, 60.0), (1, 0.0), (1, -1.0)])
def test_the_limiter_refuses_nonsense(bad: tuple[int, float]) -> None:
    with pytest.raises(ValueError):
        FailureLimiter(*bad)


@pytest.mark.parametrize("setting", ["trusted_proxy", "proxy_user_header", "proxy_groups_header"])
def test_proxy_settings_are_never_read_from_a_file(tmp_path: Path, setting: str) -> None:
    path = tmp_path / "opsgate.toml"
    path.write_text(f'{setting} = "0.0.0.0/0"\n')
    with pytest.raises(ConfigError, match="identity setting"):
        Settings.load(env={}, toml_path=path, use_contexts=False)


@pytest.mark.parametrize("value", ["0", "-1", "many", "2000000"])
def test_bad_failure_limits_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="OPSGATE_AUTH_FAILURE_LIMIT"):
        Settings.load(env={"OPSGATE_AUTH_FAILURE_LIMIT": value}, use_contexts=False)
