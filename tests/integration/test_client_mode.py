"""The CLI as a client of `opsgate server` (OPSGATE_URL + OPSGATE_TOKEN): the same commands,
the same exit codes, no database on the client, and no identity it can assert."""

from __future__ import annotations

import json
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
        "agent": rig.token("sre-agent", "--kind", "agent"),
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
    approved = client.json("alice", "approve", action_id, "--comment", "ok")
    assert approved["counted"] is True and approved["action"]["state"] == "approved"
    shown = client.json("alice", "show", action_id)
    assert [a["approver"]["id"] for a in shown["approvals"]] == ["alice"]
    code, out, _ = client.run("alice", "show", action_id)
    assert code == 0 and action_id in out and "approved" in out
    code, out, err = client.run("alice", "cancel", action_id, "--reason", "not needed")
    assert code == 0, err
    assert client.json("alice", "show", action_id)["action"]["state"] == "cancelled"


def test_exit_codes_match_local_mode(client: Client) -> None:
    action_id = client.json("alice", *PROPOSE[:9], "replicas=5", *PROPOSE[10:])["action"]["id"]
    before = client.rig.rows()
    code, _, err = client.run("agent", "approve", action_id)
    assert code == 3 and err.startswith("error: approve refused") and err.count("\n") == 1
    code, _, err = client.run("dave", "reject", action_id, "--reason", "no")
    assert code == 3 and "insufficient_permissions" not in err and err.count("\n") == 1
    code, _, err = client.run("alice", "approve", "01NOSUCHACTION0000000000000")
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
    for args in (["workers"], ["audit", "verify"], ["init"], ["worker", "--once"]):
        code, _, err = client.run("alice", *args, OPSGATE_PROMETHEUS_URL="http://127.0.0.1:9")
        assert code == 2 and "OPSGATE_URL is set" in err, (args, err)
    # run goes to the server, which knows no such action
    code, _, err = client.run("alice", "run", "01NOSUCHACTION0000000000000")
    assert code == 4, err


@pytest.mark.parametrize(
    "url", ["http://db.internal:8700", "ftp://127.0.0.1:8700", "127.0.0.1:8700", "http://"]
)
def test_bad_server_urls_are_refused(client: Client, url: str) -> None:
    code, _, err = client.run("alice", "whoami", OPSGATE_URL=url)
    assert code == 2 and "OPSGATE_URL" in err and err.count("\n") == 1
