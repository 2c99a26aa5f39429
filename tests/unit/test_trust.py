"""The track record (opsgate.trust): figures against independent ground truth on every
store, the gate's use of it, failing closed, and `opsgate trust reset`."""

from __future__ import annotations

import getpass
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from opsgate.catalog import load_catalog
from opsgate.cli import main
from opsgate.errors import InvalidInput, Refused
from opsgate.gate import Gate
from opsgate.models import ActionState, DenyReason, Identity
from opsgate.policies.embedded import EmbeddedEngine
from opsgate.store import Store
from opsgate.store.sql import SqlStore
from opsgate.store.track_summary import window_start
from opsgate.testing import (
    MemoryStore,
    make_action,
    make_decision,
    make_execution,
)
from opsgate.trust import SCOPES, TRACK_RECORD_UNAVAILABLE, reset, track_record

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
WINDOW = 90 * 86400.0
AGENT = Identity(id="agent-a", kind="agent")
CAROL = Identity(id="carol", kind="human")  # sre-lead: may reset trust
ALICE = Identity(id="alice", kind="human")  # sre: may not
BOB = Identity(id="bob", kind="human")
SRE_AGENT = Identity(id="sre-agent", kind="agent")  # has the propose role in the bundle


@dataclass
class Spec:
    """One generated action and how it went: the ground truth the store must reproduce."""

    proposer: str
    action_type: str
    environment: str
    created: datetime
    codes: list[str]  # deny codes at proposal; empty: allowed
    fate: str  # blocked | pending | rejected | approved | ran
    outcome: str | None = None  # of a run: succeeded, stopped, failed_verification, None
    rollback: str | None = None  # auto_verified | auto_failed | manual_verified | None


def generate(seed: int, n: int) -> list[Spec]:
    rng = random.Random(seed)
    specs = []
    for _ in range(n):
        created = NOW - timedelta(days=rng.uniform(0, 130), seconds=rng.randint(0, 3600))
        codes = rng.choice(
            [[], [], [], ["param_out_of_bounds"], ["change_freeze", "concurrent_action"]]
        )
        spec = Spec(
            rng.choice(["agent-a", "agent-b"]),
            rng.choice(["scale_deployment", "restart_service"]),
            rng.choice(["prod", "staging"]),
            created,
            codes,
            "blocked" if codes else rng.choice(["pending", "rejected", "approved", "ran", "ran"]),
        )
        if spec.fate == "ran":
            spec.outcome = rng.choice(
                ["succeeded", "succeeded", "stopped", "failed_verification", None]
            )
            if spec.outcome in ("stopped", "failed_verification"):
                spec.rollback = rng.choice(["auto_verified", "auto_failed"])
            elif spec.outcome == "succeeded" and rng.random() < 0.2:
                spec.rollback = "manual_verified"
        specs.append(spec)
    return specs


STATE = {
    "blocked": ActionState.BLOCKED,
    "pending": ActionState.PENDING_APPROVAL,
    "rejected": ActionState.REJECTED,
    "approved": ActionState.APPROVED,
}


def load(store: Store, specs: list[Spec]) -> None:
    with store.transaction() as tx:
        for i, spec in enumerate(specs):
            ran = spec.fate == "ran"
            state = STATE.get(spec.fate, ActionState.SUCCEEDED)
            action = make_action(
                action_type=spec.action_type,
                environment=spec.environment,
                target=f"t{i}",
                proposer=Identity(id=spec.proposer, kind="agent"),
                state=state,
                created_at=spec.created,
                updated_at=spec.created,
                approved_at=spec.created + timedelta(minutes=1)
                if spec.fate in ("approved", "ran")
                else None,
            )
            tx.insert_action(action)
            tx.insert_decision(
                make_decision(
                    action.id,
                    phase="propose",
                    allow=not spec.codes,
                    deny=tuple(DenyReason(code=c, message=c) for c in spec.codes),
                    decided_at=spec.created,
                )
            )
            if not ran:
                continue
            started = spec.created + timedelta(minutes=2)
            finished = spec.created + timedelta(minutes=10) if spec.outcome else None
            fields: dict[str, Any] = {
                "target": f"t{i}",
                "environment": spec.environment,
                "claimed_at": started,
                "run_started_at": started,
                "outcome": spec.outcome,
                "finished_at": finished,
            }
            if spec.rollback:
                fields["rollback_decided_at"] = spec.created + timedelta(minutes=5)
                fields["rollback_requested_by"] = (
                    "bob" if spec.rollback == "manual_verified" else None
                )
                if spec.rollback.endswith("verified"):
                    fields["rollback_verified_at"] = spec.created + timedelta(minutes=8)
            tx.insert_execution(make_execution(action.id, **fields))


