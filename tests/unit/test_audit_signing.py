"""The signed audit trail against an insider with write access to the database: each
rewrite attack of the issue, through `opsgate audit verify` (the CLI entry point) on a
real SQLite file, with the key pair made by `opsgate audit keygen`."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine, delete, insert, text, update
from sqlalchemy.engine import Engine

from opsgate.audit import GENESIS_HASH, event_hash
from opsgate.audit_signing import sign_checkpoint
from opsgate.models import AuditCheckpoint
from opsgate.store.sql import SqlStore
from opsgate.store.tables import audit_checkpoints, audit_events, audit_head
from tests.unit.test_cli import SCALE, Cli


class Trail(Cli):
    """A store with one approved action, signed by the key holder, plus the DB as an
    insider sees it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, capsys: Any, tmp: Path) -> None:
        super().__init__(monkeypatch, capsys, tmp / "opsgate.db")
        self.private, self.public = tmp / "audit.key", tmp / "audit.pub"
        self.engine: Engine = create_engine(f"sqlite:///{self.db}")

    def as_signer(self) -> None:
        self.monkeypatch.setenv("OPSGATE_AUDIT_KEY", str(self.private))

    def not_signer(self) -> None:
        self.monkeypatch.delenv("OPSGATE_AUDIT_KEY", raising=False)

    def verify(self, *extra: str) -> tuple[int, dict[str, Any]]:
        code, out, _ = self("audit", "verify", "--public-key", str(self.public), *extra, "--json")
        return code, json.loads(out)

    def rows(self) -> list[dict[str, Any]]:  # type: ignore[override]
        with self.engine.connect() as conn:
            return [
                dict(r._mapping)
                for r in conn.execute(text("select * from audit_events order by seq"))
            ]

    def rewrite(self, events: list[dict[str, Any]]) -> None:
        """What an insider with the code can do: recompute every hash and the head."""
        prev = GENESIS_HASH
        with self.engine.begin() as conn:
            conn.execute(delete(audit_events))
            for seq, row in enumerate(events, start=1):
                row = {**row, "seq": seq, "prev_hash": prev}
                data = row["data"] if isinstance(row["data"], dict) else json.loads(row["data"])
                row["data"] = data
                at = row["at"]
                if isinstance(at, str):
                    at = datetime.fromisoformat(at)
                row["at"] = at if at.tzinfo else at.replace(tzinfo=UTC)
                row["hash"] = event_hash(
                    seq=seq, id=row["id"], at=row["at"], action_id=row["action_id"],
                    kind=row["kind"], actor=row["actor"], from_state=row["from_state"],
                    to_state=row["to_state"], data=data, prev_hash=prev,
                )  # fmt: skip
                conn.execute(insert(audit_events), row)
                prev = row["hash"]
            conn.execute(update(audit_head).values(seq=len(events), hash=prev))


@pytest.fixture
def trail(monkeypatch: pytest.MonkeyPatch, capsys: Any, tmp_path: Path) -> Trail:
    made = Trail(monkeypatch, capsys, tmp_path)
    assert made("init")[0] == 0
    code, out, err = made(
        "audit", "keygen", "--private-key", str(made.private), "--public-key", str(made.public)
    )
    assert code == 0, err
    assert stat.S_IMODE(os.stat(made.private).st_mode) == 0o600
    proposed = made.json(*SCALE)
    made.action_id = proposed["action"]["id"]  # type: ignore[attr-defined]
    made.as_user("bob")
    assert made("approve", made.action_id)[0] == 0  # type: ignore[attr-defined]
    made.as_signer()
    code, out, err = made("audit", "checkpoint")
    assert code == 0, err
    made.anchor = tmp_path / "anchor.json"  # type: ignore[attr-defined]
    made.anchor.write_text(out)  # type: ignore[attr-defined]
    made.not_signer()
    return made


def test_an_untouched_signed_trail_verifies(trail: Trail) -> None:
    code, report = trail.verify("--checkpoint", str(trail.anchor))  # type: ignore[attr-defined]
    assert code == 0, report
    assert report["ok"] and report["signed_through"] == report["events"] == 3
    code, out, _ = trail("audit", "verify", "--public-key", str(trail.public))
    assert code == 0 and "audit chain ok: 3 events, signed through seq 3" in out


def test_unsigned_events_after_the_last_checkpoint_are_named(trail: Trail) -> None:
    trail.as_user("carol")
    assert trail("cancel", trail.action_id)[0] == 0  # type: ignore[attr-defined]
    code, report = trail.verify()
    assert code == 0
    assert "1 event(s) after seq 3 are not signed yet" in report["notes"]


def test_a_rewritten_chain_with_recomputed_hashes_fails(trail: Trail) -> None:
    events = trail.rows()
    data = (
        json.loads(events[2]["data"]) if isinstance(events[2]["data"], str) else events[2]["data"]
    )
    events[2]["actor"] = "mallory"
    events[2]["data"] = data
    trail.rewrite(events)
    # the hashes alone are consistent again ...
    code, out, _ = trail("audit", "verify")
    assert "chain broken" not in out
    # ... but no longer what the key holder signed
    code, report = trail.verify()
    assert code == 5
    assert any("does not match the chain" in p for p in report["problems"])


