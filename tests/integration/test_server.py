"""`opsgate server` as clients meet it: a real server process over HTTP, API tokens,
and every spoofing, injection, overflow and malformed-input attempt refused with nothing
stored."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from opsgate.store.sql import SqlStore
from tests.integration.api_server import ROOT, ApiServer, run_cli

pytestmark = pytest.mark.integration

SCALE = {
    "action": "scale_deployment",
    "target": "checkout",
    "environment": "prod",
    "params": {"deployment": "checkout", "replicas": 6},
    "reason": "p99 latency over SLO since 14:02",
    "incident": {"id": "INC-42", "severity": "sev2", "class": "capacity-saturation",
                 "tier": "standard"},
}  # fmt: skip


class Rig:
    def __init__(
        self, tmp: Path, extra: dict[str, str] | None = None, catalog: Path = ROOT / "catalog"
    ) -> None:
        self.db = f"sqlite:///{tmp / 'server.db'}"
        self.env = {
            "OPSGATE_DB": self.db,
            "OPSGATE_CATALOG": str(catalog),
            "OPSGATE_POLICIES": str(ROOT / "policies"),
            "OPSGATE_CONFIG": str(tmp / "absent.toml"),
            # These tests fail to authenticate on purpose, all from 127.0.0.1; the limit
            # has tests of its own (test_server_boundary.py).
            "OPSGATE_AUTH_FAILURE_LIMIT": "100000",
            **(extra or {}),
        }
        done = run_cli(self.env, "init")
        assert done.returncode == 0, done.stderr
        self.server = ApiServer(self.env)
        self.store = SqlStore(self.db)
        self.tokens: dict[str, str] = {}

    def token(self, principal: str, *args: str) -> str:
        done = run_cli(self.env, "token", "create", "--principal", principal, *args)
        assert done.returncode == 0, done.stderr
        token = done.stdout.strip()
        assert token.startswith("ogt_") and "\n" not in token
        return token

    def propose(self, who: str, replicas: int) -> dict[str, Any]:
        # One target per proposal: an approved action on a target blocks new ones there.
        target = f"svc-{replicas}"
        document = {**SCALE, "target": target,
                    "params": {"deployment": target, "replicas": replicas}}  # fmt: skip
        status, body = self.call("POST", "/actions", self.tokens[who], document)
        assert status == 201, body
        return dict(body)

    def rows(self) -> dict[str, int]:
        return self.store.row_counts()

    def call(self, method: str, path: str, token: str | None = None, body: Any = None,
             **kwargs: Any) -> tuple[int, Any]:  # fmt: skip
        return self.server.call(method, "/api/v1" + path, token, body, **kwargs)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = Rig(tmp_path_factory.mktemp("server"))
    rig.tokens = {
        "alice": rig.token("alice", "--kind", "human", "--group", "sre"),
        "bob": rig.token("bob", "--kind", "human"),
        "carol": rig.token("carol", "--kind", "human"),
        "dave": rig.token("dave", "--kind", "human"),
        "agent": rig.token("sre-agent", "--kind", "agent"),
        "other_agent": rig.token("demo-agent", "--kind", "agent"),
    }
    rig.server.start()
    try:
        yield rig
    finally:
        rig.server.stop()
        rig.store.close()


def unchanged(rig: Rig, before: dict[str, int]) -> None:
    assert rig.rows() == before


def metric(rig: Rig, prefix: str) -> float:
    text = requests.get(rig.server.url + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


def auth_failures(rig: Rig) -> float:
    return metric(rig, "opsgate_api_auth_failures_total{")


# --- the happy path ----------------------------------------------------------------------


def test_whoami_is_the_token_principal(rig: Rig) -> None:
    status, body = rig.call("GET", "/whoami", rig.tokens["alice"])
    assert status == 200
    assert body["id"] == "alice" and body["kind"] == "human" and body["groups"] == ["sre"]
    assert body["method"] == "token"


def test_openapi_document_is_served(rig: Rig) -> None:
    status, body = rig.call("GET", "/openapi.json")
    assert status == 200 and body["openapi"].startswith("3.")
    assert {"/actions", "/actions/{action_id}/approve", "/whoami"} <= set(body["paths"])
    reset = body["paths"]["/trust/reset"]["post"]
    schema = reset["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["proposer", "action_type", "reason"]
    assert schema["additionalProperties"] is False and "403" in reset["responses"]
    assert "Proposal" in body["components"]["schemas"]


def test_agent_proposes_a_human_approves_through_the_gate(rig: Rig) -> None:
    status, body = rig.call("POST", "/actions", rig.tokens["agent"], SCALE)
    assert status == 201, body
    action = body["action"]
    assert action["proposer"] == {"id": "sre-agent", "kind": "agent"}
    assert action["state"] == "pending_approval" and body["decision"]["allow"] is True

    status, queue = rig.call("GET", "/queue", rig.tokens["bob"])
    assert status == 200 and action["id"] in [a["id"] for a in queue]

    status, body = rig.call("POST", f"/actions/{action['id']}/approve", rig.tokens["alice"],
                            {"comment": "scale it"})  # fmt: skip
    assert status == 200, body
    assert body["counted"] is True
    assert body["approvals"][0]["approver"] == {"id": "alice", "kind": "human"}

    status, details = rig.call("GET", f"/actions/{action['id']}", rig.tokens["bob"])
    assert status == 200
    kinds = [e["kind"] for e in details["events"]]
    assert "approval.added" in kinds
    assert {e["actor"] for e in details["events"]} == {"sre-agent", "alice"}


def test_idempotency_key_through_the_api(rig: Rig) -> None:
    document = {**SCALE, "target": "cart", "params": {"deployment": "cart", "replicas": 3},
                "idempotency_key": "api-retry-1"}  # fmt: skip
    first_status, first = rig.call("POST", "/actions", rig.tokens["agent"], document)
    again_status, again = rig.call("POST", "/actions", rig.tokens["agent"], document)
    assert (first_status, again_status) == (201, 200)
    assert again["existing"] is True and again["action"]["id"] == first["action"]["id"]


def test_reject_and_cancel_through_the_api(rig: Rig) -> None:
    proposed = rig.propose("bob", 7)
    action_id = proposed["action"]["id"]
    status, body = rig.call("POST", f"/actions/{action_id}/reject", rig.tokens["alice"],
                            {"reason": "not now"})  # fmt: skip
    assert status == 200 and body["state"] == "rejected"

    proposed = rig.propose("bob", 8)
    action_id = proposed["action"]["id"]
    status, body = rig.call("POST", f"/actions/{action_id}/cancel", rig.tokens["bob"], {})
    assert status == 200 and body["state"] == "cancelled"


# --- authentication: never self-asserted -------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Forwarded-User": "alice"},
        {"X-Forwarded-User": "alice", "X-Forwarded-Groups": "sre-lead"},
        {"X-Remote-User": "alice", "Remote-User": "alice", "X-User": "alice"},
        {"Authorization": "Basic YWxpY2U6cGFzc3dvcmQ="},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer alice"},
        {"Authorization": "Bearer ogt_' OR '1'='1"},
        {"Authorization": "Bearer ogt_01aaaaaaaaaaaaaaaaaaaaaaaa_" + "A" * 43},
        {"Authorization": "Bearer " + "A" * 20_000},
        {"Authorization": "Token ogt_x"},
    ],
)
def test_no_valid_credentials_is_401_and_changes_nothing(rig: Rig, headers: dict[str, str]) -> None:
    before, failures = rig.rows(), auth_failures(rig)
    for method, path, body in [
        ("GET", "/whoami", None),
        ("GET", "/queue", None),
        ("POST", "/actions", SCALE),
    ]:
        status, answer = rig.call(method, path, None, body, headers=headers)
        assert status == 401, answer
        assert answer["error"]["type"] == "unauthenticated"
        assert "\n" not in answer["error"]["message"]
    unchanged(rig, before)
    assert auth_failures(rig) == failures + 3


def test_wrong_secret_for_a_real_token_id_is_401(rig: Rig) -> None:
    real = rig.tokens["alice"]
    forged = real[:-4] + ("AAAA" if not real.endswith("AAAA") else "BBBB")
    status, body = rig.call("GET", "/whoami", forged)
    assert status == 401 and body["error"]["type"] == "unauthenticated"


def test_forged_header_beside_a_token_does_not_change_who_acts(rig: Rig) -> None:
    status, body = rig.call("GET", "/whoami", rig.tokens["agent"],
                            headers={"X-Forwarded-User": "alice"})  # fmt: skip
    assert status == 200 and body["id"] == "sre-agent" and body["kind"] == "agent"


def test_expired_token_is_401(rig: Rig) -> None:
    token = rig.token("bob", "--kind", "human", "--ttl", "1s")
    time.sleep(1.2)
    before = rig.rows()
    status, body = rig.call("POST", "/actions", token, SCALE)
    assert status == 401 and body["error"]["type"] == "unauthenticated"
    unchanged(rig, before)


def test_revoked_token_is_401_from_the_next_request(rig: Rig) -> None:
    token = rig.token("carol", "--kind", "human")
    assert rig.call("GET", "/whoami", token)[0] == 200
    token_id = token.split("_")[1]
    done = run_cli(rig.env, "token", "revoke", token_id)
    assert done.returncode == 0, done.stderr
    before = rig.rows()
    status, _ = rig.call("POST", "/actions", token, SCALE)
    assert status == 401
    unchanged(rig, before)
    listed = run_cli(rig.env, "token", "list", "--all", "--json")
    assert token.split("_", 2)[2] not in listed.stdout  # secrets are never listed
    assert '"revoked"' in listed.stdout


# --- authorization through the gate ------------------------------------------------------


def test_agent_token_cannot_approve_even_with_a_forged_header(rig: Rig) -> None:
    proposed = rig.propose("bob", 9)
    action_id = proposed["action"]["id"]
    approvals = rig.rows()["approvals"]
    status, body = rig.call("POST", f"/actions/{action_id}/approve", rig.tokens["agent"],
                            {"comment": "lgtm"}, headers={"X-Forwarded-User": "alice"})  # fmt: skip
    assert status == 403
    assert body["error"]["codes"] == ["insufficient_permissions"]
    assert rig.rows()["approvals"] == approvals
    _, details = rig.call("GET", f"/actions/{action_id}", rig.tokens["alice"])
    assert details["action"]["state"] == "pending_approval"


def test_self_approval_through_the_api_is_refused(rig: Rig) -> None:
    proposed = rig.propose("alice", 10)
    status, body = rig.call("POST", f"/actions/{proposed['action']['id']}/approve",
                            rig.tokens["alice"], {})  # fmt: skip
    assert status == 403 and body["error"]["codes"] == ["self_approval"]


def test_cancel_by_neither_proposer_nor_approver_is_a_stored_refusal(rig: Rig) -> None:
    action_id = rig.propose("alice", 14)["action"]["id"]
    status, body = rig.call("POST", f"/actions/{action_id}/cancel", rig.tokens["dave"], {})
    assert status == 403 and body["error"]["codes"] == ["insufficient_permissions"]
    assert body["error"]["message"].startswith("cancel refused")
    _, details = rig.call("GET", f"/actions/{action_id}", rig.tokens["bob"])
    assert details["action"]["state"] == "pending_approval"
    refused = [d for d in details["decisions"] if d["phase"] == "authz"]
    assert len(refused) == 1 and refused[0]["input"]["principal"]["id"] == "dave"
    assert refused[0]["input"]["principal"]["method"] == "token"
    assert [e["kind"] for e in details["events"]][-1] == "authz.refused"


def test_agents_read_only_their_own_actions(rig: Rig) -> None:
    mine = rig.propose("agent", 11)
    human = rig.propose("bob", 12)
    status, _ = rig.call("GET", f"/actions/{mine['action']['id']}", rig.tokens["other_agent"])
    assert status == 404
    status, _ = rig.call("GET", f"/actions/{human['action']['id']}", rig.tokens["agent"])
    assert status == 404
    assert rig.call("GET", f"/actions/{mine['action']['id']}", rig.tokens["agent"])[0] == 200
    _, queue = rig.call("GET", "/queue", rig.tokens["other_agent"])
    assert all(a["proposer"]["id"] == "demo-agent" for a in queue)


# --- bad input: 400 naming the field, nothing stored -------------------------------------


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"{not json", "body"),
        (b"\xff\xfe\x00", "body"),
        (b"[1, 2, 3]", "proposal"),
        (b'"a string"', "proposal"),
        (b"[" * 100_000 + b"]" * 100_000, "body"),
        (b'{"action": "scale_deployment", "target": "checkout"}', None),
        (b'{"action": "drop table actions; --", "target": "x", "environment": "prod"}', None),
        (b" " * 1_000_001, "body"),
    ],
)
def test_malformed_proposals_are_400_and_store_nothing(
    rig: Rig, data: bytes, field: str | None
) -> None:
    before = rig.rows()
    status, body = rig.call("POST", "/actions", rig.tokens["agent"], data=data,
                            headers={"Content-Type": "application/json"})  # fmt: skip
    assert status == 400, body
    assert body["error"]["type"] == "invalid_input"
    if field is not None:
        assert body["error"]["field"] == field
    assert "\n" not in body["error"]["message"]
    unchanged(rig, before)


def test_bad_verb_bodies_are_400_and_store_nothing(rig: Rig) -> None:
    proposed = rig.propose("bob", 13)
    action_id = proposed["action"]["id"]
    before = rig.rows()
    for verb, body, field in [
        ("reject", {}, "reason"),
        ("reject", {"reason": 42}, "reason"),
        ("approve", {"comment": ["x"]}, "comment"),
        ("approve", {"comment": "x" * 2001}, "comment"),
        ("cancel", [1], "body"),
    ]:
        status, answer = rig.call("POST", f"/actions/{action_id}/{verb}", rig.tokens["alice"],
                                  body)  # fmt: skip
        assert status == 400, (verb, answer)
        assert answer["error"]["field"] == field
    unchanged(rig, before)


@pytest.mark.parametrize(
    "action_id", ["nope", "' OR 1=1 --", "%00", "..%2F..%2Fetc%2Fpasswd", "x" * 5000]
)
def test_unknown_or_hostile_action_ids_are_404(rig: Rig, action_id: str) -> None:
    before = rig.rows()
    status, body = rig.call("POST", f"/actions/{action_id}/approve", rig.tokens["alice"], {})
    assert status == 404, body
    status, _ = rig.call("GET", f"/actions/{action_id}", rig.tokens["alice"])
    assert status == 404
    unchanged(rig, before)


def test_my_actions_catalog_and_policy(rig: Rig) -> None:
    mine = rig.propose("other_agent", 15)["action"]["id"]
    status, listed = rig.call(
        "GET", "/my-actions?state=pending_approval", rig.tokens["other_agent"]
    )
    assert status == 200 and [a["id"] for a in listed] == [mine]
    assert {a["proposer"]["id"] for a in listed} == {"demo-agent"}
    status, catalog = rig.call("GET", "/catalog", rig.tokens["agent"])
    assert status == 200 and "scale_deployment" in [t["name"] for t in catalog["action_types"]]
    status, policy = rig.call("GET", "/policy", rig.tokens["agent"])
    assert status == 200 and policy["bundle_revision"].startswith("sha256:")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("state=bogus", "state"),
        ("state=pending_approval&state=%00", "state"),
        ("limit=0", "limit"),
        ("limit=-1", "limit"),
        ("limit=99999999999999999999", "limit"),
        ("limit=ten", "limit"),
        ("state=" + "x" * 5000, "query"),
    ],
)
def test_bad_list_queries_are_400(rig: Rig, query: str, field: str) -> None:
    status, body = rig.call("GET", f"/my-actions?{query}", rig.tokens["agent"])
    assert status == 400, body
    assert body["error"]["field"] == field


# --- the catalog as it is today ------------------------------------------------------------


def eventually(check: Any, what: str, timeout: float = 20.0) -> Any:
    """Poll until `check()` is truthy: the server looks at the catalog files at most once a
    second, so an edit shows up on a later request, not the next one."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.2)


