"""Reads across actions through the API: reports, the audit trail, the workers list, the
approval queue of one approver, and short action ids.

Each is the local command's own code run on the server; the bundle's `authz` decides who
may read (`report` for what spans every action, `read` per action).
"""

from __future__ import annotations

import io
import json
import urllib.parse
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from opsgate.app import App
from opsgate.audit_signing import parse_checkpoint
from opsgate.auth.principal import Principal
from opsgate.errors import ConfigError, InvalidInput, NotFound
from opsgate.ids import normalize
from opsgate.models import ActionState

MAX_PARAM = 256
MAX_WHERE = 16
MAX_PUBLIC_KEY = 16_384
CANDIDATES = 6  # prefix matches read to tell one from ambiguous
# Errors name the command's option, as `build_report` does, so a client's one-line error
# reads exactly as in local mode.
FIELDS = {
    "since": "--since",
    "until": "--until",
    "by": "--by",
    "where": "--where",
    "table": "--table",
    "min_runs": "--min-runs",
    "format": "--format",
    "all": "--all",
    "mine_to_approve": "--mine-to-approve",
    "prefix": "action_id",
    "proposer_kind": "--kind",
}


def field(name: str) -> str:
    return FIELDS.get(name, name)


def query_params(query: str) -> dict[str, list[str]]:
    """The query string as lists of values; every value one printable line of at most
    MAX_PARAM characters, so nothing odd reaches a parser or a log."""
    if len(query) > 4096:
        raise InvalidInput("query", "longer than 4096 characters")
    try:
        parsed = urllib.parse.parse_qs(
            query, keep_blank_values=True, strict_parsing=False, max_num_fields=64
        )
    except ValueError as exc:
        raise InvalidInput("query", str(exc)) from None
    for name, values in parsed.items():
        for value in values:
            if len(value) > MAX_PARAM:
                raise InvalidInput(field(name), f"longer than {MAX_PARAM} characters")
            if not value.isprintable():
                raise InvalidInput(field(name), "control characters are not allowed")
    return parsed


