"""Signed checkpoints of the audit chain, and the full check of the trail.

The hash chain alone proves nothing against someone who can write the tables: they can
recompute every hash and the head. So the worker/server tier, which alone holds an
Ed25519 private key (`OPSGATE_AUDIT_KEY`), signs the chain's head (seq, hash, time) as it
moves. Because each event's hash covers its predecessor's, a signature over the head
covers every event up to it. `opsgate audit verify --public-key` then needs only the
public key: a rewritten event no longer matches a signed hash, a cut tail falls short of
a signed seq. A checkpoint printed by `opsgate audit checkpoint` and kept outside the
database (a ticket, a log pipeline, a git repository) also proves that checkpoints
themselves were not deleted: `audit verify --checkpoint FILE`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from opsgate.audit import GENESIS_HASH, canonical_json, verify_chain
from opsgate.errors import ConfigError, InvalidInput
from opsgate.models import Action, ActionState, AuditCheckpoint, AuditEvent

MAX_KEY_FILE = 16 * 1024
MAX_CHECKPOINT_FILE = 16 * 1024
MAX_SEQ = 2**63 - 1
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
# States an action reaches only through `executing`: it ran, so it must have been approved.
_RAN = {
    ActionState.EXECUTING,
    ActionState.VERIFYING,
    ActionState.SUCCEEDED,
    ActionState.ROLLING_BACK,
    ActionState.ROLLED_BACK,
    ActionState.ROLLBACK_FAILED,
    ActionState.FAILED,
}


def _utc_text(at: datetime) -> str:
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def checkpoint_payload(seq: int, digest: str, at: datetime) -> bytes:
    """The exact bytes signed: versioned, so a signature cannot be reused for another use."""
    document = {"v": 1, "kind": "opsgate.audit.checkpoint", "seq": seq, "hash": digest}
    document["at"] = _utc_text(at)
    return canonical_json(document).encode("utf-8")


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


# --- keys --------------------------------------------------------------------------------


def generate_keypair(private_path: Path, public_path: Path) -> str:
    """Write a new key pair; never overwrite one (a lost private key is a lost trail)."""
    for path in (private_path, public_path):
        if path.exists():
            raise InvalidInput(str(path), "exists already; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # O_EXCL: created by us, readable by the owner only, from the first byte on.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(private_pem)
    public_path.write_bytes(public_pem)
    return key_id(key.public_key())


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise InvalidInput(what, f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_KEY_FILE:
        raise InvalidInput(what, f"{path} is larger than {MAX_KEY_FILE} bytes; not a key")
    return data


def load_private_key(path: Path) -> Ed25519PrivateKey:
    data = _read_key_file(path, "OPSGATE_AUDIT_KEY")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"OPSGATE_AUDIT_KEY: {path} is not an unencrypted PEM private key"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"OPSGATE_AUDIT_KEY: {path} is not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    data = _read_key_file(path, "--public-key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidInput("--public-key", f"{path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidInput("--public-key", f"{path} is not an Ed25519 public key")
    return key


# --- checkpoints -------------------------------------------------------------------------


def sign_checkpoint(key: Ed25519PrivateKey, seq: int, digest: str, at: datetime) -> AuditCheckpoint:
    signature = key.sign(checkpoint_payload(seq, digest, at))
    return AuditCheckpoint(
        seq=seq,
        hash=digest,
        at=at,
        key_id=key_id(key.public_key()),
        signature=base64.b64encode(signature).decode("ascii"),
    )


def signature_ok(checkpoint: AuditCheckpoint, public: Ed25519PublicKey) -> bool:
    try:
        signature = base64.b64decode(checkpoint.signature, validate=True)
        public.verify(signature, checkpoint_payload(checkpoint.seq, checkpoint.hash, checkpoint.at))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def checkpoint_json(checkpoint: AuditCheckpoint) -> dict[str, Any]:
    return {
        "seq": checkpoint.seq,
        "hash": checkpoint.hash,
        "at": _utc_text(checkpoint.at),
        "key_id": checkpoint.key_id,
        "signature": checkpoint.signature,
    }


def read_checkpoint_file(path: Path) -> AuditCheckpoint:
    """A checkpoint kept outside the database; any malformation names its field."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CHECKPOINT_FILE + 1)
    except OSError as exc:
        raise InvalidInput("--checkpoint", f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_CHECKPOINT_FILE:
        raise InvalidInput("--checkpoint", f"larger than {MAX_CHECKPOINT_FILE} bytes")
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidInput("--checkpoint", f"{path} is not a JSON document") from None
    return parse_checkpoint(document)


def parse_checkpoint(document: Any) -> AuditCheckpoint:
    if not isinstance(document, Mapping):
        raise InvalidInput("--checkpoint", "expected a JSON object")
    seq = document.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_SEQ:
        raise InvalidInput("checkpoint.seq", f"expected an integer from 0 to {MAX_SEQ}")
    digest = document.get("hash")
    if not isinstance(digest, str) or not (_HASH.match(digest) or digest == GENESIS_HASH):
        raise InvalidInput("checkpoint.hash", "expected sha256: and 64 hex digits")
    at_text = document.get("at")
    try:
        if not isinstance(at_text, str) or len(at_text) > 40:
            raise ValueError
        at = datetime.fromisoformat(at_text.replace("Z", "+00:00"))
        if at.tzinfo is None:
            raise ValueError
    except ValueError:
        raise InvalidInput("checkpoint.at", "expected an ISO 8601 time with a zone") from None
    signature = document.get("signature")
    if not isinstance(signature, str) or len(signature) > 200:
        raise InvalidInput("checkpoint.signature", "expected a base64 Ed25519 signature")
    kid = document.get("key_id", "")
    if not isinstance(kid, str) or len(kid) > 100:
        raise InvalidInput("checkpoint.key_id", "expected a short string")
    return AuditCheckpoint(seq=seq, hash=digest, at=at, key_id=kid, signature=signature)


class Checkpointer:
    """Signs the head whenever it has moved since the last signature (worker, run)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key
        self._last: tuple[int, str] | None = None

    def sign_head(self, store: Any, now: datetime) -> AuditCheckpoint:
        seq, digest = store.audit_head()
        checkpoint = sign_checkpoint(self.key, seq, digest, now)
        store.insert_audit_checkpoint(checkpoint)
        self._last = (seq, digest)
        return checkpoint

    def maybe_sign(self, store: Any, now: datetime) -> AuditCheckpoint | None:
        if store.audit_head() == self._last:
            return None
        return self.sign_head(store, now)


# --- the whole check ---------------------------------------------------------------------


@dataclass
class TrailReport:
    events: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    signed_through: int | None = None  # the highest seq a valid signature covers

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_trail(
    events: Sequence[AuditEvent],
    head: tuple[int, str],
    *,
    actions: Iterable[Action] = (),
    checkpoints: Sequence[AuditCheckpoint] = (),
    public_key: Ed25519PublicKey | None = None,
    anchor: AuditCheckpoint | None = None,
) -> TrailReport:
    """The chain, every event past its head, the signed checkpoints, the anchor, and
    whether the actions' states are explained by their events.

    `events` must be read *before* `head`: an append writes its event and moves the head
    in one transaction, so any event past a head read afterwards was not appended by
    opsgate.
    """
    report = TrailReport()
    chained = [e for e in events if e.seq <= head[0]]
    past = [e for e in events if e.seq > head[0]]
    chain = verify_chain(chained, head)
    report.events = len(events)
    if not chain.ok:
        report.problems.append(
            f"chain broken at event seq {chain.first_bad_seq} (id {chain.first_bad_id}): "
            f"{chain.problem}"
        )
    if past:
        seqs = ", ".join(str(e.seq) for e in past[:5]) + (" …" if len(past) > 5 else "")
        report.problems.append(
            f"{len(past)} event(s) past the chain's head (seq {seqs}): written outside opsgate"
        )
    hashes = {0: GENESIS_HASH, **{e.seq: e.hash for e in chained}}
    end = head[0] if chain.ok else (chain.first_bad_seq or 1) - 1

    def matches(checkpoint: AuditCheckpoint, what: str) -> bool:
        if checkpoint.seq > end:
            report.problems.append(
                f"{what} covers seq {checkpoint.seq} but the intact chain ends at seq {end}: "
                "events were cut or rewritten"
            )
            return False
        if hashes.get(checkpoint.seq) != checkpoint.hash:
            report.problems.append(
                f"{what} at seq {checkpoint.seq} does not match the chain: events up to it "
                "were rewritten"
            )
            return False
        return True

    for checkpoint in checkpoints:
        what = f"signed checkpoint of {_utc_text(checkpoint.at)}"
        if public_key is not None and not signature_ok(checkpoint, public_key):
            report.problems.append(f"{what} (seq {checkpoint.seq}): signature does not verify")
            continue
        if matches(checkpoint, what) and public_key is not None:
            report.signed_through = max(report.signed_through or 0, checkpoint.seq)
    if anchor is not None:
        if public_key is None:
            raise InvalidInput("--checkpoint", "needs --public-key to check its signature")
        if not signature_ok(anchor, public_key):
            report.problems.append("the --checkpoint's signature does not verify with this key")
        elif matches(anchor, "the --checkpoint"):
            report.signed_through = max(report.signed_through or 0, anchor.seq)
    if public_key is not None:
        if head[0] > 0 and report.signed_through is None:
            report.problems.append(
                "no valid signed checkpoint: nothing proves opsgate wrote this chain"
            )
        elif report.signed_through is not None and report.signed_through < head[0]:
            report.notes.append(
                f"{head[0] - report.signed_through} event(s) after seq "
                f"{report.signed_through} are not signed yet"
            )
    else:
        report.notes.append("signatures not checked (no --public-key)")
    report.problems.extend(_consistency(chained, actions))
    return report


def _consistency(events: Sequence[AuditEvent], actions: Iterable[Action]) -> list[str]:
    """Is every action's state explained by its transition events?"""
    by_action: dict[str, list[AuditEvent]] = {}
    for event in events:
        if event.action_id is not None:
            by_action.setdefault(event.action_id, []).append(event)
    problems: list[str] = []
    known: set[str] = set()
    for action in actions:
        known.add(action.id)
        mine = by_action.get(action.id, [])
        if not mine:
            problems.append(f"action {action.id} ({action.state.value}) has no audit events")
            continue
        state = "proposed"
        approvers: set[str] = set()
        required = action.required_approvals
        ran = False
        for event in mine:
            if event.kind == "approval.added":
                approvers.add(event.actor)
                if isinstance(event.data.get("required"), int):
                    required = max(required, event.data["required"])
            if event.to_state is None:
                continue
            if event.from_state != state:
                problems.append(
                    f"action {action.id}: event seq {event.seq} moves it from "
                    f"{event.from_state} but its events had left it {state}"
                )
            state = event.to_state
            if state == ActionState.EXECUTING.value and not ran:
                ran = True
                if len(approvers) < required:
                    problems.append(
                        f"action {action.id} started executing with {len(approvers)} "
                        f"approval event(s) of {required} required"
                    )
        if state != action.state.value:
            problems.append(
                f"action {action.id} is {action.state.value} but its events leave it {state}"
            )
        elif action.state in _RAN and not ran:
            problems.append(f"action {action.id} is {action.state.value} without executing")
    for action_id in by_action.keys() - known:
        problems.append(f"events refer to action {action_id}, which is not stored")
    return problems
