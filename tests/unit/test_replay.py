"""Policy replay over a stored history, and the OPA decision-log export."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from opsgate.catalog import load_catalog
from opsgate.cli import cli
from opsgate.gate import Gate
from opsgate.models import Identity
from opsgate.policies.decision_log import masked_pointers, opa_decision_log
from opsgate.policies.embedded import EmbeddedEngine
from opsgate.policies.replay import replay
from opsgate.store import open_store
from opsgate.store.base import Store

ROOT = Path(__file__).resolve().parents[2]
ALICE = Identity(id="alice", kind="human")
REPLICAS = [2, 5, 12, 18, 20, 21, 25, 33, 40, 49, 50, 60]  # 60 is over today's prod bound


@pytest.fixture
def history(tmp_path: Path) -> tuple[str, Store]:
    url = f"sqlite:///{tmp_path}/replay.db"
    store = open_store(url)
    store.migrate()
    gate = Gate(
        store=store,
        catalog=load_catalog(ROOT / "catalog"),
        engine=EmbeddedEngine(ROOT / "policies"),
    )
    for i, replicas in enumerate(REPLICAS):
        gate.propose(
            {
                "action": "scale_deployment",
                "target": f"svc-{i}",
                "environment": "prod",
                "params": {"deployment": f"svc-{i}", "replicas": replicas},
                "reason": "replay history",
                "incident": {"severity": "sev2", "tier": "standard"},
            },
            ALICE,
        )
    return url, store


def candidate(tmp_path: Path, prod_max: int) -> Path:
    bundle = tmp_path / "candidate"
    shutil.copytree(ROOT / "policies", bundle)
    data = json.loads((bundle / "data.json").read_text())
    data["param_bounds"]["scale_deployment"]["replicas"]["prod"]["max"] = prod_max
    (bundle / "data.json").write_text(json.dumps(data))
    return bundle


def test_lowering_the_bound_blocks_exactly_the_proposals_above_it(
    history: tuple[str, Store], tmp_path: Path
) -> None:
    _, store = history
    counts = store.row_counts()
    now = datetime.now(UTC)
    decisions = list(store.decisions_between(now - timedelta(days=1), now, ["propose"]))
    assert len(decisions) == len(REPLICAS)
    result = replay(decisions, EmbeddedEngine(candidate(tmp_path, prod_max=20)))
    blocked = {d["target"] for d in result.newly_blocked}
    expected = {f"svc-{i}" for i, r in enumerate(REPLICAS) if 20 < r <= 50}
    assert blocked == expected and len(expected) == 6
    assert all(d["codes"] == ["param_out_of_bounds"] for d in result.newly_blocked)
    assert result.newly_allowed == []
    # replicas=60 was blocked before and still is: unchanged, counted under its code
    assert result.codes_before["param_out_of_bounds"] == 1
    assert result.codes_after["param_out_of_bounds"] == 7
    assert store.row_counts() == counts  # read-only


def test_raising_the_bound_allows_what_was_blocked(
    history: tuple[str, Store], tmp_path: Path
) -> None:
    url, _ = history
    bundle = candidate(tmp_path, prod_max=100)
    result = CliRunner().invoke(
        cli,
        ["--db", url, "policy", "replay", "--policies", str(bundle), "--since", "1d",
         "--format", "json"],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [d["target"] for d in document["newly_allowed"]] == ["svc-11"]
    assert document["newly_blocked"] == [] and document["approvals_changed"] == []
    markdown = CliRunner().invoke(
        cli, ["--db", url, "policy", "replay", "--policies", str(bundle), "--format", "markdown"]
    )
    assert markdown.exit_code == 0 and "newly allowed: **1**" in markdown.stdout


def test_decisions_export_in_opa_decision_log_shape(history: tuple[str, Store]) -> None:
    url, store = history
    result = CliRunner().invoke(cli, ["--db", url, "audit", "decisions", "--format", "opa-jsonl"])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(events) == len(REPLICAS)
    first = events[0]
    assert first["path"] == "opsgate/decision"
    assert first["bundles"]["opsgate"]["revision"].startswith("sha256:")
    assert first["input"]["action"]["type"] == "scale_deployment"
    assert first["result"]["allow"] is True and first["timestamp"].endswith("Z")
    assert {e["decision_id"] for e in events} == {
        d.id
        for d in store.decisions_between(
            datetime.now(UTC) - timedelta(days=1), datetime.now(UTC), ["propose"]
        )
    }


def test_masked_params_are_named_as_json_pointers() -> None:
    document = {"action": {"params": {"token": "***", "replicas": 3}}}
    assert masked_pointers(document) == ["/input/action/params/token"]
    assert masked_pointers({}) == []


def test_an_engine_error_is_exported_with_its_message(history: tuple[str, Store]) -> None:
    _, store = history
    now = datetime.now(UTC)
    decision = next(store.decisions_between(now - timedelta(days=1), now, ["propose"]))
    event = opa_decision_log(
        decision.model_copy(update={"error": "timeout", "result": None}), app_version="x"
    )
    assert event["error"]["message"] == "timeout" and "result" not in event


def test_shadow_bundle_is_stored_and_reported_but_never_enforced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/shadow.db"
    shadow = candidate(tmp_path, prod_max=20)
    monkeypatch.setenv("OPSGATE_SHADOW_POLICIES", str(shadow))
    monkeypatch.setenv("OPSGATE_IDENTITY", "env")
    monkeypatch.setenv("OPSGATE_USER", "alice")
    runner = CliRunner()
    base = ["--db", url, "--catalog", str(ROOT / "catalog"), "--policies", str(ROOT / "policies")]
    assert runner.invoke(cli, [*base, "init"]).exit_code == 0
    for replicas in (10, 30):
        proposed = runner.invoke(
            cli,
            [*base, "propose", "scale_deployment", "--target", f"svc-{replicas}", "--env",
             "prod", "--param", "deployment=web", "--param", f"replicas={replicas}",
             "--reason", "shadow test", "--tier", "standard", "--json"],
            catch_exceptions=False,
        )  # fmt: skip
        assert proposed.exit_code == 0, proposed.output
        document = json.loads(proposed.stdout)
        assert document["action"]["state"] == "pending_approval"  # enforced: allowed
        verdict = document["decision"]["shadow"]
        assert verdict["revision"].startswith("sha256:")
        if replicas == 30:
            assert verdict["allow"] is False
            assert [d["code"] for d in verdict["deny"]] == ["param_out_of_bounds"]
        else:
            assert verdict["allow"] is True
    report = runner.invoke(cli, [*base, "report", "blocks", "--format", "json"])
    assert report.exit_code == 0, report.output
    tables = {t["name"]: t for t in json.loads(report.stdout)["tables"]}
    assert tables["shadow"]["rows"] == [
        {
            "phase": "propose",
            "evaluated": 2,
            "would_have_blocked": 1,
            "would_have_allowed": 0,
            "codes": {"param_out_of_bounds": 1},
        }
    ]


@pytest.mark.parametrize(
    ("engine", "revision", "bundles", "legacy"),
    [
        ("embedded", "sha256:" + "a" * 64, {"opsgate": {"revision": "sha256:" + "a" * 64}}, None),
        ("opa", "sha256:" + "b" * 64, {"opsgate": {"revision": "sha256:" + "b" * 64}}, None),
        ("opa", "authz:git-4f2a9c1", {"authz": {"revision": "git-4f2a9c1"}}, None),
        ("opa", "a:1,b:2", {"a": {"revision": "1"}, "b": {"revision": "2"}}, None),
        ("opa", "legacy-7", None, "legacy-7"),
        ("opa", "external:unknown", None, None),
    ],
)
def test_decision_log_bundles_follow_opa_in_every_mode(
    history: tuple[str, Store],
    engine: str,
    revision: str,
    bundles: dict[str, Any] | None,
    legacy: str | None,
) -> None:
    _, store = history
    now = datetime.now(UTC)
    decision = next(store.decisions_between(now - timedelta(days=1), now, ["propose"]))
    event = opa_decision_log(
        decision.model_copy(update={"engine": engine, "bundle_revision": revision}),
        app_version="x",
    )
    assert event.get("bundles") == bundles
    assert event.get("revision") == legacy


def ladder_candidate(tmp_path: Path, **ladder: Any) -> Path:
    bundle = tmp_path / "ladder"
    shutil.copytree(ROOT / "policies", bundle)
    data = json.loads((bundle / "data.json").read_text())
    data["trust_ladder"].update(ladder)
    (bundle / "data.json").write_text(json.dumps(data))
    return bundle


def test_replay_counts_approvals_a_ladder_adds_or_saves_per_proposer(
    history: tuple[str, Store], tmp_path: Path
) -> None:
    url, store = history
    gate = Gate(
        store=store,
        catalog=load_catalog(ROOT / "catalog"),
        engine=EmbeddedEngine(ROOT / "policies"),
    )
    agent = Identity(id="sre-agent", kind="agent")
    for i in range(3):
        outcome = gate.propose(
            {
                "action": "restart_service",
                "target": f"agent-svc-{i}",
                "environment": "staging",
                "params": {"deployment": f"agent-svc-{i}"},
                "reason": "replay history",
            },
            agent,
        )
        assert outcome.decision.allow and outcome.action.required_approvals == 2
    # One stored before inputs carried a track record: replay reads it as of its time.
    old = outcome.decision.model_copy(
        update={
            "id": "01OLDDECISION0000000000000",
            "input": {**outcome.decision.input, "proposer": {"id": "sre-agent", "kind": "agent"}},
        }
    )
    with store.transaction() as tx:
        tx.insert_decision(old)
    counts = store.row_counts()

    def run(bundle: Path, fmt: str) -> Any:
        result = CliRunner().invoke(
            cli,
            ["--db", url, "policy", "replay", "--policies", str(bundle), "--since", "1d",
             "--format", fmt],
            catch_exceptions=False,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        return result.stdout

    # No probation: each of the agent's 4 decisions needs one approval fewer.
    document = json.loads(run(ladder_candidate(tmp_path, min_verified_passes=0), "json"))
    assert document["track_records_filled"] == 1
    per = document["per_proposer"]
    assert per["sre-agent"]["approvals_saved"] == 4 and per["sre-agent"]["decisions"] == 4
    assert per["sre-agent"]["approvals_added"] == 0
    assert per["alice"]["approvals_saved"] == 0 and per["alice"]["approvals_added"] == 0
    # Humans on the ladder too: each allowed proposal of alice's needs one more.
    shutil.rmtree(tmp_path / "ladder")
    humans = ladder_candidate(tmp_path, kinds=["agent", "human"])
    document = json.loads(run(humans, "json"))
    allowed = sum(1 for r in REPLICAS if r <= 50)
    assert document["per_proposer"]["alice"]["approvals_added"] == allowed
    assert document["per_proposer"]["sre-agent"]["approvals_added"] == 0
    assert "| alice | 12 |" in run(humans, "markdown")
    assert "alice: 12 decisions, approvals +11 / -0" in run(humans, "table")
    assert store.row_counts() == counts  # read-only