def test_a_running_server_follows_catalog_edits_and_keeps_the_last_good_one(
    tmp_path: Path,
) -> None:
    catalog = tmp_path / "catalog"
    shutil.copytree(ROOT / "catalog", catalog)
    rig = Rig(tmp_path, catalog=catalog)
    token = rig.token("sre-agent", "--kind", "agent")
    rig.server.start()
    try:
        revision = rig.call("GET", "/catalog", token)[1]["catalog_revision"]
        restart = (catalog / "restart_service.yaml").read_text()
        (catalog / "restart_worker.yaml").write_text(
            restart.replace("name: restart_service", "name: restart_worker")
        )

        def edited() -> dict[str, Any] | None:
            body = rig.call("GET", "/catalog", token)[1]
            return body if body["catalog_revision"] != revision else None

        good = eventually(edited, "the edited catalog")
        assert "restart_worker" in [t["name"] for t in good["action_types"]]

        (catalog / "restart_worker.yaml").write_text("name: [broken\n")

        def refused() -> bool:
            rig.call("GET", "/catalog", token)  # a request is what makes the server look
            return metric(rig, "opsgate_catalog_reload_failures_total ") == 1

        eventually(refused, "the failed reload")
        status, body = rig.call("GET", "/catalog", token)
        assert status == 200 and body == good  # still up, still the last good catalog
        status, body = rig.call("POST", "/actions", token, SCALE)
        assert status == 201 and body["action"]["state"] == "pending_approval", body
    finally:
        rig.server.stop()
        rig.store.close()


