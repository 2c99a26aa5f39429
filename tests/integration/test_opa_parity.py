"""Same answers from both engines: the default bundle, embedded (regopy) versus OPA (push).

The corpus covers every deny code of the default bundle, allowed proposals and the
approval rule. It runs against a real OPA when one is available (OPSGATE_TEST_OPA_URL or
`opa` on PATH) and against the OPA wire-protocol test double otherwise (tests/opa_double.py),
which still exercises the HTTP path, opa-python-client and the push of policies and data.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from opsgate.catalog import load_catalog
from opsgate.models import ActionType, Identity, Incident, Signal, StopCondition, VerificationSpec
from opsgate.policies.embedded import EmbeddedEngine
from opsgate.policies.engine import (
    APPROVAL_RULE,
    DECISION_RULE,
    UNAVAILABLE,
    PolicyResult,
    bundle_revision,
)
from opsgate.policies.input import build_input
from opsgate.policies.opa import OpaEngine
from opsgate.preconditions import PreconditionResult
from opsgate.proposals import spec_hash
from tests.opa_double import OpaTarget, opa_target

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"
CATALOG = load_catalog(ROOT / "catalog")
NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)

DENY_CODES = {
    "not_allowlisted",
    "param_out_of_bounds",
    "missing_precondition",
    "insufficient_permissions",
    "verification_undefined",
    "change_freeze",
    "concurrent_action",
    "verification_weakened",
    "track_record_unavailable",
    "trust_revoked",
}
APPROVAL_CODES = {"insufficient_permissions", "self_approval"}

ALICE = Identity(id="alice", kind="human")
BOB = Identity(id="bob", kind="human")
CAROL = Identity(id="carol", kind="human")
DAVE = Identity(id="dave", kind="human")
AGENT = Identity(id="sre-agent", kind="agent")

VERIFIED = VerificationSpec(
    signals=(Signal(name="error_rate", query="up", **{"pass": {"max": 0.01}}),),
    stop_conditions=(StopCondition(name="error_spike", query="up", halt={"min": 0.2}),),
)
SIGNALS_ONLY = VerificationSpec(signals=VERIFIED.signals)

# A freeze window for prod over NOW, sev1 exempt; a second bundle carries it.
FREEZE = {
    "name": "black-friday",
    "start": "2026-11-20T00:00:00+00:00",
    "end": "2026-11-30T00:00:00+00:00",
    "environments": ["prod"],
    "exempt_severities": ["sev1"],
}


def record(passes: int, last_run: dict[str, Any] | None = None) -> dict[str, Any]:
    """A track record (input.proposer.track_record) with `passes` verified passes of
    every run, in every scope."""
    figures = {
        "proposals": passes, "blocked": 0, "blocked_by_code": {}, "approved": passes,
        "rejected": 0, "executed": passes, "finished": passes, "verified_passes": passes,
        "failed_verifications": 0, "stop_conditions": 0, "automatic_rollbacks": 0,
        "rollbacks_failed": 0, "pass_rate": 1.0 if passes else None,
        "seconds_since_last_failure": None, "last_run": last_run,
    }  # fmt: skip
    return {
        "window_days": 90,
        "since": "2026-08-25T10:00:00.000000+00:00",
        "overall": figures,
        "action_type": figures,
        "action_type_in_environment": figures,
        "trust_reset_at": None,
        "trust_reset_ns": None,
    }


SEASONED = record(10)
ROLLED_BACK = record(
    10,
    {
        "finished_at": "2026-11-22T10:00:00.000000+00:00",
        "finished_ns": 1795341600000000000,
        "failed_or_rolled_back": True,
        "rolled_back": True,
        "rollback_failed": False,
    },
)


def precondition(name: str, ok: bool, value: Any = None, **kwargs: Any) -> PreconditionResult:
    return PreconditionResult(name=name, ok=ok, value=value, **kwargs)


@dataclass
class Case:
    """One proposal (and optionally one approver) for both engines."""

    name: str
    action: str = "scale_deployment"
    params: dict[str, Any] = field(default_factory=lambda: {"deployment": "checkout"})
    replicas: int | str | None = 12
    environment: str = "prod"
    target: str = "checkout"
    proposer: Identity = ALICE
    severity: str = "sev2"
    tier: str = "standard"
    verification: VerificationSpec = VERIFIED
    preconditions: tuple[PreconditionResult, ...] = (precondition("current_replicas", True, 10),)
    active_on_target: int = 0
    phase: str = "propose"
    risk: str | None = None
    irreversible: bool = False
    approver: Identity | None = None
    bundle: str = "default"
    patch: Callable[[dict[str, Any]], None] | None = None
    expect: set[str] = field(default_factory=set)  # deny codes the embedded engine gives
    # The action type's own verification; by default the proposal's (so not `custom`).
    default_verification: VerificationSpec | None = None
    # proposer.track_record, as opsgate adds it (default: an agent with a clean record)
    track_record: dict[str, Any] | None = None
    no_track_record: bool = False

    def action_type(self) -> ActionType:
        action_type = CATALOG.get(self.action)
        update: dict[str, Any] = {"verification": self.default_verification or self.verification}
        if self.risk is not None:
            update["risk"] = self.risk
        if self.irreversible:
            update["undo"] = None
        return action_type.model_copy(update=update) if update else action_type

    def input(self) -> dict[str, Any]:
        action_type = self.action_type()
        params = dict(self.params)
        if self.replicas is not None and self.action == "scale_deployment":
            params["replicas"] = self.replicas
        document = build_input(
            action_type=action_type,
            target=self.target,
            environment=self.environment,
            params=params,
            reason="p99 latency over SLO since 09:42",
            spec_hash=spec_hash(
                action_type, self.target, self.environment, params, self.verification
            ),
            proposer=self.proposer,
            incident=Incident.model_validate(
                {"id": "INC-42", "severity": self.severity, "class": "capacity", "tier": self.tier}
            ),
            verification=self.verification,
            preconditions=self.preconditions,
            now=NOW,
            phase="execute" if self.phase == "execute" else "propose",
            active_on_target=self.active_on_target,
            approver=self.approver,
        )
        if not self.no_track_record:
            document["proposer"]["track_record"] = self.track_record or SEASONED
        if self.patch is not None:
            self.patch(document)
        return document

    @property
    def rule(self) -> str:
        return APPROVAL_RULE if self.approver is not None else DECISION_RULE


def _defined_without_signals(document: dict[str, Any]) -> None:
    document["verification"] = {"defined": True, "signals": 0, "stop_conditions": 0}


CASES = [
    # --- allowed -----------------------------------------------------------------------
    Case("allow-scale-prod", expect=set()),
    Case("allow-scale-staging-by-developer", environment="staging", proposer=DAVE),
    Case("allow-drain-staging-two-approvals", action="drain_node", params={"node": "node-7"},
         target="node-7", environment="staging", replicas=None),
    Case("allow-critical-tier-prod", tier="critical"),
    Case("allow-agent-restart-prod", action="restart_service", params={}, replicas=None,
         proposer=AGENT),
    Case("allow-execute-phase", phase="execute"),
    Case("allow-agent-on-probation-staging", action="restart_service", params={},
         replicas=None, environment="staging", proposer=AGENT, track_record=record(1)),
    Case("allow-agent-trusted-staging", action="restart_service", params={}, replicas=None,
         environment="staging", proposer=AGENT, risk="low"),
    # --- the trust ladder ----------------------------------------------------------------
    Case("agent-trust-revoked", action="restart_service", params={}, replicas=None,
         proposer=AGENT, track_record=ROLLED_BACK, expect={"trust_revoked"}),
    Case("agent-without-track-record", action="restart_service", params={}, replicas=None,
         proposer=AGENT, no_track_record=True, expect={"track_record_unavailable"}),
    Case("allow-freeze-exempt-sev1", bundle="freeze", severity="sev1"),
    Case("allow-freeze-other-env", bundle="freeze", environment="staging"),
    # --- not_allowlisted ---------------------------------------------------------------
    Case("drain-in-prod", action="drain_node", params={"node": "node-7"}, target="node-7",
         replicas=None, expect={"not_allowlisted"}),
    Case("env-without-allowlist", environment="qa",
         expect={"not_allowlisted", "insufficient_permissions"}),
    # --- param_out_of_bounds -----------------------------------------------------------
    Case("replicas-over-prod-max", replicas=60, preconditions=(),
         expect={"param_out_of_bounds"}),
    Case("replicas-under-prod-min", replicas=0, expect={"param_out_of_bounds"}),
    Case("replicas-over-default-max", environment="staging", replicas=150,
         expect={"param_out_of_bounds"}),
    Case("replicas-over-3x-current", replicas=40,
         preconditions=(precondition("current_replicas", True, 4),),
         expect={"param_out_of_bounds"}),
    Case("replicas-not-a-number", replicas="lots", expect={"param_out_of_bounds"}),
    # --- missing_precondition ----------------------------------------------------------
    Case("required-precondition-false",
         preconditions=(precondition("error_rate_elevated", False, 0.001, required=True),),
         expect={"missing_precondition"}),
    Case("required-precondition-errored",
         preconditions=(precondition("error_rate_elevated", False, None, required=True,
                                     error="prometheus unreachable"),),
         expect={"missing_precondition"}),
    Case("optional-precondition-false-is-fine",
         preconditions=(precondition("error_rate_elevated", False, 0.001),)),
    # --- insufficient_permissions ------------------------------------------------------
    Case("developer-in-prod", proposer=DAVE, expect={"insufficient_permissions"}),
    Case("agent-critical-risk", proposer=AGENT, risk="critical", environment="staging",
         expect={"insufficient_permissions"}),
    Case("agent-irreversible-prod", action="restart_service", params={}, replicas=None,
         proposer=AGENT, irreversible=True, expect={"insufficient_permissions"}),
    Case("unknown-proposer", proposer=Identity(id="mallory"),
         expect={"insufficient_permissions"}),
    # --- verification_weakened ---------------------------------------------------------
    Case("weakened-in-prod", default_verification=VERIFIED,
         verification=VERIFIED.model_copy(update={"hold": 10.0, "failure_limit": 5}),
         expect={"verification_weakened"}),
    Case("weakened-in-prod-by-an-override-role", default_verification=VERIFIED,
         verification=VERIFIED.model_copy(update={"hold": 10.0}),
         proposer=Identity(id="carol", kind="human")),
    Case("stricter-in-prod", default_verification=VERIFIED,
         verification=VERIFIED.model_copy(update={"hold": 300.0, "failure_limit": 0})),
    # --- verification_undefined --------------------------------------------------------
    Case("no-verification", verification=VerificationSpec(),
         expect={"verification_undefined"}),
    Case("signals-without-stop-conditions", verification=SIGNALS_ONLY,
         expect={"verification_undefined"}),
    Case("defined-but-empty", patch=_defined_without_signals,
         expect={"verification_undefined"}),
    # --- change_freeze -----------------------------------------------------------------
    Case("freeze-precondition",
         preconditions=(precondition("change_freeze", False, "black-friday"),),
         expect={"change_freeze"}),
    Case("freeze-window", bundle="freeze", expect={"change_freeze"}),
    Case("freeze-precondition-names-an-exempt-window", bundle="freeze", severity="sev1",
         preconditions=(precondition("change_freeze", False, "black-friday"),)),
    # --- concurrent_action -------------------------------------------------------------
    Case("active-on-target", active_on_target=2, expect={"concurrent_action"}),
    Case("concurrent-precondition",
         preconditions=(precondition("concurrent_action", False, 1),),
         expect={"concurrent_action"}),
    # --- several at once ---------------------------------------------------------------
    Case("agent-drain-prod-everything-wrong", action="drain_node", params={"node": "n-1"},
         target="n-1", replicas=None, proposer=AGENT, verification=VerificationSpec(),
         active_on_target=1,
         expect={"not_allowlisted", "insufficient_permissions", "verification_undefined",
                 "concurrent_action"}),
    # --- approval rule -----------------------------------------------------------------
    Case("approve-by-peer", approver=BOB),
    Case("approve-by-lead", approver=CAROL),
    Case("approve-own", approver=ALICE, expect={"self_approval"}),
    Case("approve-by-agent", approver=Identity(id="sre-agent", kind="agent"),
         expect={"insufficient_permissions"}),
    Case("approve-by-developer", approver=DAVE, expect={"insufficient_permissions"}),
    Case("approve-staging-by-developer-own", environment="staging", proposer=DAVE,
         approver=DAVE, expect={"insufficient_permissions", "self_approval"}),
]  # fmt: skip


@dataclass
class Engines:
    """The two engines over one bundle, and the URL of the OPA the second one pushes to."""

    embedded: EmbeddedEngine
    opa: OpaEngine
    url: str


# Which bundle each OPA holds now (by URL): a shared OPA holds the one pushed last.
_LAST_PUSHED: dict[str, str] = {}


@pytest.fixture(scope="module")
def target() -> Iterator[OpaTarget]:
    with opa_target() as found:
        yield found


@pytest.fixture(scope="module")
def freeze_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default bundle with one freeze window in its data."""
    directory = tmp_path_factory.mktemp("freeze-bundle")
    for path in POLICIES.iterdir():
        if path.is_file():
            shutil.copyfile(path, directory / path.name)
    data = json.loads((directory / "data.json").read_text())
    data["freeze_windows"] = [FREEZE]
    (directory / "data.json").write_text(json.dumps(data))
    return directory


