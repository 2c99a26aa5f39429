"""Shared fixtures: `store` over memory, SQLite and PostgreSQL; `sqlite_url`; `pg_url`.

PostgreSQL comes from OPSGATE_TEST_PG_ADMIN_URL (default: postgres@127.0.0.1:5432, trust
auth). Unreachable means skip, except under CI, where it means fail.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from ulid import ULID

from opsgate.audit import GENESIS_HASH
from opsgate.store.base import Store
from opsgate.store.sql import SqlStore
from opsgate.store.tables import audit_head, metadata
from opsgate.testing import MemoryStore

PG_ADMIN_URL = os.environ.get(
    "OPSGATE_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="session", autouse=True)
def _no_personal_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The developer's own opsgate contexts never reach a test (nor its subprocesses)."""
    saved = {k: os.environ.get(k) for k in ("XDG_CONFIG_HOME", "OPSGATE_USER_CONFIG",
                                            "OPSGATE_CONTEXT")}  # fmt: skip
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("xdg-config"))
    os.environ.pop("OPSGATE_USER_CONFIG", None)
    os.environ.pop("OPSGATE_CONTEXT", None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _unavailable(reason: str) -> None:
    """Skip locally, fail in CI: a CI run that silently skips PostgreSQL proves nothing."""
    if os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}:
        pytest.fail(f"PostgreSQL is required when CI is set: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL unavailable: {reason}")


@dataclass
class _PgServer:
    engine: Engine | None  # AUTOCOMMIT, on the maintenance database
    error: str = ""


@pytest.fixture(scope="session")
def _pg_server() -> Iterator[_PgServer]:
    """The PostgreSQL server, probed once per session."""
    engine = create_engine(
        PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
    )
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        engine.dispose()
        yield _PgServer(None, str(exc.orig if isinstance(exc, DBAPIError) else exc).strip())
        return
    yield _PgServer(engine)
    engine.dispose()


@pytest.fixture(scope="session")
def pg_database(_pg_server: _PgServer) -> Iterator[Callable[[], str]]:
    """A factory of fresh, empty PostgreSQL databases (URLs); all dropped at session end."""
    created: list[str] = []

    def create() -> str:
        engine = _pg_server.engine
        if engine is None:
            _unavailable(_pg_server.error.splitlines()[0] if _pg_server.error else "no server")
            raise AssertionError("unreachable")
        name = f"opsgate_test_{str(ULID()).lower()}"
        with engine.connect() as conn:
            # The name is generated here (a lower-case ULID), never taken from input.
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)

    yield create
    if _pg_server.engine is not None:
        with _pg_server.engine.connect() as conn:
            for name in created:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def pg_url(pg_database: Callable[[], str]) -> str:
    """A migrated PostgreSQL database for this session; the `store` fixture empties it per test."""
    url = pg_database()
    store = SqlStore(url)
    try:
        store.migrate()
    finally:
        store.close()
    return url


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite file per session; copying it is faster than migrating again."""
    path = tmp_path_factory.mktemp("sqlite-template") / "opsgate.db"
    store = SqlStore(f"sqlite:///{path}")
    try:
        store.migrate()
    finally:
        store.close()  # the last connection to close checkpoints the WAL into the file
    return path


@pytest.fixture
def sqlite_url(tmp_path: Path, _sqlite_template: Path) -> str:
    """A migrated SQLite database file in tmp_path."""
    path = tmp_path / "opsgate.db"
    for suffix in ("", "-wal"):  # a WAL left behind would hold part of the schema
        source = _sqlite_template.with_name(_sqlite_template.name + suffix)
        if source.exists():
            shutil.copyfile(source, path.with_name(path.name + suffix))
    return f"sqlite:///{path}"


def reset_database(store: SqlStore) -> None:
    """Empty every data table and rewind the audit chain to genesis."""
    names = ", ".join(t.name for t in metadata.sorted_tables if t.name != "audit_head")
    with store.engine.begin() as conn:
        # Table names come from our own metadata, not from input.
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
        conn.execute(update(audit_head).values(seq=0, hash=GENESIS_HASH))


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    """An empty, migrated store of each kind; closed (engines disposed) afterwards."""
    opened: Store
    if request.param == "memory":
        opened = MemoryStore()
    elif request.param == "sqlite":
        opened = SqlStore(request.getfixturevalue("sqlite_url"))
    else:
        sql = SqlStore(request.getfixturevalue("pg_url"))
        try:
            reset_database(sql)
        except BaseException:
            sql.close()
            raise
        opened = sql
    try:
        yield opened
    finally:
        opened.close()