# --- reads across actions: reports, audit trail, workers, prefixes ------------------------

READS = [
    ("GET", "/reports/summary", None),
    ("GET", "/audit/decisions", None),
    ("POST", "/audit/verify", {}),
    ("GET", "/workers", None),
    ("GET", "/resolve?prefix=01ABCDEF", None),
    ("GET", "/queue?mine_to_approve=1", None),
]


@pytest.mark.parametrize(("method", "path", "body"), READS)
def test_reads_need_credentials(rig: Rig, method: str, path: str, body: Any) -> None:
    status, answer = rig.call(method, path, None, body, headers={"X-Forwarded-User": "carol"})
    assert status == 401 and answer["error"]["type"] == "unauthenticated"


def test_reads_across_actions_are_for_governance_and_approvers(rig: Rig) -> None:
    for who in ("agent", "dave"):
        for method, path, body in READS[:4]:
            status, answer = rig.call(method, path, rig.tokens[who], body)
            assert status == 403, (who, path, answer)
            assert answer["error"]["codes"] == ["insufficient_permissions"]
    status, answer = rig.call("GET", "/reports/summary?format=json", rig.tokens["alice"])
    assert status == 200 and answer["format"] == "json"
    assert json.loads(answer["text"])["kind"] == "summary"
    # The scorecard through the server, narrowed as `opsgate report proposers --kind` does.
    path = "/reports/proposers?format=json&proposer_kind=agent&by=action"
    status, answer = rig.call("GET", path, rig.tokens["alice"])
    assert status == 200, answer
    scorecard = json.loads(answer["text"])
    assert scorecard["kind"] == "proposers" and scorecard["by"] == "action"
    status, answer = rig.call("GET", path, rig.tokens["agent"])
    assert status == 403 and answer["error"]["codes"] == ["insufficient_permissions"]
    status, answer = rig.call("GET", "/workers?all=1", rig.tokens["carol"])
    assert status == 200 and answer["workers"] == [] and answer["lease"] > 0


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/reports/summary?since=%00", "--since"),
        ("/reports/summary?since=1d%1b%5b2J", "--since"),
        ("/reports/summary?since=" + "9" * 300, "--since"),
        ("/reports/summary?since=1d&since=2d", "--since"),
        ("/reports/summary?where=tier%3Dx%27%20OR%201%3D1", "--where"),
        ("/reports/summary?" + "&".join(["where=tier%3Dx"] * 17), "--where"),
        ("/reports/summary?format=exe", "--format"),
        ("/reports/summary?min_runs=-1", "--min-runs"),
        ("/reports/summary?min_runs=99999999999", "--min-runs"),
        ("/reports/summary?by=proposer", "--by"),
        ("/reports/nosuch", "kind"),
        ("/reports/proposers?proposer_kind=robot", "--kind"),
        ("/reports/proposers?proposer_kind=agent%27%20OR%201%3D1", "--kind"),
        ("/reports/proposers?proposer_kind=agent&proposer_kind=human", "--kind"),
        ("/reports/proposers?proposer_kind=" + "a" * 300, "--kind"),
        ("/reports/summary?proposer_kind=agent", "--kind"),
        ("/reports/proposers?by=severity", "--by"),
        ("/reports/summary?x=" + "a" * 5000, "query"),
        ("/resolve?prefix=%27%20OR%201%3D1%20--", "action_id"),
        ("/resolve?prefix=01AB", "action_id"),
        ("/resolve", "action_id"),
        ("/resolve?prefix=" + "A" * 27, "action_id"),
        ("/queue?mine_to_approve=yes", "--mine-to-approve"),
        ("/workers?all=2", "--all"),
        ("/audit/decisions?format=xml", "--format"),
        ("/audit/decisions?since=never", "--since"),
    ],
)
def test_malformed_read_queries_are_400_naming_the_field(rig: Rig, path: str, field: str) -> None:
    before = rig.rows()
    status, answer = rig.call("GET", path, rig.tokens["alice"])
    assert status == 400, answer
    assert answer["error"]["field"] == field and "\n" not in answer["error"]["message"]
    assert rig.rows()["actions"] == before["actions"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"public_key": "not a key"}, "--public-key"),
        ({"public_key": 5}, "--public-key"),
        ({"public_key": "-----BEGIN PUBLIC KEY-----\n" + "A" * 20_000}, "--public-key"),
        ({"checkpoint": {"seq": 1}}, "checkpoint.hash"),
        ({"nosuch": 1}, "nosuch"),
        ([1, 2], "body"),
    ],
)
def test_malformed_audit_verify_bodies_are_400(rig: Rig, body: Any, field: str) -> None:
    status, answer = rig.call("POST", "/audit/verify", rig.tokens["alice"], body)
    assert status == 400 and answer["error"]["field"] == field, answer


