"""The `authz` policy contract: may this principal perform this verb on this action?

Asked of the same bundle and engine as `decision` and `approval`, before every verb.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from opsgate.auth.principal import Principal
from opsgate.models import Action, Identity
from opsgate.policies.engine import AUTHZ_RULE
from opsgate.policies.input import rfc3339

if TYPE_CHECKING:  # a type only: `queue` must not load the catalog and YAML for it
    from opsgate.proposals import ValidatedProposal

__all__ = ["AUTHZ_RULE", "VERBS", "Actor", "Verb", "as_principal", "authz_input"]
# `report`: a read across every action (reports, audit trail, workers), asked without one.
# `trust_reset`: clears a proposer's track record for a kind (`opsgate trust reset`).
Verb = Literal[
    "propose", "approve", "reject", "cancel", "run", "rollback", "read", "report", "trust_reset"
]
VERBS: frozenset[str] = frozenset(
    {"propose", "approve", "reject", "cancel", "run", "rollback", "read", "report", "trust_reset"}
)

Actor = Identity | Principal


def as_principal(actor: Actor) -> Principal:
    """A bare Identity is the local single-user mode: no credential, no groups."""
    if isinstance(actor, Principal):
        return actor
    return Principal(id=actor.id, kind=actor.kind, groups=(), method="local")


def authz_input(
    verb: Verb,
    principal: Principal,
    now: datetime,
    *,
    action: Action | None = None,
    spec: ValidatedProposal | None = None,
) -> dict[str, Any]:
    """The input document for `data.opsgate.authz`."""
    if action is not None:
        subject: dict[str, Any] = {
            "id": action.id,
            "type": action.action_type,
            "target": action.target,
            "environment": action.environment,
            "state": action.state.value,
            "risk": action.risk,
            "reversible": action.reversible,
        }
        proposer = {"id": action.proposer.id, "kind": action.proposer.kind}
    elif spec is not None:
        subject = {
            "id": "",
            "type": spec.action_type.name,
            "target": spec.proposal.target,
            "environment": spec.proposal.environment,
            "state": "proposed",
            "risk": spec.action_type.risk,
            "reversible": spec.action_type.reversible,
        }
        proposer = {"id": principal.id, "kind": principal.kind}
    else:
        subject, proposer = {}, {}
    return {
        "verb": verb,
        "principal": {
            "id": principal.id,
            "kind": principal.kind,
            "groups": list(principal.groups),
            "method": principal.method,
        },
        "action": subject,
        "proposer": proposer,
        "context": {"now": rfc3339(now)},
    }