@pytest.fixture(scope="module")
def engines(target: OpaTarget, freeze_bundle: Path) -> Iterator[dict[str, Engines]]:
    """An embedded and an OPA engine per bundle; the freeze bundle gets its own OPA if it can."""
    with ExitStack() as stack:
        # Push mode owns the opsgate package of its OPA: one bundle per OPA. Only an
        # OPA given by URL is shared, and `_evaluate` pushes the bundle a case needs.
        second = target if target.kind == "env" else stack.enter_context(opa_target())
        pairs: dict[str, Engines] = {}
        for name, directory, where in (
            ("default", POLICIES, target),
            ("freeze", freeze_bundle, second),
        ):
            engine = stack.enter_context(
                OpaEngine(where.url, mode="push", policies=directory, timeout=5.0)
            )
            pairs[name] = Engines(EmbeddedEngine(directory), engine, where.url)
            _LAST_PUSHED[where.url] = name
        yield pairs


def _evaluate(pair: Engines, case: Case) -> tuple[PolicyResult, PolicyResult]:
    document = case.input()
    embedded = pair.embedded.evaluate(case.rule, document)
    if _LAST_PUSHED[pair.url] != case.bundle:
        pair.opa.reload()  # a shared OPA holds the other bundle now: push this one back
        _LAST_PUSHED[pair.url] = case.bundle
    return embedded, pair.opa.evaluate(case.rule, document)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_both_engines_give_the_same_answer(engines: dict[str, Engines], case: Case) -> None:
    embedded, opa = _evaluate(engines[case.bundle], case)
    assert embedded.error is None and UNAVAILABLE not in embedded.deny_codes, embedded
    assert opa.error is None and UNAVAILABLE not in opa.deny_codes, opa
    assert set(embedded.deny_codes) == case.expect, embedded.deny
    assert embedded.allow == (not case.expect)

    assert opa.allow == embedded.allow
    assert set(opa.deny_codes) == set(embedded.deny_codes)
    assert sorted(opa.deny_codes) == sorted(embedded.deny_codes)  # duplicates too
    assert {(d["code"], d["message"]) for d in opa.deny} == {
        (d["code"], d["message"]) for d in embedded.deny
    }
    assert opa.required_approvals == embedded.required_approvals
    assert opa.approver_roles == embedded.approver_roles
    assert opa.revision == embedded.revision == bundle_revision(engines[case.bundle].opa.policies)


def test_the_corpus_covers_every_deny_code() -> None:
    decision_codes = set().union(*(c.expect for c in CASES if c.approver is None))
    approval_codes = set().union(*(c.expect for c in CASES if c.approver is not None))
    assert decision_codes == DENY_CODES
    assert approval_codes == APPROVAL_CODES
    assert any(not c.expect and c.approver is None for c in CASES)
    assert any(not c.expect and c.approver is not None for c in CASES)


def test_required_approvals_vary_across_the_corpus(engines: dict[str, Engines]) -> None:
    required = {
        _evaluate(engines[c.bundle], c)[1].required_approvals
        for c in CASES
        if c.approver is None and not c.expect
    }
    assert required == {1, 2}