def test_audit_verify_over_the_api(rig: Rig) -> None:
    status, answer = rig.call("POST", "/audit/verify", rig.tokens["alice"], {})
    assert status == 200 and answer["ok"] is True and answer["events"] > 0


def test_a_prefix_resolves_only_among_what_the_caller_may_read(rig: Rig) -> None:
    mine = rig.propose("agent", 21)["action"]["id"]
    theirs = rig.propose("alice", 22)["action"]["id"]
    status, answer = rig.call("GET", f"/resolve?prefix={mine[:14].lower()}", rig.tokens["agent"])
    assert status == 200 and answer == {"id": mine}
    status, answer = rig.call("GET", f"/resolve?prefix={theirs[:14]}", rig.tokens["agent"])
    assert status == 404
    status, answer = rig.call("GET", f"/resolve?prefix={theirs[:14]}", rig.tokens["dave"])
    assert status == 200 and answer == {"id": theirs}


def test_sigterm_stops_the_server_through_its_shutdown(rig: Rig) -> None:
    # Its shutdown hands over what its executor holds; the signal used to kill it first.
    server = ApiServer(rig.env)
    server.start()
    process = server.process
    assert process is not None and process.stderr is not None
    try:
        assert server.call("GET", "/healthz")[0] == 200
        process.terminate()
        code = process.wait(timeout=30)
        stderr = process.stderr.read()
    finally:
        server.stop()
    assert code == 0, stderr
    assert stderr.rstrip().endswith("opsgate server stopped"), stderr


