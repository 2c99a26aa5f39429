"""The PolicyEngine protocol and the fail-closed rules every engine obeys."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

UNAVAILABLE = "policy_engine_unavailable"
# In the deny message of every decision cut at its time budget; the metrics count it.
DEADLINE_EXCEEDED = "exceeded its deadline"
DECISION_RULE = "opsgate/decision"
APPROVAL_RULE = "opsgate/approval"
AUTHZ_RULE = "opsgate/authz"  # may this principal perform this verb at all?


@dataclass(frozen=True)
class PolicyResult:
    """What an engine answered; `allow` is true only for a well-formed allow."""

    allow: bool
    deny: tuple[dict[str, str], ...] = ()
    required_approvals: int = 1
    approver_roles: tuple[str, ...] = ()
    raw: Mapping[str, Any] | None = None
    revision: str = ""
    error: str | None = None

    @property
    def deny_codes(self) -> list[str]:
        return [d["code"] for d in self.deny]


class PolicyEngine(Protocol):
    """Evaluates the opsgate rules; never raises, never allows on doubt."""

    name: str

    def evaluate(self, rule: str, input: Mapping[str, Any]) -> PolicyResult:
        """Evaluate `opsgate/decision` or `opsgate/approval` for this input."""

    def revision(self) -> str:
        """The bundle revision the next evaluation will use."""


def unavailable(reason: str, revision: str = "") -> PolicyResult:
    return PolicyResult(
        allow=False,
        deny=({"code": UNAVAILABLE, "message": f"policy engine unavailable: {reason}"},),
        revision=revision,
        error=reason,
    )


def interpret(raw: Any, revision: str) -> PolicyResult:
    """Turn an engine's raw answer into a PolicyResult, failing closed on any doubt."""
    if raw is None:
        return unavailable("the decision is undefined", revision)
    if not isinstance(raw, Mapping):
        return unavailable("the decision is not an object", revision)
    deny_raw = raw.get("deny", [])
    if not isinstance(deny_raw, list):
        return unavailable("deny is not a list", revision)
    deny: list[dict[str, str]] = []
    for item in deny_raw:
        if isinstance(item, Mapping) and isinstance(item.get("code"), str):
            deny.append({"code": item["code"], "message": str(item.get("message", ""))})
        else:
            return unavailable("a deny entry has no code", revision)
    deny.sort(key=lambda d: (d["code"], d["message"]))
    required = raw.get("required_approvals", 1)
    if isinstance(required, bool) or not isinstance(required, int) or required < 1:
        return unavailable("required_approvals is not a positive integer", revision)
    roles = raw.get("approver_roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        return unavailable("approver_roles is not a list of strings", revision)
    # Only an explicit boolean true with no deny reasons allows.
    allowed = raw.get("allow") is True and not deny
    if raw.get("allow") is not True and not deny:
        deny.append({"code": UNAVAILABLE, "message": "policy did not return allow: true"})
    return PolicyResult(
        allow=allowed,
        deny=tuple(deny),
        required_approvals=required,
        approver_roles=tuple(roles),
        raw=dict(raw),
        revision=revision,
    )


def bundle_files(directory: Path) -> list[Path]:
    """Policy and data files of a bundle, test files excluded, in a stable order."""
    files = [
        p
        for p in directory.rglob("*")
        if p.is_file()
        and (p.suffix == ".rego" or p.suffix == ".json")
        and not p.name.endswith("_test.rego")
    ]
    return sorted(files, key=lambda p: p.relative_to(directory).as_posix())


def bundle_revision(directory: Path) -> str:
    """A hash of the bundle's files: names and contents."""
    digest = hashlib.sha256()
    for path in bundle_files(directory):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return "sha256:" + digest.hexdigest()


def load_bundle_data(directory: Path) -> dict[str, Any]:
    """Merge the bundle's JSON files into one data document, by directory."""
    data: dict[str, Any] = {}
    for path in bundle_files(directory):
        if path.suffix != ".json":
            continue
        document = json.loads(path.read_text(encoding="utf-8"))
        node = data
        for part in path.relative_to(directory).parent.parts:
            node = node.setdefault(part, {})
        if not isinstance(document, dict):
            raise ValueError(f"{path}: bundle data must be a JSON object")
        node.update(document)
    return data


def bundle_environments(policies: Path) -> frozenset[str] | None:
    """Environments the bundle's data names (allowlist, propose_roles, approver_roles
    keys), or None when it names none or cannot be read: then policy alone decides (and
    fails closed on unreadable data)."""
    try:
        data = load_bundle_data(policies)
    except (OSError, ValueError):
        return None
    names: set[str] = set()
    for table in ("allowlist", "propose_roles", "approver_roles"):
        entries = data.get(table)
        if isinstance(entries, dict):
            names.update(str(k) for k in entries if k != "default")
    return frozenset(names) or None


def bundle_freeze_windows(policies: Path) -> list[Any]:
    """The bundle's freeze windows; unreadable data freezes everything."""
    try:
        windows = load_bundle_data(policies).get("freeze_windows", [])
    except (OSError, ValueError) as exc:
        # Unreadable freeze data must not read as "no freeze": fail closed.
        return [
            {
                "name": f"unreadable freeze data: {exc}",
                "start": "0001-01-01T00:00:00+00:00",
                "end": "9999-12-31T23:59:59+00:00",
                "environments": ["*"],
            }
        ]
    return list(windows) if isinstance(windows, list) else []
