"""Every verb is authorized by the bundle's `authz` rule; refusals are stored decisions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from opsgate.audit import verify_chain
from opsgate.auth.principal import Principal
from opsgate.catalog import load_catalog
from opsgate.errors import NotFound, Refused
from opsgate.gate import Gate
from opsgate.models import ActionState, Identity
from opsgate.policies.embedded import EmbeddedEngine
from opsgate.store import Store
from tests.unit.test_cli import SCALE, Cli
from tests.unit.test_gate import AGENT, ALICE, BOB, DAVE, Clock, scale

ROOT = Path(__file__).resolve().parents[2]
MALLORY = Identity(id="mallory", kind="human")


@pytest.fixture
def gate(store: Store) -> Gate:
    return Gate(
        store=store,
        catalog=load_catalog(ROOT / "catalog"),
        engine=EmbeddedEngine(ROOT / "policies"),
        clock=Clock(),
    )


def refusals(store: Store, action_id: str | None) -> list[tuple[str, list[str]]]:
    """(verb, deny codes) of the authz refusals recorded for an action."""
    return [
        (e.data["verb"], sorted(set(e.data["deny"])))
        for e in store.audit_events()
        if e.kind == "authz.refused" and e.action_id == action_id
    ]


def test_an_agent_cannot_approve_reject_run_or_roll_back(gate: Gate, store: Store) -> None:
    action = gate.propose(scale(), BOB).action
    for verb in ("approve", "reject"):
        with pytest.raises(Refused) as refused:
            if verb == "approve":
                gate.approve(action.id, AGENT)
            else:
                gate.reject(action.id, AGENT, "no")
        assert refused.value.codes == ["insufficient_permissions"]
        assert f"{verb} refused" in str(refused.value)
    for verb in ("run", "rollback"):
        with pytest.raises(Refused):
            gate.authorize(verb, AGENT, action)  # type: ignore[arg-type]
    assert store.get_action(action.id).state is ActionState.PENDING_APPROVAL  # type: ignore[union-attr]
    assert store.approvals_for(action.id) == []
    assert refusals(store, action.id) == [
        (verb, ["insufficient_permissions"]) for verb in ("approve", "reject", "run", "rollback")
    ]
    stored = [d for d in store.decisions_for(action.id) if d.phase == "authz"]
    assert len(stored) == 4 and not any(d.allow for d in stored)
    assert stored[0].input["verb"] == "approve"
    assert stored[0].input["principal"] == {
        "id": "sre-agent",
        "kind": "agent",
        "groups": [],
        "method": "local",
    }
    assert verify_chain(store.audit_events()).ok


def test_only_the_proposer_or_an_approver_may_cancel(gate: Gate, store: Store) -> None:
    first = gate.propose(scale(), ALICE).action
    with pytest.raises(Refused) as refused:
        gate.cancel(first.id, DAVE, "mine now")
    assert refused.value.codes == ["insufficient_permissions"]
    assert refusals(store, first.id) == [("cancel", ["insufficient_permissions"])]
    assert store.get_action(first.id).state is ActionState.PENDING_APPROVAL  # type: ignore[union-attr]
    assert gate.cancel(first.id, BOB, "approver withdraws it").state is ActionState.CANCELLED
    second = gate.propose(scale(13, environment="staging"), DAVE).action
    assert gate.cancel(second.id, DAVE).state is ActionState.CANCELLED


def test_run_and_rollback_need_a_run_role_from_data_or_groups(gate: Gate, store: Store) -> None:
    action = gate.propose(scale(), BOB).action
    gate.authorize("run", ALICE, action)
    for who in (DAVE, MALLORY, Principal(id="erin", kind="human", groups=("dev",))):
        for verb in ("run", "rollback"):
            with pytest.raises(Refused) as refused:
                gate.authorize(verb, who, action)  # type: ignore[arg-type]
            assert refused.value.codes == ["insufficient_permissions"]
    # Groups carried by a credential count as roles.
    gate.authorize("rollback", Principal(id="erin", kind="human", groups=("sre",)), action)


def test_agents_read_only_their_own_actions(gate: Gate, store: Store) -> None:
    other_agent = Identity(id="demo-agent", kind="agent")
    mine = gate.propose(scale(), AGENT).action
    human = gate.propose(scale(13, target="cart", params={"deployment": "cart", "replicas": 3}),
                         BOB).action  # fmt: skip
    assert gate.details(mine.id, AGENT).action.id == mine.id
    with pytest.raises(NotFound):
        gate.details(human.id, AGENT)
    with pytest.raises(NotFound):
        gate.details(mine.id, other_agent)
    assert refusals(store, human.id) == [("read", ["insufficient_permissions"])]
    assert [a.id for a in gate.queue(AGENT)] == [mine.id]
    assert gate.queue(other_agent) == []
    assert {a.id for a in gate.queue(DAVE)} == {mine.id, human.id}


def test_a_bundle_without_authz_refuses_every_verb(store: Store, tmp_path: Path) -> None:
    bundle = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", bundle)
    rego = (bundle / "opsgate.rego").read_text()
    (bundle / "opsgate.rego").write_text(rego.replace("\nauthz := {", "\nnot_authz := {"))
    (bundle / "opsgate_test.rego").unlink()
    gate = Gate(store=store, catalog=load_catalog(ROOT / "catalog"), engine=EmbeddedEngine(bundle))
    before = store.row_counts()
    with pytest.raises(Refused) as refused:
        gate.propose(scale(), ALICE)
    assert refused.value.codes == ["policy_engine_unavailable"]
    after = store.row_counts()
    # The refusal is stored (a decision and its event); no action is.
    assert after["actions"] == before["actions"]
    assert after["decisions"] == before["decisions"] + 1
    assert refusals(store, None) == [("propose", ["policy_engine_unavailable"])]


def test_cli_run_and_rollback_ask_the_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = Cli(monkeypatch, capsys, tmp_path / "o.db")
    assert cli("init")[0] == 0
    action_id = cli.json(*SCALE)["action"]["id"]
    cli.as_user("bob")
    assert cli("approve", action_id)[0] == 0
    cli.as_user("dave")  # a developer: no run role in prod
    before = cli.rows()
    code, _, err = cli("run", action_id)
    assert code == 3 and "run refused" in err and err.count("\n") == 1
    code, _, err = cli("rollback", action_id, "--reason", "x")
    assert code == 3 and "rollback refused" in err
    after = cli.rows()
    assert after["actions"] == before["actions"] and after["approvals"] == before["approvals"]
    assert after["decisions"] == before["decisions"] + 2  # the two refusals, recorded
    cli.as_user("mallory")
    assert cli("run", action_id)[0] == 3