def test_a_cut_tail_with_a_moved_head_fails(trail: Trail) -> None:
    events = trail.rows()
    trail.rewrite(events[:2])
    code, report = trail.verify()
    assert code == 5
    assert any("events were cut or rewritten" in p for p in report["problems"])


def test_a_cut_that_also_deletes_the_checkpoints_is_caught_by_the_anchor(trail: Trail) -> None:
    events = trail.rows()
    trail.rewrite(events[:2])
    with trail.engine.begin() as conn:
        conn.execute(delete(audit_checkpoints))
    code, report = trail.verify()
    assert code == 5 and any("no valid signed checkpoint" in p for p in report["problems"])
    code, report = trail.verify("--checkpoint", str(trail.anchor))  # type: ignore[attr-defined]
    assert code == 5
    assert any("the --checkpoint covers seq 3" in p for p in report["problems"])


def test_deleting_everything_fails(trail: Trail) -> None:
    with trail.engine.begin() as conn:
        conn.execute(delete(audit_events))
        conn.execute(delete(audit_checkpoints))
        conn.execute(update(audit_head).values(seq=0, hash=GENESIS_HASH))
    # even without the key: an action without events is reported
    code, _, err = trail("audit", "verify")
    assert code == 5 and "has no audit events" in err
    code, report = trail.verify("--checkpoint", str(trail.anchor))  # type: ignore[attr-defined]
    assert code == 5 and any("the --checkpoint covers seq 3" in p for p in report["problems"])


def test_an_event_appended_past_the_head_fails(trail: Trail) -> None:
    events = trail.rows()
    last = events[-1]
    forged = {
        **last,
        "seq": last["seq"] + 1,
        "id": "01FORGED000000000000000000",
        "prev_hash": last["hash"],
    }
    data = json.loads(last["data"]) if isinstance(last["data"], str) else last["data"]
    forged["data"] = data
    forged["at"] = datetime.now(UTC)
    forged["hash"] = event_hash(
        seq=forged["seq"], id=forged["id"], at=forged["at"], action_id=forged["action_id"],
        kind=forged["kind"], actor=forged["actor"], from_state=forged["from_state"],
        to_state=forged["to_state"], data=data, prev_hash=forged["prev_hash"],
    )  # fmt: skip
    with trail.engine.begin() as conn:
        conn.execute(insert(audit_events), forged)
    code, out, err = trail("audit", "verify")
    assert code == 5 and "past the chain's head (seq 4)" in err + out


def test_a_forged_approved_state_is_not_explained_by_events(trail: Trail) -> None:
    trail.as_user("alice")
    proposed = trail.json(*SCALE[:3], "checkout-2", *SCALE[4:])
    with trail.engine.begin() as conn:
        conn.execute(
            text("UPDATE actions SET state = 'approved' WHERE id = :id"),
            {"id": proposed["action"]["id"]},
        )
    code, _, err = trail("audit", "verify")
    assert code == 5 and "is approved but its events leave it pending_approval" in err


def test_executing_without_approval_events_is_reported(trail: Trail) -> None:
    from opsgate.audit_signing import verify_trail
    from opsgate.models import ActionState

    store = SqlStore(f"sqlite:///{trail.db}")
    try:
        events = list(store.audit_events())
        action = store.get_action(trail.action_id)  # type: ignore[attr-defined]
        assert action is not None
        # the events as they would look had the approval events been removed and the
        # action claimed: the state is "explained", the approvals are not
        without = [e for e in events if e.kind != "approval.added"]
        running = action.model_copy(update={"state": ActionState.EXECUTING})
        fake = without[-1].model_copy(
            update={
                "seq": 99,
                "from_state": "approved",
                "to_state": "executing",
                "kind": "action.executing",
            }
        )
        report = verify_trail([*without, fake], (99, fake.hash), actions=[running])
        assert any("started executing with 0 approval event(s) of 1" in p for p in report.problems)
    finally:
        store.close()


def test_a_checkpoint_signed_by_another_key_fails(trail: Trail) -> None:
    seq, digest = SqlStore(f"sqlite:///{trail.db}").audit_head()
    other = sign_checkpoint(Ed25519PrivateKey.generate(), seq, digest, datetime.now(UTC))
    with trail.engine.begin() as conn:
        conn.execute(insert(audit_checkpoints), other.model_dump())
    code, report = trail.verify()
    assert code == 5 and any("signature does not verify" in p for p in report["problems"])


