"""`opsgate list`/`get`, short ids everywhere an id is taken, and concurrent_action naming
the action that holds the target: through the real CLI over SQLite."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from opsgate.cli.live import PlainView
from opsgate.executor.executor import ExecutorEvent
from opsgate.models import ActionState
from tests.unit.test_cli import SCALE, Cli

RESTART = ["propose", "restart_service", "--env", "staging", "--reason", "stuck pods"]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Cli:
    runner = Cli(monkeypatch, capsys, tmp_path / "opsgate.db")
    monkeypatch.delenv("COLUMNS", raising=False)
    code, _, err = runner("init")
    assert code == 0, err
    return runner


def restart(cli: Cli, target: str) -> str:
    document = cli.json(*RESTART, "--target", target, "--param", f"deployment={target}")
    return str(document["action"]["id"])


def approve(cli: Cli, action_id: str) -> None:
    cli.as_user("bob")
    code, _, err = cli("approve", action_id)
    assert code == 0, err
    cli.as_user("alice")


def table_ids(out: str) -> list[str]:
    """The ID cell of each row (other columns may fold onto continuation lines)."""
    return [m.group(0) for m in re.finditer(r"^[0-9A-Z]{8,26}(?= )", out, re.MULTILINE)]


def test_list_newest_first_with_filters(cli: Cli) -> None:
    scale = cli.json(*SCALE)["action"]["id"]
    web = restart(cli, "web")
    cli.as_user("carol")
    api = restart(cli, "api")
    cli.as_user("alice")
    approve(cli, web)

    assert [a["id"] for a in cli.json("list")] == [api, web, scale]
    assert [a["id"] for a in cli.json("get", "--limit", "2")] == [api, web]
    assert [a["id"] for a in cli.json("list", "--state", "active")] == [web]
    assert [a["id"] for a in cli.json("list", "--state", "APPROVED")] == [web]
    assert [a["id"] for a in cli.json("list", "--state", "pending,active")] == [api, web, scale]
    assert [a["id"] for a in cli.json("list", "--state", "finished")] == []
    assert [a["id"] for a in cli.json("list", "--env", "prod")] == [scale]
    assert [a["id"] for a in cli.json("list", "--action", "restart_service")] == [api, web]
    assert [a["id"] for a in cli.json("list", "--target", "api", "--target", "checkout")] == [
        api,
        scale,
    ]
    assert [a["id"] for a in cli.json("list", "--proposer", "carol")] == [api]
    assert [a["id"] for a in cli.json("list", "--mine")] == [web, scale]
    assert [a["id"] for a in cli.json("list", "--since", "1h")] == [api, web, scale]
    assert [a["id"] for a in cli.json("list", "--since", "2999-01-01")] == []
    code, out, err = cli("list", "--target", "nothing-here")
    assert code == 0 and out == "" and "no actions match" in err


def test_list_table_shows_short_ids_the_commands_accept(cli: Cli) -> None:
    ids = [restart(cli, f"svc-{n}") for n in range(3)]
    code, out, _ = cli("list")
    assert code == 0 and out.splitlines()[0].split()[:2] == ["ID", "ACTION"]
    shown = table_ids(out)
    assert len(shown) == 3
    for short, full in zip(shown, reversed(ids), strict=True):
        assert 8 <= len(short) < len(full) and full.startswith(short)
        code, out, err = cli("show", short.lower(), "--json")
        assert code == 0, err
        assert f'"id": "{full}"' in out
    code, out, _ = cli("list", "--wide")
    assert table_ids(out) == list(reversed(ids))


@pytest.mark.parametrize("columns", [80, 120])
def test_id_column_never_wraps(cli: Cli, monkeypatch: pytest.MonkeyPatch, columns: int) -> None:
    long_target = "a-very-long-service-name-" + "x" * 30
    ids = [restart(cli, long_target), restart(cli, "web")]
    monkeypatch.setenv("COLUMNS", str(columns))
    for extra in ([], ["--wide"]):
        code, out, _ = cli("list", *extra)
        assert code == 0
        lines = out.splitlines()
        assert all(len(line.rstrip()) <= columns for line in lines), out
        shown = table_ids(out)
        assert len(shown) == 2, out
        for short, full in zip(shown, reversed(ids), strict=True):
            assert full.startswith(short)
            assert short == full if extra else len(short) >= 8


def test_every_id_taking_command_accepts_a_prefix(cli: Cli) -> None:
    first = restart(cli, "web")
    second = restart(cli, "api")
    third = restart(cli, "db")
    cli.as_user("bob")
    code, out, err = cli("approve", first[:13].lower())
    assert code == 0 and first in out, err
    code, out, err = cli("reject", second[:13], "--reason", "not now")
    assert code == 0 and second in out, err
    cli.as_user("alice")
    code, out, err = cli("cancel", first[:13])
    assert code == 0 and first in out, err
    code, out, _ = cli("audit", "export", "--action", third[:13].lower())
    assert code == 0 and out and all(third in line for line in out.splitlines())


def test_bad_ids_are_refused_with_the_right_exit_code(cli: Cli) -> None:
    first = restart(cli, "web")
    second = restart(cli, "api")
    common = len(re.match(r"(.*).*\n\1", f"{first}\n{second}").group(1))  # type: ignore[union-attr]
    before = cli.rows()
    if common >= 6:  # same-second proposals share a prefix: it must not pick either
        code, _, err = cli("approve", first[:common])
        assert code == 2 and "ambiguous" in err and first in err and second in err
    for bad, problem in (
        (first[:5], "too short"),
        (first[:8] + "%", "not an action id"),
        (first[:8] + "'; --", "not an action id"),
        ("\x1b[31m" + first[:8], "not an action id"),
        (first + "0", "longer than an action id"),
    ):
        for command in (["show"], ["approve"], ["cancel"], ["run"], ["rollback"]):
            code, _, err = cli(*command, bad)
            assert code == 2, (command, bad, err)
            assert problem in err and err.count("\n") == 1 and "\x1b" not in err
    code, _, err = cli("audit", "export", "--action", "ab")
    assert code == 2 and "--action: 'ab' is too short" in err
    code, _, err = cli("show", "7ZZZZZZZ")
    assert code == 4 and "no action 7ZZZZZZZ" in err
    # No Prometheus is configured: an unknown id is still "not found", not a config error.
    code, _, err = cli("rollback", "7ZZZZZZZZZ", "--reason", "x")
    assert code == 4, err
    assert cli.rows() == before


def test_bad_list_input_is_exit_2_and_stores_nothing(cli: Cli) -> None:
    restart(cli, "web")
    before = cli.rows()
    for args, field in (
        (["--state", "actve"], "--state"),
        (["--since", "yesterday"], "--since"),
        (["--since", "9999999w"], "--since"),
        (["--limit", "0"], "--limit"),
        (["--limit", "100001"], "--limit"),
        (["--limit", "x"], "--limit"),
        (["--env", "prod\x1b[2J"], "--env"),
        (["--target", "x" * 300], "--target"),
        (["--env", ""], "--env"),
        (["--mine", "--proposer", "bob"], "--mine"),
    ):
        code, out, err = cli("list", *args)
        assert code == 2, (args, err)
        assert field in err and out == "" and "\x1b" not in err
    code, _, err = cli("list", "--state", "actve")
    assert "did you mean 'active'" in err
    # Injection attempts are plain values that match nothing.
    for value in ("' OR '1'='1", "%", "prod; DROP TABLE actions"):
        assert cli.json("list", "--env", value) == []
    assert cli.rows() == before


def test_concurrent_action_names_the_holder(cli: Cli) -> None:
    first = cli.json(*SCALE)["action"]["id"]
    approve(cli, first)
    code, out, _ = cli(*SCALE)
    assert code == 3
    assert "concurrent_action" in out and f"held by {first} (approved)" in out
    blocked = cli.json("list", "--state", "blocked")[0]["id"]
    code, out, _ = cli("show", blocked)
    assert f"held by {first} (approved)" in out
    assert [a["id"] for a in cli.json("list", "--state", "active")] == [first]


def test_worker_log_lines_carry_an_id_show_accepts(
    cli: Cli, capsys: pytest.CaptureFixture[str]
) -> None:
    action_id = restart(cli, "web")
    capsys.readouterr()
    PlainView(prefix_ids=True)(ExecutorEvent("claimed", action_id, "claimed by w1"))
    line = capsys.readouterr().out.strip()
    datetime.strptime(line.split()[0], "%H:%M:%S").replace(tzinfo=UTC)
    logged = line.split()[1]
    assert logged != action_id and action_id.startswith(logged)
    code, out, err = cli("show", logged, "--json")
    assert code == 0 and action_id in out, err


def test_queue_shows_progress_time_left_and_reason(cli: Cli) -> None:
    critical = [a if a != "standard" else "critical" for a in SCALE]
    two = cli.json(*critical)["action"]["id"]
    one = restart(cli, "web")
    cli.as_user("bob")
    assert cli("approve", two)[0] == 0
    queue = {a["id"]: a for a in cli.json("queue")}
    assert queue[two]["approvals"] == {"count": 1, "required": 2, "by": ["bob"]}
    assert queue[one]["approvals"] == {"count": 0, "required": 1, "by": []}
    assert 3500 <= queue[two]["expires_in_seconds"] <= 3600
    code, out, _ = cli("queue")
    assert code == 0 and "2 waiting for approval" in out
    line = next(line for line in out.splitlines() if line.startswith(two[:8]))
    assert "1 of 2" in line and "59m" in line and "p99 latency" in out


def test_queue_mine_to_approve_is_what_approve_would_accept(cli: Cli) -> None:
    critical = [a if a != "standard" else "critical" for a in SCALE]
    two = cli.json(*critical)["action"]["id"]
    one = restart(cli, "web")

    def mine(user: str, kind: str = "human") -> list[str]:
        cli.as_user(user, kind)
        return [a["id"] for a in cli.json("queue", "--mine-to-approve")]

    assert mine("alice") == []  # never your own
    assert mine("bob") == [two, one]
    assert mine("sre-agent", "agent") == []  # agents never approve
    assert mine("dave") == []  # a developer: the approval rule says no
    cli.as_user("bob")
    assert cli("approve", two)[0] == 0
    assert mine("bob") == [one]  # counted once: nothing more for bob there
    assert mine("carol") == [two, one]
    code, out, _ = cli("queue", "--mine-to-approve")
    assert code == 0 and "2 you may approve" in out
    cli.as_user("dave")
    code, out, _ = cli("queue", "--mine-to-approve")
    assert code == 0 and out.strip() == "nothing you may approve waits"
    # Every listed action is one `approve` accepts from that user.
    cli.as_user("carol")
    for action_id in mine("carol"):
        assert cli("approve", action_id)[0] == 0


def test_list_warns_about_filter_values_nobody_knows(cli: Cli) -> None:
    restart(cli, "web")
    code, out, err = cli("list", "--env", "stagng", "--action", "restart_servce", "--json")
    assert code == 0 and json.loads(out) == []
    assert "warning: --env 'stagng' is not known to the policy bundle" in err
    assert "did you mean 'staging'" in err and "did you mean 'restart_service'" in err
    code, out, err = cli("list", "--env", "staging", "--action", "restart_service")
    assert code == 0 and err == "" and "restart_service" in out


def test_show_watch_follows_to_the_end_like_watch(cli: Cli) -> None:
    action_id = restart(cli, "web")
    assert cli("cancel", action_id[:10])[0] == 0
    code, out, err = cli("show", action_id[:10], "--watch")
    assert code == 1 and f"action {action_id} cancelled" in err
    assert "action.cancelled -> cancelled by alice" in out


def test_watch_refuses_a_bad_interval(cli: Cli) -> None:
    action_id = restart(cli, "web")
    for interval in ("0", "-1", "nan", "1e9", "soon"):
        code, out, err = cli("watch", action_id, "--interval", interval)
        assert code == 2 and "--interval" in err and out == ""


def test_workers_table_prints_lease_ids_the_commands_accept(cli: Cli) -> None:
    from opsgate.models import WorkerInfo
    from opsgate.store.sql import SqlStore
    from opsgate.testing import make_action, make_execution, utcnow

    store = SqlStore(f"sqlite:///{cli.db}")
    try:
        action = make_action(state=ActionState.VERIFYING)
        now = utcnow()
        with store.transaction() as tx:
            tx.insert_action(action)
            tx.insert_execution(make_execution(action.id, worker_id="w1"))
        store.register_worker(
            WorkerInfo(id="w1", hostname="h", pid=1, started_at=now, heartbeat_at=now)
        )
        assert store.get_execution(action.id) is not None
    finally:
        store.close()
    cli.monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = cli("workers")
    assert code == 0
    shown = re.search(r"\b([0-9A-Z]{13}) checkout", out)
    assert shown is not None, out
    assert action.id.startswith(shown.group(1))
    code, out, err = cli("show", shown.group(1), "--json")
    assert code == 0 and action.id in out, err


def test_worker_refuses_a_poll_of_nan_seconds(cli: Cli) -> None:
    before = cli.rows()
    code, out, err = cli("worker", "--once", "--poll", "nan")
    assert code == 2 and "--poll" in err and "not a number of seconds" in err and out == ""
    assert cli.rows() == before