def test_a_port_in_use_is_one_line_naming_listen(rig: Rig) -> None:
    done = run_cli(rig.env, "server", "--listen", f"127.0.0.1:{rig.server.port}")
    assert done.returncode == 2, done.stderr
    # One error line, and no claim that it listens (the session-secret note may precede it).
    assert done.stderr.splitlines()[-1].startswith("error: --listen: cannot listen on")
    assert "listening" not in done.stderr and "Traceback" not in done.stderr


# --- trust reset: the token's principal resets, nobody else -------------------------------

RESET = {"proposer": "sre-agent", "action_type": "restart_service",
         "reason": "postmortem INC-42 done"}  # fmt: skip


def trust_events(rig: Rig, kind: str) -> list[Any]:
    return [e for e in rig.store.audit_events() if e.kind == kind]


def test_a_lead_resets_trust_as_the_principal_of_the_token(rig: Rig) -> None:
    before = rig.rows()
    status, body = rig.call("POST", "/trust/reset", rig.tokens["carol"], RESET)
    assert status == 201, body
    assert body["reset_by"] == "carol" and body["proposer"] == "sre-agent"
    assert body["action_type"] == "restart_service" and body["reason"] == RESET["reason"]
    assert body["at"].endswith("Z") and body["at_precise"].startswith(body["at"][:19])
    after = rig.rows()
    assert after["trust_resets"] == before["trust_resets"] + 1
    assert after["audit_events"] == before["audit_events"] + 1
    [event] = [e for e in trust_events(rig, "trust.reset") if e.data["reset_id"] == body["id"]]
    assert event.actor == "carol" and event.action_id is None
    assert event.data["proposer"] == "sre-agent" and event.data["reason"] == RESET["reason"]
    status, verified = rig.call("POST", "/audit/verify", rig.tokens["alice"], {})
    assert status == 200 and verified["ok"] is True, verified


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"reset_by": "alice"}, "reset_by"),
        ({"actor": "alice"}, "actor"),
        ({"principal": {"id": "carol", "kind": "human"}}, "principal"),
        ({"reset_by": "carol", "actor": "carol"}, "actor"),
    ],
)
def test_a_body_naming_who_resets_is_refused(rig: Rig, extra: dict[str, Any], field: str) -> None:
    # dave (no reset role) naming carol, and carol naming alice: neither is believed.
    for who in ("dave", "carol"):
        before = rig.rows()
        status, body = rig.call("POST", "/trust/reset", rig.tokens[who], {**RESET, **extra})
        assert status == 400, body
        assert body["error"]["type"] == "invalid_input" and body["error"]["field"] == field
        assert "unknown field" in body["error"]["message"]
        unchanged(rig, before)