def expected(
    specs: list[Spec], proposer: str, action_type: str, environment: str
) -> dict[str, Any]:
    """The figures, counted straight from the generated history."""
    since = window_start(NOW, 90)  # whole UTC days
    out: dict[str, Any] = {}
    for scope in SCOPES:
        mine = [
            s
            for s in specs
            if s.proposer == proposer
            and (scope == "overall" or s.action_type == action_type)
            and (scope != "action_type_in_environment" or s.environment == environment)
        ]
        inside = [s for s in mine if since <= s.created < NOW]
        runs = [s for s in inside if s.fate == "ran"]
        finished = [s for s in runs if s.outcome is not None]
        codes: dict[str, int] = {}
        for s in inside:
            for code in s.codes:
                codes[code] = codes.get(code, 0) + 1
        passes = sum(s.outcome == "succeeded" for s in finished)
        # Over all time: the newest finished run, and the newest bad one.
        ended = sorted((s for s in mine if s.fate == "ran" and s.outcome), key=lambda s: s.created)
        bad = [s for s in ended if s.outcome != "succeeded" or s.rollback]
        last = ended[-1] if ended else None
        out[scope] = {
            "proposals": len(inside),
            "blocked": sum(bool(s.codes) for s in inside),
            "blocked_by_code": dict(sorted(codes.items())),
            "approved": sum(s.fate in ("approved", "ran") for s in inside),
            "rejected": sum(s.fate == "rejected" for s in inside),
            "executed": len(runs),
            "finished": len(finished),
            "verified_passes": passes,
            "failed_verifications": sum(s.outcome == "failed_verification" for s in finished),
            "stop_conditions": sum(s.outcome == "stopped" for s in finished),
            "automatic_rollbacks": sum(str(s.rollback).startswith("auto") for s in runs),
            "rollbacks_failed": sum(s.rollback == "auto_failed" for s in runs),
            "pass_rate": passes / len(finished) if finished else None,
            "seconds_since_last_failure": (
                (NOW - bad[-1].created - timedelta(minutes=10)).total_seconds() if bad else None
            ),
            "last_rolled_back": bool(last.rollback) if last else None,
            "last_rollback_failed": last.rollback == "auto_failed" if last else None,
        }
    return out


