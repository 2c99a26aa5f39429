"""The server's edge over real TCP: identity headers believed only from a configured
proxy address, and failed authentications limited per peer address.

Linux routes all of 127.0.0.0/8 to loopback, so a client bound to 127.0.0.2 is another
peer to the server on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.integration.test_server import SCALE, Rig

pytestmark = pytest.mark.integration

PROXY = "127.0.0.2"


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = Rig(
        tmp_path_factory.mktemp("boundary"),
        {
            "OPSGATE_TRUSTED_PROXY": f"{PROXY}, 10.9.0.0/16",
            "OPSGATE_PROXY_USER_HEADER": "X-Forwarded-User",
            "OPSGATE_PROXY_GROUPS_HEADER": "X-Forwarded-Groups",
            "OPSGATE_AUTH_FAILURE_LIMIT": "5",
            "OPSGATE_AUTH_FAILURE_WINDOW": "10m",
        },
    )
    rig.tokens = {
        "alice": rig.token("alice", "--kind", "human"),
        "agent": rig.token("sre-agent", "--kind", "agent"),
    }
    rig.server.start()
    try:
        yield rig
    finally:
        rig.server.stop()
        rig.store.close()


def call(
    rig: Rig,
    source: str,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: Any = None,
) -> tuple[int, dict[str, str], Any]:
    """One request from the peer address `source`."""
    connection = http.client.HTTPConnection(
        "127.0.0.1", rig.server.port, timeout=30, source_address=(source, 0)
    )
    try:
        sent = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        connection.request(method, "/api/v1" + path, body=data, headers=sent)
        response = connection.getresponse()
        text = response.read().decode("utf-8", "replace")
        try:
            answer: Any = json.loads(text)
        except ValueError:
            answer = text
        return response.status, {k.lower(): v for k, v in response.getheaders()}, answer
    finally:
        connection.close()


def metric(rig: Rig, name: str) -> float:
    text = requests.get(rig.server.url + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_identity_headers_from_an_untrusted_peer_are_ignored_and_counted(rig: Rig) -> None:
    before, spoofs = rig.rows(), metric(rig, "opsgate_api_proxy_header_spoofs_total")
    peer = "127.0.0.4"
    for header in ("X-Forwarded-User", "X-Remote-User", "Remote-User"):
        status, _, body = call(rig, peer, "GET", "/whoami", {header: "alice"})
        assert status == 401 and body["error"]["type"] == "unauthenticated"
        # Beside a real token the header changes nothing: the token decides.
        status, _, body = call(
            rig, "127.0.0.1", "GET", "/whoami",
            {header: "alice", "X-Forwarded-Groups": "sre-lead", **bearer(rig.tokens["agent"])},
        )  # fmt: skip
        assert status == 200 and body["id"] == "sre-agent" and body["groups"] == []
    status, _, body = call(rig, peer, "POST", "/actions", {"X-Forwarded-User": "alice"}, SCALE)
    assert status == 401
    assert rig.rows() == before
    assert metric(rig, "opsgate_api_proxy_header_spoofs_total") == spoofs + 7


def test_a_trusted_proxy_asserts_who_acts(rig: Rig) -> None:
    headers = {"X-Forwarded-User": "carol", "X-Forwarded-Groups": "sre-lead, ops"}
    status, _, body = call(rig, PROXY, "GET", "/whoami", headers)
    assert status == 200, body
    assert body["id"] == "carol" and body["kind"] == "human" and body["method"] == "proxy"
    assert body["groups"] == ["ops", "sre-lead"]
    # What the proxy asserts is what acts: carol's proposal is carol's.
    document = {**SCALE, "target": "proxied", "params": {"deployment": "proxied", "replicas": 3}}
    status, _, body = call(rig, PROXY, "POST", "/actions", headers, document)
    assert status == 201 and body["action"]["proposer"] == {"id": "carol", "kind": "human"}
    # Without the header the proxy is a peer like any other: a bearer token decides.
    status, _, body = call(rig, PROXY, "GET", "/whoami", bearer(rig.tokens["alice"]))
    assert status == 200 and body["id"] == "alice" and body["method"] == "token"


@pytest.mark.parametrize(
    "user",
    [
        "alice\tadmin",  # a control character inside the value
        "a" * 5000,  # overlong
        "alice,bob",
        "-rf",
        "ålice",
        "alice; DROP TABLE actions",
    ],
)
def test_a_malformed_proxy_identity_is_401_and_stores_nothing(rig: Rig, user: str) -> None:
    before = rig.rows()
    status, _, body = call(rig, PROXY, "POST", "/actions", {"X-Forwarded-User": user}, SCALE)
    assert status in (400, 401), body  # 400: refused by the HTTP layer before the app
    if status == 401:
        assert body["error"]["message"].startswith("invalid proxy identity")
        assert "\n" not in body["error"]["message"]
    assert rig.rows() == before


def test_malformed_proxy_groups_are_401(rig: Rig) -> None:
    for groups in ("sre\tlead", "g," * 100, "x" * 5000, "ops,ad min", "ops,\u00e5"):
        headers = {"X-Forwarded-User": "carol", "X-Forwarded-Groups": groups}
        status, _, body = call(rig, PROXY, "GET", "/whoami", headers)
        assert status in (400, 401), (groups, body)


def test_an_empty_proxy_identity_asserts_nobody(rig: Rig) -> None:
    status, _, body = call(rig, PROXY, "GET", "/whoami", {"X-Forwarded-User": ""})
    assert status == 401 and "missing credentials" in body["error"]["message"]
    status, _, body = call(rig, PROXY, "GET", "/whoami", {"X-Forwarded-User": "   "})
    assert status == 401


def test_failed_authentications_are_limited_per_peer(rig: Rig) -> None:
    peer, other = "127.0.0.3", "127.0.0.1"
    limited = metric(rig, "opsgate_api_auth_rate_limited_total")
    forged = bearer("ogt_" + "0" * 26 + "_" + "A" * 43)
    for _ in range(5):
        status, _, _ = call(rig, peer, "GET", "/whoami", forged)
        assert status == 401
    status, headers, body = call(rig, peer, "GET", "/whoami", forged)
    assert status == 429 and body["error"]["type"] == "rate_limited"
    assert 1 <= int(headers["retry-after"]) <= 600
    # The limited peer is limited with a good token too (that is the point) ...
    status, _, _ = call(rig, peer, "GET", "/whoami", bearer(rig.tokens["alice"]))
    assert status == 429
    # ... and nobody else is.
    status, _, body = call(rig, other, "GET", "/whoami", bearer(rig.tokens["alice"]))
    assert status == 200 and body["id"] == "alice"
    assert metric(rig, "opsgate_api_auth_rate_limited_total") == limited + 2


def test_a_forwarded_for_header_does_not_move_the_peer(rig: Rig) -> None:
    # Were X-Forwarded-For believed, a limited peer would rotate it to start afresh.
    peer = "127.0.0.5"
    forged = bearer("ogt_nope")
    for n in range(5):
        status, _, _ = call(rig, peer, "GET", "/whoami",
                            {**forged, "X-Forwarded-For": f"10.0.0.{n}"})  # fmt: skip
        assert status == 401
    status, _, _ = call(rig, peer, "GET", "/whoami", {**forged, "X-Forwarded-For": "10.0.0.99"})
    assert status == 429
    # ... and X-Forwarded-For naming the proxy does not make an untrusted peer one.
    status, _, _ = call(rig, "127.0.0.6", "GET", "/whoami",
                        {"X-Forwarded-For": PROXY, "X-Forwarded-User": "carol"})  # fmt: skip
    assert status == 401


def test_client_mode_says_when_it_is_limited(rig: Rig, tmp_path: Path) -> None:
    from tests.integration.api_server import run_cli

    env = {"OPSGATE_URL": rig.server.url, "OPSGATE_CONFIG": str(tmp_path / "absent.toml")}
    # 127.0.0.1 failed above at most twice; five more exhaust it.
    codes = [
        run_cli({**env, "OPSGATE_TOKEN": "ogt_nope"}, "whoami", cwd=tmp_path).returncode
        for _ in range(6)
    ]
    assert set(codes) == {3}
    done = run_cli({**env, "OPSGATE_TOKEN": "ogt_nope"}, "whoami", cwd=tmp_path)
    assert done.returncode == 3 and "too many failed authentications" in done.stderr
    assert done.stderr.count("\n") == 1
