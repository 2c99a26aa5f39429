"""The CLI as a client of `opsgate server` (OPSGATE_URL + OPSGATE_TOKEN): the same commands,
the same exit codes, no database on the client, and no identity it can assert."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.api_server import run_cli
from tests.integration.test_server import Rig

pytestmark = pytest.mark.integration

PROPOSE = [
    "propose", "scale_deployment", "--target", "web", "--env", "prod",
    "--param", "deployment=web", "--param", "replicas=4", "--reason", "p99 over SLO",
    "--incident", "INC-7", "--severity", "sev2", "--incident-class", "capacity",
    "--tier", "standard",
]  # fmt: skip


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = Rig(tmp_path_factory.mktemp("client"))
    rig.tokens = {
        "alice": rig.token("alice", "--kind", "human"),
        "dave": rig.token("dave", "--kind", "human"),
        "bob": rig.token("bob", "--kind", "human"),
        "agent": rig.token("sre-agent", "--kind", "agent"),
        "gina": rig.token("gina", "--kind", "human", "--group", "governance"),
        "carol": rig.token("carol", "--kind", "human"),  # sre-lead in the shipped data
    }
    rig.server.start()
    try:
        yield rig
    finally:
        rig.server.stop()
        rig.store.close()


class Client:
    """`opsgate` in an empty directory with only OPSGATE_URL and OPSGATE_TOKEN."""

    def __init__(self, rig: Rig, workdir: Path) -> None:
        self.rig = rig
        self.workdir = workdir

    def env(self, who: str, **extra: str) -> dict[str, str]:
        return {
            "OPSGATE_URL": self.rig.server.url,
            "OPSGATE_TOKEN": self.rig.tokens[who],
            "OPSGATE_CONFIG": str(self.workdir / "absent.toml"),
            **extra,
        }

    def run(self, who: str, *args: str, **extra: str) -> tuple[int, str, str]:
        done = run_cli(self.env(who, **extra), *args, cwd=self.workdir)
        return done.returncode, done.stdout, done.stderr

    def json(self, who: str, *args: str) -> Any:
        code, out, err = self.run(who, *args, "--json")
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def client(rig: Rig, tmp_path: Path) -> Iterator[Client]:
    yield Client(rig, tmp_path)
    # A client never creates a database of its own.
    assert not list(tmp_path.glob("*.db"))


def test_whoami_through_the_server(client: Client) -> None:
    answer = client.json("agent", "whoami")
    assert answer["id"] == "sre-agent" and answer["kind"] == "agent"
    assert answer["method"] == "token" and answer["server"] == client.rig.server.url
    code, out, _ = client.run("alice", "whoami")
    assert code == 0 and out.startswith("alice (human)") and "authenticated by token" in out


def test_propose_approve_show_queue_through_the_server(client: Client) -> None:
    proposed = client.json("agent", *PROPOSE)
    action_id = proposed["action"]["id"]
    assert proposed["action"]["proposer"] == {"id": "sre-agent", "kind": "agent"}
    assert action_id in [a["id"] for a in client.json("alice", "queue")]
    code, out, _ = client.run("alice", "queue")
    assert code == 0 and "1 waiting for approval" in out
    # The agent has no verified passes of the type: one approval more than a human needs.
    assert proposed["action"]["required_approvals"] == 2
    first = client.json("alice", "approve", action_id, "--comment", "ok")
    assert first["counted"] is True and first["action"]["state"] == "pending_approval"
    approved = client.json("bob", "approve", action_id, "--comment", "ok too")
    assert approved["counted"] is True and approved["action"]["state"] == "approved"
    shown = client.json("alice", "show", action_id)
    assert [a["approver"]["id"] for a in shown["approvals"]] == ["alice", "bob"]
    code, out, _ = client.run("alice", "show", action_id)
    assert code == 0 and action_id in out and "approved" in out
    code, out, err = client.run("alice", "cancel", action_id, "--reason", "not needed")
    assert code == 0, err
    assert client.json("alice", "show", action_id)["action"]["state"] == "cancelled"


def test_show_plans_with_the_servers_catalog_not_the_clients(client: Client) -> None:
    # The client runs in an empty directory: it has no catalog of its own.
    action_id = client.json("agent", *PROPOSE[:9], "replicas=6", *PROPOSE[10:])["action"]["id"]
    shown = client.json("alice", "show", action_id)
    assert set(shown["plan"]["steps"]) == {"capture", "run", "undo"}
    assert "--replicas=6" in shown["plan"]["steps"]["run"]["argv"]
    code, out, err = client.run("alice", "show", action_id)
    assert code == 0, err
    assert "not in today's catalog" not in out and "--replicas=6" in out


def test_exit_codes_match_local_mode(client: Client) -> None:
    action_id = client.json("alice", *PROPOSE[:9], "replicas=5", *PROPOSE[10:])["action"]["id"]
    before = client.rig.rows()
    code, _, err = client.run("agent", "approve", action_id)
    assert code == 3 and err.startswith("error: approve refused") and err.count("\n") == 1
    code, _, err = client.run("dave", "reject", action_id, "--reason", "no")
    assert code == 3 and "insufficient_permissions" not in err and err.count("\n") == 1
    code, _, err = client.run("alice", "approve", "01NOSUCHACTION000000000000")
    assert code == 4, err
    too_many = [*PROPOSE[:9], "replicas=9000", *PROPOSE[10:]]
    code, _, err = client.run("agent", *too_many)
    assert code == 2 and "params" in err and err.count("\n") == 1
    after = client.rig.rows()
    assert after["actions"] == before["actions"] and after["approvals"] == before["approvals"]


def test_a_bad_token_is_refused_in_one_line(client: Client) -> None:
    before = client.rig.rows()
    for token in ("ogt_nope", client.rig.tokens["alice"][:-2] + "zz"):
        code, _, err = client.run("alice", *PROPOSE, OPSGATE_TOKEN=token)
        assert code == 3 and "invalid or expired credentials" in err and err.count("\n") == 1
    assert client.rig.rows() == before


def test_no_identity_can_be_asserted_by_a_client(client: Client) -> None:
    before = client.rig.rows()
    code, _, err = client.run("agent", *PROPOSE, OPSGATE_IDENTITY="env", OPSGATE_USER="alice",
                              OPSGATE_USER_KIND="human")  # fmt: skip
    assert code == 2 and "OPSGATE_IDENTITY=env is refused" in err
    assert client.rig.rows() == before
    # OPSGATE_USER, LOGNAME and USER alone change nothing: the token decides.
    code, out, _ = client.run("agent", "whoami", "--json", OPSGATE_USER="alice",
                              LOGNAME="alice", USER="alice")  # fmt: skip
    assert code == 0 and json.loads(out)["id"] == "sre-agent"
    # An opsgate.toml in the working directory does not either.
    (client.workdir / "opsgate.toml").write_text('identity = "env"\nuser = "alice"\n')
    code, out, err = client.run("agent", "whoami", "--json", OPSGATE_CONFIG="")
    assert code == 0, err
    assert json.loads(out)["id"] == "sre-agent"


def test_store_commands_refuse_in_client_mode(client: Client) -> None:
    for args in (["init"], ["worker", "--once"], ["audit", "export"], ["list"]):
        code, _, err = client.run("alice", *args, OPSGATE_PROMETHEUS_URL="http://127.0.0.1:9")
        assert code == 2 and "OPSGATE_URL is set" in err, (args, err)
    # run goes to the server, which knows no such action
    code, _, err = client.run("alice", "run", "01NOSUCHACTION000000000000")
    assert code == 4, err


def test_a_server_without_prometheus_says_the_setting_is_the_servers(client: Client) -> None:
    action_id = client.json("agent", *proposal(21))["action"]["id"]
    client.json("alice", "approve", action_id)
    client.json("bob", "approve", action_id)  # the agent is on the trust ladder's probation
    code, _, err = client.run("alice", "run", action_id)
    assert code == 1 and err.count("\n") == 1
    assert "server's own settings" in err and "OPSGATE_PROMETHEUS_URL" in err
    assert client.json("alice", "show", action_id)["action"]["state"] == "approved"


@pytest.mark.parametrize(
    "url",
    [
        "http://db.internal:8700",
        "ftp://127.0.0.1:8700",
        "127.0.0.1:8700",
        "http://",
        "http://127.0.0.1:99999",
        "http://127.0.0.1:0",
        "http://127.0.0.1:port",
        "http://alice:secret@127.0.0.1:8700",
        "http://127.0.0.1:8700/?next=evil",
        "http://127.0.0.1:8700/#x",
    ],
)
def test_bad_server_urls_are_refused(client: Client, url: str) -> None:
    code, _, err = client.run("alice", "whoami", OPSGATE_URL=url)
    assert code == 2 and "OPSGATE_URL" in err and err.count("\n") == 1


# --- reads across actions, short ids, the approver's queue ---------------------------------


def proposal(replicas: int) -> list[str]:
    """PROPOSE on a target of its own: an approved action on a target blocks new ones."""
    target = f"web-{replicas}"
    return [*PROPOSE[:3], target, *PROPOSE[4:7], f"deployment={target}", "--param",
            f"replicas={replicas}", *PROPOSE[10:]]  # fmt: skip


# A fixed window: the local and the remote run must print byte for byte the same.
WINDOW = ["--since", "2020-01-01", "--until", "2099-01-01"]


def test_reports_through_the_server_print_what_local_mode_prints(client: Client) -> None:
    client.json("agent", *proposal(7))
    for fmt in ("table", "json", "csv", "markdown", "html"):
        for kind in ("summary", "blocks"):
            code, remote, err = client.run("gina", "report", kind, *WINDOW, "--format", fmt)
            assert code == 0, err
            local = run_cli(client.rig.env, "report", kind, *WINDOW, "--format", fmt)
            assert local.returncode == 0, local.stderr
            assert remote == local.stdout, (kind, fmt)
    # The scorecard's rungs come from the server's gate: the same bundle, the same words.
    scorecard = ["report", "proposers", *WINDOW, "--kind", "agent", "--by", "action", "--json"]
    code, remote, err = client.run("gina", *scorecard)
    assert code == 0, err
    local = run_cli(client.rig.env, *scorecard)
    assert local.returncode == 0, local.stderr
    assert remote == local.stdout
    assert {r["proposer"] for r in json.loads(remote)["tables"][0]["rows"]} == {"sre-agent"}
    code, out, err = client.run("alice", "report", "approvals", *WINDOW, "--json",
                                "--by", "environment", "--table", "approvals")  # fmt: skip
    assert code == 0, err
    assert [t["name"] for t in json.loads(out)["tables"]] == ["approvals"]
    written = client.workdir / "report.md"
    code, _, err = client.run("gina", "report", *WINDOW, "-o", str(written))
    assert code == 0 and written.read_text().startswith("## "), err


def test_reports_and_trails_are_refused_to_agents_and_people_without_the_role(
    client: Client,
) -> None:
    before = client.rig.rows()
    for who in ("agent", "dave"):
        for args in (["report"], ["audit", "verify"], ["audit", "decisions"], ["workers"]):
            code, out, err = client.run(who, *args)
            assert code == 3 and "report refused" in err and err.count("\n") == 1, (who, args)
            assert out == ""
    after = client.rig.rows()
    # Each refusal is a stored decision with its audit event; nothing else changed.
    assert after["actions"] == before["actions"]
    assert after["decisions"] == before["decisions"] + 8


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--where", "environment=prod\x1b[2J"], "--where"),
        (["--where", "nosuch=1"], "--where"),
        (["--where", "environment=" + "p" * 300], "--where"),
        (["--since", "yesterday; DROP TABLE actions"], "--since"),
        (["--since", "9" * 400], "--since"),
        (["--since", "1d", "--until", "2d"], "--since"),
        (["--by", "code"], "--by"),
        (["--table", "nosuch"], "--table"),
        (["--kind", "agent"], "--kind"),
        (["proposers", "--by", "severity"], "--by"),
    ],
)
def test_bad_report_requests_exit_2_naming_the_option(
    client: Client, args: list[str], field: str
) -> None:
    before = client.rig.rows()
    code, out, err = client.run("gina", "report", *args)
    assert code == 2 and field in err and err.count("\n") == 1, err
    assert out == ""
    assert client.rig.rows()["actions"] == before["actions"]


def test_audit_verify_and_decisions_through_the_server(client: Client, tmp_path: Path) -> None:
    client.json("agent", *proposal(8))
    code, out, err = client.run("gina", "audit", "verify")
    assert code == 0 and out.startswith("audit chain ok: "), err
    verified = client.json("gina", "audit", "verify")
    assert verified["ok"] is True and verified["events"] > 0
    local = run_cli(client.rig.env, "audit", "decisions", *WINDOW, "--format", "jsonl")
    code, remote, err = client.run("gina", "audit", "decisions", *WINDOW, "--format", "jsonl")
    assert code == 0, err
    assert remote == local.stdout and remote.count("\n") >= 1
    code, out, err = client.run("gina", "audit", "decisions", *WINDOW)
    assert code == 0 and all(json.loads(line)["decision_id"] for line in out.splitlines())
    # A public key that is not one is refused here, before anything is sent.
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    code, _, err = client.run("gina", "audit", "verify", "--public-key", str(junk))
    assert code == 2 and "--public-key" in err


def test_audit_verify_checks_a_real_key_through_the_server(client: Client, tmp_path: Path) -> None:
    private, public = tmp_path / "audit.key", tmp_path / "audit.pub"
    done = run_cli({}, "audit", "keygen", "--private-key", str(private),
                   "--public-key", str(public))  # fmt: skip
    assert done.returncode == 0, done.stderr
    code, out, err = client.run("gina", "audit", "verify", "--public-key", str(public), "--json")
    # No checkpoint was ever signed with this key: a note, or a problem; never a crash.
    assert code in (0, 5), err
    assert isinstance(json.loads(out)["ok"], bool)


def test_workers_through_the_server(client: Client) -> None:
    assert client.json("alice", "workers", "--all") == []
    code, out, err = client.run("alice", "workers")
    assert code == 0 and "workers (lease" in out, err


def test_short_ids_resolve_through_the_server(client: Client) -> None:
    mine = client.json("agent", *proposal(11))["action"]["id"]
    shown = client.json("alice", "show", mine[:12].lower())
    assert shown["action"]["id"] == mine
    code, out, err = client.run("alice", "approve", mine[:12], "--json")
    assert code == 0 and json.loads(out)["action"]["id"] == mine, err
    # Another principal's action does not exist for an agent, by prefix either.
    theirs = client.json("alice", *proposal(12))["action"]["id"]
    code, _, err = client.run("agent", "show", theirs[:12])
    assert code == 4 and "no action" in err
    code, _, _ = client.run("agent", "show", mine[:12])
    assert code == 0


@pytest.mark.parametrize(
    "prefix",
    ["01AB", "01ABC!'--", "' OR 1=1 --", "%2e%2e%2fqueue", "X" * 27, "01AB\x1bCDEF", ""],
)
def test_malformed_prefixes_exit_2_naming_the_argument(client: Client, prefix: str) -> None:
    code, out, err = client.run("alice", "show", prefix)
    assert out == ""
    assert code == 2 and "action_id" in err and err.count("\n") == 1, err
    code, _, err = client.run("alice", "audit", "export", "--action", prefix)
    assert code == 2, err


def test_an_ambiguous_prefix_exits_2_naming_the_field(client: Client) -> None:
    first = client.json("agent", *proposal(13))["action"]["id"]
    second = client.json("agent", *proposal(14))["action"]["id"]
    common = 0
    while first[common] == second[common]:
        common += 1
    if common < 6:
        pytest.skip("the two ids differ within the shortest prefix")
    code, _, err = client.run("alice", "show", first[:6])
    assert code == 2 and "action_id" in err and "ambiguous" in err, err


def test_queue_mine_to_approve_through_the_server(client: Client) -> None:
    action_id = client.json("agent", *proposal(15))["action"]["id"]
    assert action_id in [a["id"] for a in client.json("alice", "queue", "--mine-to-approve")]
    # dave has no approver role in prod; an agent approves nothing.
    assert action_id not in [a["id"] for a in client.json("dave", "queue", "--mine-to-approve")]
    assert client.json("agent", "queue", "--mine-to-approve") == []
    code, out, _ = client.run("agent", "queue", "--mine-to-approve")
    assert code == 0 and "nothing you may approve waits" in out
    client.json("alice", "approve", action_id)
    assert action_id not in [a["id"] for a in client.json("alice", "queue", "--mine-to-approve")]


# --- trust reset through the server ------------------------------------------------------

RESET = ["trust", "reset", "--proposer", "sre-agent", "--action-type", "restart_service"]
STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def local(client: Client, user: str, *args: str) -> tuple[int, str, str]:
    """The same command on the server's own store, as `user` (OPSGATE_IDENTITY=env: SQLite)."""
    env = {**client.rig.env, "OPSGATE_IDENTITY": "env", "OPSGATE_USER": user,
           "OPSGATE_USER_KIND": "human"}  # fmt: skip
    done = run_cli(env, *args)
    return done.returncode, done.stdout, done.stderr