def test_a_tampered_anchor_fails(trail: Trail, tmp_path: Path) -> None:
    document = json.loads(trail.anchor.read_text())  # type: ignore[attr-defined]
    document["seq"] = 2
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(document))
    code, report = trail.verify("--checkpoint", str(forged))
    assert code == 5 and any("--checkpoint's signature" in p for p in report["problems"])


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (b"{not json", "--checkpoint"),
        (b"[]", "--checkpoint"),
        (b'{"seq": -1}', "checkpoint.seq"),
        (b'{"seq": 1e400}', "checkpoint.seq"),
        (b'{"seq": true}', "checkpoint.seq"),
        (b'{"seq": 99999999999999999999999}', "checkpoint.seq"),
        (b'{"seq": 1, "hash": "sha256:../../etc"}', "checkpoint.hash"),
        (
            b'{"seq": 1, "hash": "sha256:' + b"0" * 64 + b'", "at": "yesterday"}',
            "checkpoint.at",
        ),
        (
            b'{"seq": 1, "hash": "sha256:' + b"0" * 64 + b'", "at": "2026-01-01T00:00:00"}',
            "checkpoint.at",
        ),
        (
            b'{"seq": 1, "hash": "sha256:' + b"0" * 64 + b'", "at": "2026-01-01T00:00:00Z", '
            b'"signature": "' + b"A" * 500 + b'"}',
            "checkpoint.signature",
        ),
        (b" " * 20000, "--checkpoint"),
        (b"\xff\xfe", "--checkpoint"),
    ],
)
def test_a_malformed_checkpoint_file_is_exit_2_naming_the_field(
    trail: Trail, tmp_path: Path, content: bytes, field: str
) -> None:
    before = trail.rows()
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    code, _, err = trail(
        "audit", "verify", "--public-key", str(trail.public), "--checkpoint", str(bad)
    )
    assert code == 2, err
    assert err.startswith(f"error: {field}") and len(err.strip().splitlines()) == 1
    assert trail.rows() == before


def test_a_checkpoint_without_a_public_key_is_refused(trail: Trail) -> None:
    code, _, err = trail("audit", "verify", "--checkpoint", str(trail.anchor))  # type: ignore[attr-defined]
    assert code == 2 and "--checkpoint" in err


@pytest.mark.parametrize(
    "content",
    [b"not a key", b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", b"x" * 20000],
)
def test_a_bad_public_key_file_is_exit_2(trail: Trail, tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.pub"
    bad.write_bytes(content)
    code, _, err = trail("audit", "verify", "--public-key", str(bad))
    assert code == 2 and err.startswith("error: --public-key")


def test_an_rsa_or_private_key_as_public_key_is_exit_2(trail: Trail, tmp_path: Path) -> None:
    code, _, err = trail("audit", "verify", "--public-key", str(trail.private))
    assert code == 2 and "--public-key" in err


def test_checkpoint_needs_the_key_and_keygen_never_overwrites(trail: Trail) -> None:
    code, _, err = trail("audit", "checkpoint")
    assert code == 2 and "OPSGATE_AUDIT_KEY is not set" in err
    before = trail.private.read_bytes()
    code, _, err = trail(
        "audit", "keygen", "--private-key", str(trail.private), "--public-key", "/tmp/x.pub"
    )
    assert code == 2 and "exists already" in err
    assert trail.private.read_bytes() == before
    trail.monkeypatch.setenv("OPSGATE_AUDIT_KEY", str(trail.public))  # not a private key
    code, _, err = trail("audit", "checkpoint")
    assert code == 2 and "OPSGATE_AUDIT_KEY" in err


def test_checkpoints_round_trip_through_every_store(tmp_path: Path) -> None:
    from opsgate.testing import MemoryStore

    key = Ed25519PrivateKey.generate()
    for store in (MemoryStore(), SqlStore(f"sqlite:///{tmp_path / 's.db'}")):
        store.migrate()
        made = sign_checkpoint(key, 0, GENESIS_HASH, datetime.now(UTC))
        store.insert_audit_checkpoint(made)
        assert store.audit_checkpoints() == [made]
        assert isinstance(store.audit_checkpoints()[0], AuditCheckpoint)
        store.close()


def test_a_worker_holding_the_key_signs_the_head_as_it_moves(trail: Trail) -> None:
    trail.as_user("carol")
    assert trail("cancel", trail.action_id)[0] == 0  # type: ignore[attr-defined]
    trail.as_signer()
    # Nothing is approved, so nothing is measured: a closed port will do.
    trail.monkeypatch.setenv("OPSGATE_PROMETHEUS_URL", "http://127.0.0.1:9")
    code, _, err = trail("worker", "--once")
    assert code == 0, err
    trail.not_signer()
    code, report = trail.verify()
    # Four events of the action, then the worker's own `worker.registered`.
    assert code == 0 and report["signed_through"] == 5 and report["notes"] == []


def test_a_row_past_the_head_stops_appends_with_a_message_that_says_why(trail: Trail) -> None:
    events = trail.rows()
    forged = {**events[-1], "seq": events[-1]["seq"] + 1, "id": "01FORGED000000000000000001"}
    forged["data"] = (
        json.loads(forged["data"]) if isinstance(forged["data"], str) else forged["data"]
    )
    forged["at"] = datetime.now(UTC)
    with trail.engine.begin() as conn:
        conn.execute(insert(audit_events), forged)
    before = trail.rows()
    trail.as_user("carol")
    code, _, err = trail("cancel", trail.action_id)  # type: ignore[attr-defined]
    assert code != 0
    assert "already exists though the chain's head is at seq 3" in err
    assert "written outside opsgate" in err and len(err.strip().splitlines()) == 1
    assert trail.rows() == before  # nothing half-written
