"""API tokens: issued once, stored hashed, expiring, revocable; every store; the CLI."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from opsgate.auth.principal import Unauthenticated
from opsgate.auth.tokens import authenticate_token, create_token, revoke_token
from opsgate.cli import main
from opsgate.cli.server import bind_listen, parse_listen
from opsgate.errors import InvalidInput, NotFound, StateConflict
from opsgate.identity import OsIdentity
from opsgate.store.base import Store

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def issue(store: Store, ttl: float | None = 3600.0, **kwargs: object) -> tuple[str, str]:
    issued = create_token(
        store,
        principal=str(kwargs.get("principal", "sre-agent")),
        kind="agent",
        groups=("agents", "oncall"),
        ttl=ttl,
        created_by="root",
        now=NOW,
    )
    return issued.record.id, issued.plaintext


def test_a_token_authenticates_as_its_principal(store: Store) -> None:
    token_id, plaintext = issue(store)
    principal = authenticate_token(store, plaintext, NOW + timedelta(minutes=1))
    assert (principal.id, principal.kind, principal.groups) == (
        "sre-agent",
        "agent",
        ("agents", "oncall"),
    )
    assert principal.method == "token" and principal.credential == token_id


def test_only_the_hash_is_stored_and_the_creation_is_audited(store: Store) -> None:
    token_id, plaintext = issue(store)
    secret = plaintext.split("_", 2)[2]
    record = store.get_api_token(token_id)
    assert record is not None and secret not in record.model_dump_json()
    assert record.secret_hash.startswith("sha256:")
    events = list(store.audit_events())
    assert [e.kind for e in events] == ["token.created"]
    assert events[0].actor == "root" and events[0].data["token_id"] == token_id
    assert secret not in json.dumps(events[0].data)


@pytest.mark.parametrize(
    "presented",
    [
        "",
        "ogt_",
        "Bearer x",
        "ogt_01aaaaaaaaaaaaaaaaaaaaaaaa_" + "A" * 43,  # well-formed, unknown id
        "ogt_01AAAAAAAAAAAAAAAAAAAAAAAA_" + "A" * 43,  # upper-case id is not ours
        "ogt_' OR '1'='1'; --",
        "ogt_\x00",
    ],
)
def test_garbage_and_unknown_tokens_are_refused(store: Store, presented: str) -> None:
    issue(store)
    with pytest.raises(Unauthenticated, match="invalid or expired credentials"):
        authenticate_token(store, presented, NOW)


def test_a_wrong_secret_for_a_real_id_is_refused(store: Store) -> None:
    _, plaintext = issue(store)
    forged = plaintext[:-1] + ("B" if plaintext[-1] != "B" else "C")
    with pytest.raises(Unauthenticated):
        authenticate_token(store, forged, NOW)


def test_an_expired_token_is_refused(store: Store) -> None:
    _, plaintext = issue(store, ttl=60)
    authenticate_token(store, plaintext, NOW + timedelta(seconds=59))
    with pytest.raises(Unauthenticated):
        authenticate_token(store, plaintext, NOW + timedelta(seconds=60))


def test_a_revoked_token_is_refused_and_revoking_twice_is_a_conflict(store: Store) -> None:
    token_id, plaintext = issue(store, ttl=None)
    revoked = revoke_token(store, token_id, revoked_by="root", now=NOW)
    assert revoked.revoked_by == "root" and revoked.status(NOW) == "revoked"
    with pytest.raises(Unauthenticated):
        authenticate_token(store, plaintext, NOW)
    before = store.row_counts()
    with pytest.raises(StateConflict, match=r"already revoked at 2026-12-01T12:00:00Z$"):
        revoke_token(store, token_id, revoked_by="root", now=NOW)
    with pytest.raises(NotFound):
        revoke_token(store, "01nosuchtoken", revoked_by="root", now=NOW)
    assert store.row_counts() == before
    assert [e.kind for e in store.audit_events()] == ["token.created", "token.revoked"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"principal": ""}, "principal"),
        ({"principal": "alice\nbob"}, "principal"),
        ({"principal": "alice bob"}, "principal"),
        ({"principal": "-rf"}, "principal"),
        ({"principal": "a" * 129}, "principal"),
        ({"groups": ("sre", "bad group")}, "groups"),
        ({"groups": tuple(f"g{i}" for i in range(65))}, "groups"),
        ({"kind": "worker"}, "kind"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": -5}, "ttl"),
        ({"ttl": 10_000 * 86400}, "ttl"),
    ],
)
def test_bad_token_requests_name_the_field_and_store_nothing(
    store: Store, kwargs: dict[str, object], field: str
) -> None:
    before = store.row_counts()
    arguments: dict[str, object] = {
        "principal": "sre-agent",
        "kind": "agent",
        "groups": (),
        "ttl": 3600.0,
        "created_by": "root",
        **kwargs,
    }
    with pytest.raises(InvalidInput) as raised:
        create_token(store, **arguments)  # type: ignore[arg-type]
    assert raised.value.field == field
    assert store.row_counts() == before


@pytest.mark.parametrize(
    ("value", "expected"),
    [("127.0.0.1:8700", ("127.0.0.1", 8700)), ("[::1]:9000", ("::1", 9000))],
)
def test_listen_addresses(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize(
    "value", ["8700", "localhost:8700", "127.0.0.1:0", "127.0.0.1:70000", "127.0.0.1:x", ":80"]
)
def test_bad_listen_addresses(value: str) -> None:
    with pytest.raises(InvalidInput, match="--listen"):
        parse_listen(value)


def test_a_port_in_use_is_refused_naming_listen() -> None:
    taken = bind_listen("127.0.0.1", 0)
    try:
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(InvalidInput, match="--listen") as refused:
            bind_listen("127.0.0.1", port)
        assert refused.value.field == "--listen" and str(port) in str(refused.value)
    finally:
        taken.close()
    bind_listen("127.0.0.1", port).close()  # free again: bound, then released


def test_os_identity_is_the_real_uid_not_logname(monkeypatch: pytest.MonkeyPatch) -> None:
    real = OsIdentity().current().id
    monkeypatch.setenv("LOGNAME", "mallory")
    monkeypatch.setenv("USER", "mallory")
    monkeypatch.setenv("LNAME", "mallory")
    monkeypatch.setenv("USERNAME", "mallory")
    assert OsIdentity().current().id == real != "mallory"


def test_token_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPSGATE_DB", f"sqlite:///{tmp_path / 'o.db'}")
    monkeypatch.delenv("OPSGATE_IDENTITY", raising=False)
    assert main(["init"]) == 0
    capsys.readouterr()
    assert main(["token", "create", "--principal", "ci-bot", "--ttl", "12h", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["token"].startswith("ogt_") and created["status"] == "active"
    assert main(["token", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [t["id"] for t in listed] == [created["id"]]
    assert created["token"].split("_", 2)[2] not in json.dumps(listed)
    assert main(["token", "revoke", created["id"]]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["token", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["token", "revoke", created["id"]]) == StateConflict.exit_code
    assert "already revoked" in capsys.readouterr().err
    for bad in (["--ttl", "forever"], ["--principal", "a b"], ["--kind", "root"]):
        args = ["token", "create", "--principal", "x", *bad]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
    assert main(["token", "revoke", "'; drop table api_tokens; --"]) == 2