def one(params: dict[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise InvalidInput(field(name), "given more than once")
    return values[0]


def flag(params: dict[str, list[str]], name: str) -> bool:
    value = one(params, name)
    if value is None:
        return False
    if value not in ("0", "1", "true", "false"):
        raise InvalidInput(field(name), "expected 1 or 0")
    return value in ("1", "true")


def public_key(text: Any) -> Ed25519PublicKey:
    if not isinstance(text, str) or len(text) > MAX_PUBLIC_KEY:
        raise InvalidInput("--public-key", f"expected a PEM text of at most {MAX_PUBLIC_KEY}")
    try:
        key = serialization.load_pem_public_key(text.encode("utf-8"))
    except (ValueError, UnsupportedAlgorithm, UnicodeEncodeError):
        raise InvalidInput("--public-key", "not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidInput("--public-key", "not an Ed25519 public key")
    return key


class Reads:
    """The read endpoints' bodies, over the server's App (in a worker thread)."""

    def __init__(self, app: App) -> None:
        self.app = app

    def _reader_of_everything(self, principal: Principal) -> None:
        # Refused: stored like every refusal, and 403 with its deny codes.
        self.app.gate.authorize("report", principal)

    def report(self, principal: Principal, kind: str, query: str) -> dict[str, Any]:
        from opsgate.reports.render import FORMATS, print_table, render
        from opsgate.reports.request import ReportRequest, build_report
        from opsgate.store.sql import SqlStore

        params = query_params(query)
        fmt = one(params, "format") or "table"
        if fmt not in FORMATS:
            raise InvalidInput("--format", f"expected one of {', '.join(FORMATS)}")
        where = tuple(params.get("where", []))
        if len(where) > MAX_WHERE:
            raise InvalidInput("--where", f"more than {MAX_WHERE}")
        min_runs_text = one(params, "min_runs")
        if min_runs_text is not None and not min_runs_text.isdigit():
            raise InvalidInput("--min-runs", "expected 1 to 1000000")
        request = ReportRequest(
            kind=kind,
            since=one(params, "since"),
            until=one(params, "until"),
            by=one(params, "by"),
            where=where,
            min_runs=int(min_runs_text) if min_runs_text is not None else ReportRequest.min_runs,
            table=one(params, "table"),
            proposer_kind=one(params, "proposer_kind"),
        )
        store = self.app.store
        if not isinstance(store, SqlStore):
            raise ConfigError("reports need a SQL store (sqlite:// or postgresql://)")
        # Authorized before the request is judged: an unauthorized caller learns nothing,
        # not even which segment values exist.
        self._reader_of_everything(principal)
        gate = self.app.gate if request.kind == "proposers" else None
        built = build_report(store, request, datetime.now(UTC), gate=gate)
        if fmt == "table":
            from rich.console import Console

            out = io.StringIO()
            # What `opsgate report` prints when piped: plain text, 200 columns.
            print_table(built, Console(file=out, highlight=False, width=200, color_system=None))
            text = out.getvalue()
        else:
            text = render(built, fmt, request.table)
        return {"format": fmt, "text": text}

    def audit_verify(self, principal: Principal, body: Any) -> dict[str, Any]:
        from opsgate.audit_documents import verify_document

        if not isinstance(body, dict):
            raise InvalidInput("body", "expected a JSON object")
        unknown = sorted(set(body) - {"public_key", "checkpoint"})
        if unknown:
            raise InvalidInput(unknown[0], "unknown field")
        key = public_key(body["public_key"]) if body.get("public_key") is not None else None
        anchor = parse_checkpoint(body["checkpoint"]) if body.get("checkpoint") else None
        if anchor is not None and key is None:
            raise InvalidInput("--checkpoint", "needs --public-key to check its signature")
        self._reader_of_everything(principal)
        return verify_document(self.app.store, key, anchor)

    def audit_decisions(self, principal: Principal, query: str) -> list[dict[str, Any]]:
        from opsgate.audit_documents import decision_documents

        params = query_params(query)
        fmt = one(params, "format") or "opa-jsonl"
        since = one(params, "since") or "30d"
        until = one(params, "until")
        self._reader_of_everything(principal)
        documents = decision_documents(self.app.store, fmt, since, until, datetime.now(UTC))
        # Through JSON once here, so what is sent is exactly what a local run prints.
        return [json.loads(json.dumps(d, default=str)) for d in documents]

    def workers(self, principal: Principal, query: str) -> dict[str, Any]:
        from opsgate.views import worker_rows

        show_all = flag(query_params(query), "all")
        self._reader_of_everything(principal)
        lease = self.app.settings.lease
        rows = worker_rows(self.app.store, lease, show_all, datetime.now(UTC))
        return {"lease": lease, "workers": rows}

    def resolve(self, principal: Principal, query: str) -> dict[str, Any]:
        """The one action this principal may read whose id starts with the prefix.

        Actions it may not read do not exist for it here, as in `show`: a prefix never
        tells an agent that somebody else's action is there."""
        prefix = normalize(one(query_params(query), "prefix") or "", "action_id")
        store = self.app.store
        matches = store.action_ids_with_prefix(prefix, CANDIDATES)
        readable: list[str] = []
        for action_id in matches:
            action = store.get_action(action_id)
            if (
                action is not None
                and self.app.gate.authz(principal, "read", action=action).result.allow
            ):
                readable.append(action_id)
        if not readable:
            raise NotFound(f"no action {prefix}; list them with `opsgate list`")
        if len(readable) > 1:
            listed = ", ".join(readable[: CANDIDATES - 1])
            more = ", ..." if len(readable) >= CANDIDATES else ""
            raise InvalidInput(
                "action_id",
                f"{prefix} is ambiguous: it matches {listed}{more}; give more characters",
            )
        return {"id": readable[0]}

    def mine_to_approve(self, principal: Principal) -> list[Any]:
        """Pending actions this principal could approve now (what `approve` would count)."""
        gate = self.app.gate
        now = datetime.now(UTC)
        found = []
        for action in gate.queue(principal):
            if action.state is not ActionState.PENDING_APPROVAL:
                continue
            if principal.kind != "human" or principal.id == action.proposer.id:
                continue
            counted = {
                a.approver.id
                for a in self.app.store.approvals_for(action.id)
                if a.spec_hash == action.spec_hash
            }
            if principal.id in counted:
                continue
            if gate.authz(principal, "approve", action=action).result.allow and (
                gate.approval_evaluation(action, principal.identity, now).result.allow
            ):
                found.append(action)
        return found