def test_a_forged_identity_header_does_not_change_who_resets(rig: Rig) -> None:
    before, spoofs = rig.rows(), metric(rig, "opsgate_api_proxy_header_spoofs_total")
    status, body = rig.call("POST", "/trust/reset", rig.tokens["dave"], RESET,
                            headers={"X-Forwarded-User": "carol"})  # fmt: skip
    assert status == 403 and body["error"]["codes"] == ["insufficient_permissions"], body
    assert metric(rig, "opsgate_api_proxy_header_spoofs_total") == spoofs + 1
    assert rig.rows()["trust_resets"] == before["trust_resets"]
    refusal = trust_events(rig, "authz.refused")[-1]
    assert refusal.actor == "dave" and refusal.data["verb"] == "trust_reset"
    status, body = rig.call("POST", "/trust/reset", rig.tokens["carol"], RESET,
                            headers={"X-Forwarded-User": "alice"})  # fmt: skip
    assert status == 201 and body["reset_by"] == "carol", body


@pytest.mark.parametrize(
    ("who", "body", "code", "says"),
    [
        ("agent", RESET, "insufficient_permissions", "only humans may trust_reset"),
        ("other_agent", {**RESET, "proposer": "demo-agent"}, "insufficient_permissions",
         "only humans"),
        ("alice", RESET, "insufficient_permissions", "needs one of the roles"),
        ("dave", RESET, "insufficient_permissions", "needs one of the roles"),
        ("carol", {**RESET, "proposer": "carol"}, "self_approval", "cannot reset its own"),
    ],
)  # fmt: skip
def test_trust_reset_refusals_are_403_and_recorded(
    rig: Rig, who: str, body: dict[str, str], code: str, says: str
) -> None:
    before = rig.rows()
    status, answer = rig.call("POST", "/trust/reset", rig.tokens[who], body)
    assert status == 403, answer
    assert answer["error"]["type"] == "refused" and code in answer["error"]["codes"]
    assert answer["error"]["message"].startswith("trust_reset refused: ")
    assert says in answer["error"]["message"] and "\n" not in answer["error"]["message"]
    after = rig.rows()
    assert after["trust_resets"] == before["trust_resets"]
    # The refusal is stored like any other: one authz decision, one audit event.
    assert after["decisions"] == before["decisions"] + 1
    assert after["audit_events"] == before["audit_events"] + 1
    refusal = trust_events(rig, "authz.refused")[-1]
    assert refusal.data["verb"] == "trust_reset" and refusal.data["method"] == "token"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"{not json", "body"),
        (b"\xff\xfe\x00", "body"),
        (b"[" * 100_000 + b"]" * 100_000, "body"),
        (b" " * 1_000_001, "body"),
        (b"[1, 2]", "body"),
        (b'"reset it"', "body"),
        (b"{}", "proposer"),
        (json.dumps({**RESET, "proposer": 7}).encode(), "proposer"),
        (json.dumps({**RESET, "action_type": ["restart_service"]}).encode(), "action_type"),
        (json.dumps({**RESET, "reason": None}).encode(), "reason"),
        (json.dumps({k: v for k, v in RESET.items() if k != "action_type"}).encode(),
         "action_type"),
        (json.dumps({k: v for k, v in RESET.items() if k != "reason"}).encode(), "reason"),
        (json.dumps({**RESET, "nosuch": 1}).encode(), "nosuch"),
        (json.dumps({**RESET, "reason": "r" * 2001}).encode(), "reason"),
        (json.dumps({**RESET, "reason": "   "}).encode(), "reason"),
        (json.dumps({**RESET, "proposer": ""}).encode(), "proposer"),
        (json.dumps({**RESET, "proposer": "sre agent"}).encode(), "proposer"),
        (json.dumps({**RESET, "proposer": "sre-agent\u001b[2J"}).encode(), "proposer"),
        (json.dumps({**RESET, "proposer": "sre-agent\u0000"}).encode(), "proposer"),
        (json.dumps({**RESET, "proposer": "a" * 129}).encode(), "proposer"),
        (json.dumps({**RESET, "action_type": "restart service"}).encode(), "action_type"),
        (json.dumps({**RESET, "action_type": "restart_service\n"}).encode(), "action_type"),
        (json.dumps({**RESET, "action_type": "restart_servcie"}).encode(), "action_type"),
        (json.dumps({**RESET, "action_type": "x'; DROP TABLE trust_resets; --"}).encode(),
         "action_type"),
    ],
)  # fmt: skip
def test_malformed_trust_resets_are_400_naming_the_field_and_store_nothing(
    rig: Rig, data: bytes, field: str
) -> None:
    before = rig.rows()
    status, body = rig.call("POST", "/trust/reset", rig.tokens["carol"], data=data,
                            headers={"Content-Type": "application/json"})  # fmt: skip
    assert status == 400, body
    assert body["error"]["type"] == "invalid_input" and body["error"]["field"] == field, body
    assert body["error"]["message"].startswith(f"{field}: ")
    assert "\n" not in body["error"]["message"]
    unchanged(rig, before)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Forwarded-User": "carol"},
        {"Authorization": "Bearer ogt_nope"},
        {"Authorization": "Bearer ogt_01aaaaaaaaaaaaaaaaaaaaaaaa_" + "A" * 43},
        {"Authorization": "Basic Y2Fyb2w6eA=="},
    ],
)
def test_a_trust_reset_without_valid_credentials_is_401(rig: Rig, headers: dict[str, str]) -> None:
    before = rig.rows()
    status, body = rig.call("POST", "/trust/reset", None, RESET, headers=headers)
    assert status == 401 and body["error"]["type"] == "unauthenticated", body
    unchanged(rig, before)
    # A real token of a lead with its secret changed is no better.
    forged = rig.tokens["carol"][:-4] + ("AAAA" if not rig.tokens["carol"].endswith("AAAA")
                                         else "BBBB")  # fmt: skip
    status, body = rig.call("POST", "/trust/reset", forged, RESET)
    assert status == 401
    unchanged(rig, before)
