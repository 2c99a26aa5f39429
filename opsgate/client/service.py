"""The seam the CLI's action commands call: the local Gate, or the API through a client."""

from __future__ import annotations

from typing import Any, Protocol

from opsgate.gate import ActionDetails, ApproveOutcome, ProposeOutcome
from opsgate.models import Action, Identity


class ActionService(Protocol):
    """What `propose`, `queue`, `show`, `approve`, `reject` and `cancel` need.

    `Gate` is the local implementation; `RemoteGate` sends each call to the server,
    which decides who acts from its credential (the identity argument is not sent).
    """

    def propose(self, document: Any, proposer: Identity) -> ProposeOutcome: ...

    def queue(self) -> list[Action]: ...

    def expire_due(self) -> list[Action]: ...

    def details(self, action_id: str) -> ActionDetails: ...

    def approve(self, action_id: str, approver: Identity, comment: str = "") -> ApproveOutcome: ...

    def reject(self, action_id: str, actor: Identity, reason: str) -> Action: ...

    def cancel(self, action_id: str, actor: Identity, reason: str = "") -> Action: ...