def observed(record: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for scope in SCOPES:
        figures = dict(record[scope])
        last = figures.pop("last_run")
        figures["last_rolled_back"] = last["rolled_back"] if last else None
        figures["last_rollback_failed"] = last["rollback_failed"] if last else None
        if figures["pass_rate"] is not None:
            figures["pass_rate"] = pytest.approx(figures["pass_rate"])
        if figures["seconds_since_last_failure"] is not None:
            figures["seconds_since_last_failure"] = pytest.approx(
                figures["seconds_since_last_failure"], abs=1e-3
            )
        out[scope] = figures
    return out


@pytest.mark.parametrize("seed", [1, 2])
def test_the_track_record_matches_ground_truth_on_every_store(store: Store, seed: int) -> None:
    specs = generate(seed, 160)
    load(store, specs)
    for proposer, action_type, environment in [
        ("agent-a", "scale_deployment", "staging"),
        ("agent-b", "restart_service", "prod"),
        ("nobody", "scale_deployment", "prod"),
    ]:
        record = track_record(store, proposer, action_type, environment, NOW, WINDOW).as_input()
        assert observed(record) == expected(specs, proposer, action_type, environment)
        assert record["window_days"] == 90
        # Inside a transaction it reads the same (the decision's own transaction).
        with store.transaction() as tx:
            again = track_record(tx, proposer, action_type, environment, NOW, WINDOW)
        assert again.as_input() == record


def test_the_figures_are_the_reports_figures(sqlite_url: str) -> None:
    """One definition per figure: summed over every proposer, the overall scope is what
    the governance reports count."""
    from opsgate.reports.queries import ReportQueries, Window

    store = SqlStore(sqlite_url)
    specs = generate(3, 120)
    load(store, specs)
    window = Window(window_start(NOW, 90), NOW)  # the record's window: whole UTC days
    q = ReportQueries(store)
    [verification] = q.verification(window)
    [blocks] = q.blocks(window)
    [approvals] = q.approvals(window)
    totals: dict[str, int] = {}
    for proposer in ("agent-a", "agent-b"):
        overall = track_record(store, proposer, "x", "y", NOW, WINDOW).as_input()["overall"]
        for key in ("proposals", "blocked", "verified_passes", "finished", "approved", "rejected"):
            totals[key] = totals.get(key, 0) + overall[key]
    assert totals == {
        "proposals": blocks.decided,
        "blocked": blocks.blocked,
        "verified_passes": verification.succeeded,
        "finished": verification.finished,
        "approved": approvals.approved,
        "rejected": approvals.rejected,
    }
    store.close()


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("store", ["sqlite", "postgresql"], indirect=True)
def test_the_scope_cuts_are_the_reports_where_filters(store: Store, seed: int) -> None:
    """One definition per figure: the per-segment approval and rollback counts the
    record cuts in Python give, scope by scope, what the reports give with `--where`."""
    from opsgate.reports.queries import ReportQueries, Window
    from opsgate.trust import in_scope

    assert isinstance(store, SqlStore)
    load(store, generate(seed, 160))
    window = Window(window_start(NOW, 90), NOW)  # the record's window: whole UTC days
    q = ReportQueries(store)
    for proposer, action_type, environment in [
        ("agent-a", "scale_deployment", "staging"),
        ("agent-b", "restart_service", "prod"),
    ]:
        wheres = {
            "overall": {},
            "action_type": {"action": action_type},
            "action_type_in_environment": {"action": action_type, "environment": environment},
        }
        approvals = q.approvals_cube(window, proposer=proposer)
        rollbacks = q.rollbacks_cube(window, proposer=proposer)
        for scope, where in wheres.items():
            cut_a = [r for d, r in approvals if in_scope(d, scope, action_type, environment)]
            cut_r = [r for d, r in rollbacks if in_scope(d, scope, action_type, environment)]
            report_a = q.approvals(window, None, where, proposer=proposer, counts_only=True)
            report_r = q.rollbacks(window, None, where, proposer=proposer, counts_only=True)
            for name in ("waited", "approved", "rejected", "expired", "cancelled", "pending"):
                assert sum(getattr(r, name) for r in cut_a) == sum(
                    getattr(r, name) for r in report_a
                ), (proposer, scope, name)
            for name in ("decided", "verified", "never_verified", "failed", "automatic"):
                assert sum(getattr(r, name) for r in cut_r) == sum(
                    getattr(r, name) for r in report_r
                ), (proposer, scope, name)
        assert sum(r.waited for _, r in approvals) > 0
        assert sum(r.decided for _, r in rollbacks) > 0


def test_labels_narrowed_to_one_proposer_still_label_everyone_elses_facts(
    sqlite_url: str,
) -> None:
    """Queries made for one proposer's record read only its segment labels; a query that
    is not narrowed still gets every segment labelled, not '(none)'."""
    from opsgate.reports.queries import ReportQueries, Window

    store = SqlStore(sqlite_url)
    load(store, generate(4, 80))
    window = Window(NOW - timedelta(seconds=WINDOW), NOW)
    narrowed = ReportQueries(store, proposer="agent-a")
    mine = narrowed.verification_cube(window, proposer="agent-a")
    everyone = narrowed.verification_cube(window)
    assert sorted(mine, key=repr) == sorted(
        ReportQueries(store).verification_cube(window, proposer="agent-a"), key=repr
    )
    assert sorted(everyone, key=repr) == sorted(
        ReportQueries(store).verification_cube(window), key=repr
    )
    assert sum(row[-1] for row in everyone) > sum(row[-1] for row in mine)
    assert all("(none)" not in dims for dims, *_ in everyone)
    store.close()


# --- the gate ------------------------------------------------------------------------------


def gate_over(store: Store) -> Gate:
    return Gate(
        store=store,
        catalog=load_catalog(ROOT / "catalog"),
        engine=EmbeddedEngine(ROOT / "policies"),
        clock=lambda: NOW,
    )


def scale(environment: str = "staging") -> dict[str, Any]:
    return {
        "action": "scale_deployment",
        "target": "checkout",
        "environment": environment,
        "params": {"deployment": "checkout", "replicas": 6},
        "reason": "p99 latency over SLO",
        "incident": {"id": "INC-42", "severity": "sev2", "class": "capacity", "tier": "standard"},
    }


def test_an_agent_without_verified_passes_needs_one_approval_more() -> None:
    gate = gate_over(MemoryStore())
    human = gate.propose(scale(), ALICE)
    agent = gate.propose({**scale(), "target": "cart"}, SRE_AGENT)
    assert agent.action.state is ActionState.PENDING_APPROVAL
    assert human.action.required_approvals == 1
    assert agent.action.required_approvals == 2
    record = agent.decision.input["proposer"]["track_record"]
    assert record["overall"]["proposals"] == 0  # its own proposal is not yet history
    assert agent.decision.result is not None
    assert agent.decision.result["ladder"]["rung"] == "probation"


class BrokenRecord(MemoryStore):
    def track_record_facts(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the reports index is gone")

    def track_record_figures(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the reports index is gone")


def test_a_track_record_that_cannot_be_read_denies() -> None:
    store = BrokenRecord()
    gate = gate_over(store)
    for who in (SRE_AGENT, ALICE):  # humans too: the input must be whole, whoever proposes
        outcome = gate.propose({**scale(), "target": f"t-{who.id}"}, who)
        assert outcome.action.state is ActionState.BLOCKED
        assert TRACK_RECORD_UNAVAILABLE in outcome.decision.deny_codes
        assert "the reports index is gone" in " ".join(d.message for d in outcome.decision.deny)


# --- the reset -------------------------------------------------------------------------------


def test_a_reset_is_recorded_with_its_audit_event(store: Store) -> None:
    gate = gate_over(store)
    record = reset(gate, "agent-a", "scale_deployment", "postmortem INC-42 done", CAROL)
    assert store.last_trust_reset("agent-a", "scale_deployment") == record.at
    assert store.last_trust_reset("agent-a", "restart_service") is None
    assert store.last_trust_reset("agent-b", "scale_deployment") is None
    [event] = [e for e in store.audit_events() if e.kind == "trust.reset"]
    assert event.actor == "carol"
    assert event.data["proposer"] == "agent-a" and event.data["reset_id"] == record.id


@pytest.mark.parametrize(
    ("actor", "code"),
    [(ALICE, "insufficient_permissions"), (AGENT, "insufficient_permissions")],
)
def test_a_reset_without_the_role_is_refused_and_recorded(actor: Identity, code: str) -> None:
    store = MemoryStore()
    gate = gate_over(store)
    with pytest.raises(Refused) as refused:
        reset(gate, "agent-a", "scale_deployment", "trust me", actor)
    assert code in refused.value.codes
    assert store.row_counts()["trust_resets"] == 0
    assert [e.kind for e in store.audit_events()] == ["authz.refused"]


def test_nobody_resets_their_own_trust() -> None:
    gate = gate_over(MemoryStore())
    with pytest.raises(Refused) as refused:
        reset(gate, "carol", "scale_deployment", "I am fine", CAROL)
    assert "self_approval" in refused.value.codes


@pytest.mark.parametrize(
    ("proposer", "action_type", "reason", "field"),
    [
        ("", "scale_deployment", "r", "proposer"),
        ("agent a", "scale_deployment", "r", "proposer"),
        ("agent\x1b[2J", "scale_deployment", "r", "proposer"),
        ("a" * 129, "scale_deployment", "r", "proposer"),
        ("agent-a", "scale_deploymnet", "r", "action_type"),
        ("agent-a", "x'; DROP TABLE trust_resets; --", "r", "action_type"),
        ("agent-a", "scale_deployment", "  ", "reason"),
        ("agent-a", "scale_deployment", "r" * 2001, "reason"),
    ],
)
def test_bad_reset_input_names_the_field_and_changes_nothing(
    proposer: str, action_type: str, reason: str, field: str
) -> None:
    store = MemoryStore()
    before = store.row_counts()
    with pytest.raises(InvalidInput) as bad:
        reset(gate_over(store), proposer, action_type, reason, CAROL)
    assert bad.value.field == field
    assert store.row_counts() == before


RESET = ["trust", "reset", "--proposer", "agent-a", "--action-type", "scale_deployment"]


@pytest.fixture
def cli_store(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[SqlStore, Callable[..., tuple[int, str, str]]]]:
    monkeypatch.setenv("OPSGATE_DB", sqlite_url)
    monkeypatch.setenv("OPSGATE_CATALOG", str(ROOT / "catalog"))
    monkeypatch.setenv("OPSGATE_POLICIES", str(ROOT / "policies"))
    store = SqlStore(sqlite_url)

    def run(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    yield store, run
    store.close()


def test_the_cli_reset_by_a_lead_then_refusals_and_bad_input(
    cli_store: tuple[SqlStore, Callable[..., tuple[int, str, str]]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store, run = cli_store
    monkeypatch.setenv("OPSGATE_IDENTITY", "env")
    monkeypatch.setenv("OPSGATE_USER", "carol")
    code, out, err = run(*RESET, "--reason", "postmortem done", "--json", capsys=capsys)
    assert code == 0, err
    done = json.loads(out)
    assert done["reset_by"] == "carol" and done["proposer"] == "agent-a"
    assert store.row_counts()["trust_resets"] == 1
    monkeypatch.setenv("OPSGATE_USER", "alice")
    code, _, err = run(*RESET, "--reason", "me too", capsys=capsys)
    assert code == 3 and "needs one of the roles" in err
    monkeypatch.setenv("OPSGATE_USER", "carol")
    monkeypatch.setenv("OPSGATE_USER_KIND", "agent")
    code, _, err = run(*RESET, "--reason", "agents cannot", capsys=capsys)
    assert code == 3
    monkeypatch.setenv("OPSGATE_USER_KIND", "human")
    for args, name in [
        ([*RESET, "--reason", ""], "reason"),
        ([*RESET[:3], "agent\x07a", *RESET[4:], "--reason", "r"], "proposer"),
        ([*RESET[:5], "nope", "--reason", "r"], "action_type"),
        ([*RESET, "--reason", "r" * 5000], "reason"),
    ]:
        code, _, err = run(*args, capsys=capsys)
        assert code == 2 and name in err, (args, err)
        assert len(err.strip().splitlines()) == 1
    assert store.row_counts()["trust_resets"] == 1


def test_the_cli_takes_identity_from_the_os_user_not_env_vars(
    cli_store: tuple[SqlStore, Callable[..., tuple[int, str, str]]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store, run = cli_store
    if getpass.getuser() == "carol":  # pragma: no cover - a machine whose user is carol
        pytest.skip("the OS user is carol")
    monkeypatch.delenv("OPSGATE_IDENTITY", raising=False)
    # Claiming to be carol (sre-lead) by environment does not make the OS user carol.
    monkeypatch.setenv("OPSGATE_USER", "carol")
    monkeypatch.setenv("LOGNAME", "carol")
    code, _, err = run(*RESET, "--reason", "postmortem done", capsys=capsys)
    assert code == 3, err
    assert store.row_counts()["trust_resets"] == 0


def test_an_approval_reads_todays_record_and_fails_closed_without_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import opsgate.store.memory

    store = MemoryStore()
    gate = gate_over(store)
    ticks = iter(range(1, 1000))
    gate.clock = lambda: NOW + timedelta(seconds=next(ticks))  # the window is half-open
    first = gate.propose(scale(), SRE_AGENT)
    second = gate.propose({**scale(), "target": "cart"}, SRE_AGENT)
    gate.approve(first.action.id, BOB)
    [approval] = [d for d in store.decisions_for(first.action.id) if d.phase == "approval"]
    # At proposal it had no history; at approval both its proposals are.
    assert first.decision.input["proposer"]["track_record"]["overall"]["proposals"] == 0
    assert approval.input["proposer"]["track_record"]["overall"]["proposals"] == 2

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the reports index is gone")

    monkeypatch.setattr(opsgate.store.memory, "_memory_facts", broken)
    with pytest.raises(Refused) as refused:
        gate.approve(second.action.id, BOB)
    assert TRACK_RECORD_UNAVAILABLE in refused.value.codes
    assert store.approvals_for(second.action.id) == []
