"""Audit documents shared by `opsgate audit` and the API: the verify result and the
decision log, built by the same code locally and on the server."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from opsgate.audit import verify_chain
from opsgate.audit_signing import verify_trail
from opsgate.errors import InvalidInput
from opsgate.models import AuditCheckpoint, AuditEvent

ALL_ACTIONS = 2**62  # `list_actions` pages nothing; the check needs every action


def read_trail(store: Any) -> tuple[list[AuditEvent], tuple[int, str]]:
    """Events, then the head: an event past a head read afterwards was not appended by
    opsgate (which moves the head in the event's transaction). A head ahead of the events
    is an append in between: read again."""
    for _ in range(5):
        events = list(store.audit_events())
        head = store.audit_head()
        if head[0] <= (events[-1].seq if events else 0):
            break
    return events, head


def verify_document(
    store: Any, public_key: Ed25519PublicKey | None, anchor: AuditCheckpoint | None
) -> dict[str, Any]:
    """`audit verify --json`: the same document locally and from the server."""
    events, head = read_trail(store)
    report = verify_trail(
        events,
        head,
        actions=store.list_actions(limit=ALL_ACTIONS),
        checkpoints=store.audit_checkpoints(),
        public_key=public_key,
        anchor=anchor,
    )
    chain = verify_chain([e for e in events if e.seq <= head[0]], head)
    return {
        "ok": report.ok,
        "events": report.events,
        "chain_ok": chain.ok,
        "first_bad_seq": chain.first_bad_seq,
        "first_bad_id": chain.first_bad_id,
        "chain_problem": chain.problem,
        "problem": chain.problem or (report.problems[0] if report.problems else None),
        "problems": report.problems,
        "notes": report.notes,
        "signed_through": report.signed_through,
    }


DECISION_FORMATS = ("opa-jsonl", "jsonl")


def decision_documents(
    store: Any, fmt: str, since: str, until: str | None, now: datetime
) -> Iterator[dict[str, Any]]:
    """The decisions in the window as `audit decisions` prints them; InvalidInput naming
    the option for a bad window or format."""
    from opsgate import __version__
    from opsgate.policies.decision_log import opa_decision_log
    from opsgate.reports.request import parse_moment
    from opsgate.views import decision_json

    if fmt not in DECISION_FORMATS:
        raise InvalidInput("--format", f"expected one of {', '.join(DECISION_FORMATS)}")
    start = parse_moment(since, "--since", now)
    end = parse_moment(until, "--until", now) if until else now
    phases = ["propose", "execute", "approval"]
    for decision in store.decisions_between(start, end, phases):
        if fmt == "opa-jsonl":
            yield opa_decision_log(decision, app_version=__version__)
        else:
            yield decision_json(decision)