def test_trust_reset_through_the_server_prints_what_local_mode_prints(client: Client) -> None:
    store = client.rig.store
    before = store.row_counts()
    reason = ["--reason", "postmortem INC-7: ratio fixed"]
    remote = client.json("carol", *RESET, *reason)
    code, out, err = local(client, "carol", *RESET, *reason, "--json")
    assert code == 0, err
    here = json.loads(out)
    assert list(remote) == list(here)  # the same keys, in the same order
    assert {k: v for k, v in remote.items() if k not in ("id", "at")} == {
        k: v for k, v in here.items() if k not in ("id", "at")
    }
    assert remote["reset_by"] == "carol" and STAMP.fullmatch(remote["at"])
    code, remote_text, err = client.run("carol", *RESET, *reason)
    assert code == 0, err
    code, local_text, err = local(client, "carol", *RESET, *reason)
    assert code == 0, err
    assert STAMP.sub("T", remote_text) == STAMP.sub("T", local_text)
    assert remote_text.startswith("trust reset for sre-agent on restart_service by carol at ")
    assert remote_text.count("\n") == 1

    # Stored as the token's principal, with its audit event; the chain still verifies.
    assert store.row_counts()["trust_resets"] == before["trust_resets"] + 4
    [event] = [e for e in store.audit_events()
               if e.kind == "trust.reset" and e.data["reset_id"] == remote["id"]]  # fmt: skip
    assert event.actor == "carol" and event.data["reason"] == reason[1]
    code, out, err = client.run("carol", "audit", "verify")
    assert code == 0 and out.startswith("audit chain ok: "), err
    done = run_cli(client.rig.env, "audit", "verify")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("who", "proposer"),
    [("agent", "sre-agent"), ("alice", "sre-agent"), ("dave", "sre-agent"), ("carol", "carol")],
)
def test_trust_reset_refusals_match_local_mode(client: Client, who: str, proposer: str) -> None:
    before = client.rig.rows()
    args = [*RESET[:3], proposer, *RESET[4:], "--reason", "let me"]
    code, out, err = client.run(who, *args)
    assert code == 3 and out == "" and err.count("\n") == 1, err
    assert err.startswith("error: trust_reset refused: ")
    if who != "agent":  # locally, OPSGATE_USER_KIND=human: the same words
        local_code, _, local_err = local(client, proposer if who == "carol" else who, *args)
        assert (local_code, local_err) == (code, err)
    assert client.rig.rows()["trust_resets"] == before["trust_resets"]


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ([*RESET, "--reason", ""], "reason"),
        ([*RESET, "--reason", "  "], "reason"),
        ([*RESET, "--reason", "r" * 2001], "reason"),
        ([*RESET[:3], "sre agent", *RESET[4:], "--reason", "r"], "proposer"),
        ([*RESET[:3], "sre-agent\x1b[2J", *RESET[4:], "--reason", "r"], "proposer"),
        ([*RESET[:3], "", *RESET[4:], "--reason", "r"], "proposer"),
        ([*RESET[:5], "restart_servcie", "--reason", "r"], "action_type"),
        ([*RESET[:5], "restart\tservice", "--reason", "r"], "action_type"),
    ],
)
def test_bad_trust_resets_exit_2_naming_the_field_as_local_mode_does(
    client: Client, args: list[str], field: str
) -> None:
    before = client.rig.rows()
    code, out, err = client.run("carol", *args)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"error: {field}: "), err
    assert (code, err) == local(client, "carol", *args)[::2]
    assert client.rig.rows() == before


def test_trust_reset_with_a_bad_token_is_refused_in_one_line(client: Client) -> None:
    before = client.rig.rows()
    for token in ("ogt_nope", client.rig.tokens["carol"][:-2] + "zz"):
        code, _, err = client.run("carol", *RESET, "--reason", "r", OPSGATE_TOKEN=token)
        assert code == 3 and "invalid or expired credentials" in err and err.count("\n") == 1
    assert client.rig.rows() == before
