"""Workers are principals of kind `worker`: registered with their real OS account in the
audit trail, and named as the actor of what they write."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from opsgate.auth.workers import register_worker_principal, worker_name
from opsgate.errors import InvalidInput, StateConflict
from opsgate.store.sql import SqlStore

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    store = SqlStore(f"sqlite:///{tmp_path / 'w.db'}")
    store.migrate()
    yield store
    store.close()


def test_a_worker_is_registered_with_its_real_account(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOGNAME", "mallory")
    monkeypatch.setenv("USER", "mallory")
    principal = register_worker_principal(store, "w-eu-1", NOW, 30.0)
    account = pwd.getpwuid(os.getuid()).pw_name
    assert principal.os_user == account != "mallory"
    (event,) = [e for e in store.audit_events() if e.kind == "worker.registered"]
    assert event.actor == "w-eu-1"
    assert event.data["principal_kind"] == "worker" and event.data["os_user"] == account
    assert event.data["pid"] == os.getpid()
    assert [w.id for w in store.list_workers()] == ["w-eu-1"]


def test_a_name_a_live_worker_holds_is_refused(store: SqlStore) -> None:
    register_worker_principal(store, "w-1", NOW, 30.0)
    before = store.row_counts()
    with pytest.raises(StateConflict, match="another --name"):
        register_worker_principal(store, "w-1", NOW + timedelta(seconds=5), 30.0)
    assert store.row_counts() == before
    # Once its heartbeat lapsed, the name may be taken again (a restarted worker).
    register_worker_principal(store, "w-1", NOW + timedelta(minutes=5), 30.0)


@pytest.mark.parametrize(
    "name", ["", " w", "w 1", "w\x1b[2J", "w\n1", "x" * 129, "-w", "w;rm -rf /", "wörker"]
)
def test_malformed_worker_names_exit_2_naming_the_option(name: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        worker_name(name)
    assert refused.value.field == "--name"


def test_opsgate_worker_names_itself_in_the_trail(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSGATE_")}
    env.update(
        OPSGATE_DB=f"sqlite:///{tmp_path / 'x.db'}",
        OPSGATE_CATALOG=str(ROOT / "catalog"),
        OPSGATE_POLICIES=str(ROOT / "policies"),
        OPSGATE_PROMETHEUS_URL="http://127.0.0.1:9",
        OPSGATE_CONFIG=str(tmp_path / "absent.toml"),
        LOGNAME="mallory",
    )

    def opsgate(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "opsgate", *args],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    assert opsgate("init").returncode == 0
    done = opsgate("worker", "--once", "--name", "w-test")
    assert done.returncode == 0, done.stderr
    assert "worker w-test started (as " in done.stderr and "mallory" not in done.stderr
    done = opsgate("worker", "--once", "--name", "w test")
    assert done.returncode == 2 and "--name" in done.stderr
    store = SqlStore(env["OPSGATE_DB"])
    try:
        kinds = [(e.kind, e.actor) for e in store.audit_events()]
    finally:
        store.close()
    assert kinds == [("worker.registered", "w-test")]


def test_workers_lists_hostile_names_inert(tmp_path: Path) -> None:
    from opsgate.models import WorkerInfo

    db = f"sqlite:///{tmp_path / 'x.db'}"
    store = SqlStore(db)
    store.migrate()
    now = datetime.now(UTC)
    hostile = WorkerInfo(
        id="w-[bold]x", hostname="evil\x1b[2J[red]host", pid=1, started_at=now, heartbeat_at=now
    )
    store.register_worker(hostile)
    store.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSGATE_")}
    env.update(OPSGATE_DB=db, OPSGATE_CONFIG=str(tmp_path / "absent.toml"))
    done = subprocess.run(
        [sys.executable, "-m", "opsgate", "workers"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout
    assert "w-[bold]x" in done.stdout and "[red]host" in done.stdout
