"""The alembic migrations build exactly `tables.metadata`, up and down, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Integer, MetaData, inspect, select, text

from opsgate.audit import GENESIS_HASH
from opsgate.store import StoreError
from opsgate.store.sql import SqlStore, alembic_config
from opsgate.store.tables import audit_head, metadata


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStore]:
    """A store on an empty database, not migrated."""
    if request.param == "sqlite":
        (tmp_path / "fresh.db").touch()  # an empty database file: only `migrate` creates one
        url = f"sqlite:///{tmp_path / 'fresh.db'}"
    else:
        url = request.getfixturevalue("pg_database")()
    store = SqlStore(url)
    yield store
    store.close()


def _differences(store: SqlStore, target: MetaData = metadata) -> list[object]:
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, target))


def _tables(store: SqlStore) -> set[str]:
    with store.engine.connect() as conn:
        return set(inspect(conn).get_table_names())


def test_one_linear_history() -> None:
    script = ScriptDirectory.from_config(alembic_config())
    assert script.get_heads() == ["0009"]


def test_upgrade_head_matches_the_models(fresh: SqlStore) -> None:
    fresh.migrate()
    assert _differences(fresh) == []
    with fresh.engine.connect() as conn:
        assert conn.execute(select(audit_head)).all() == [(1, 0, GENESIS_HASH)]
    fresh.migrate()  # a second run is a no-op
    assert set(fresh.row_counts().values()) == {0}


def test_the_comparison_would_notice_a_difference(fresh: SqlStore) -> None:
    fresh.migrate()
    changed = MetaData(naming_convention=metadata.naming_convention)
    for table in metadata.sorted_tables:
        table.to_metadata(changed)
    changed.tables["actions"].append_column(Column("surprise", Integer))
    assert _differences(fresh, changed) != []


def test_downgrade_base_then_upgrade_head(fresh: SqlStore) -> None:
    fresh.migrate()
    with fresh.engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert _tables(fresh) <= {"alembic_version"}
    with fresh.engine.begin() as conn:
        command.upgrade(alembic_config(conn), "head")
    assert _differences(fresh) == []
    assert {t.name for t in metadata.sorted_tables} <= _tables(fresh)


def test_offline_sql_renders(capsys: pytest.CaptureFixture[str]) -> None:
    """`alembic upgrade --sql` works (it needs the dialect, not a server)."""
    config = alembic_config()
    config.set_main_option("sqlalchemy.url", "postgresql+psycopg://u@localhost/x")
    command.upgrade(config, "head", sql=True)
    script = capsys.readouterr().out
    assert "CREATE TABLE actions" in script
    assert "INSERT INTO audit_head" in script


def test_a_database_newer_than_the_code_is_a_store_error(fresh: SqlStore) -> None:
    fresh.migrate()
    with fresh.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": "9999"})
    with pytest.raises(StoreError, match="older than the database"):
        fresh.migrate()


def test_segments_are_backfilled_for_rows_written_before_0004(fresh: SqlStore) -> None:
    """An upgrade of a database with history gives every old fact its report segment."""
    with fresh.engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0003")
        now = "2026-11-01 10:00:00"
        conn.execute(
            text(
                "INSERT INTO actions (id, action_type, target, environment, params, reason, "
                "incident_severity, incident_class, incident_tier, verification, risk, "
                "reversible, spec_hash, proposer_id, proposer_kind, state, required_approvals, "
                "approver_roles, created_at, updated_at) VALUES ('a1', 'scale_deployment', "
                "'checkout', 'prod', '{}', 'r', 'sev2', NULL, 'critical', '{}', 'medium', "
                "true, 'h', 'alice', 'agent', 'blocked', 1, '[]', :now, :now)"
            ),
            {"now": now},
        )
        conn.execute(
            text(
                "INSERT INTO decisions (id, action_id, phase, allow, deny, deny_codes, "
                "required_approvals, approver_roles, engine, bundle_revision, input, result, "
                "decided_at, duration_ms) VALUES ('d1', 'a1', 'propose', false, '[]', "
                """'["not_allowlisted", "change_freeze"]', 1, '[]', 'embedded', 'r', '{}', """
                "NULL, :now, 1.0)"
            ),
            {"now": now},
        )
    fresh.migrate()
    with fresh.engine.connect() as conn:
        segment = conn.execute(
            text(
                "SELECT severity, incident_class, tier, environment, action, proposer_kind "
                "FROM segments"
            )
        ).all()
        assert segment == [("sev2", "", "critical", "prod", "scale_deployment", "agent")]
        row = conn.execute(
            text(
                "SELECT d.deny_key, d.segment_id = a.segment_id, a.segment_id IS NOT NULL "
                "FROM decisions d JOIN actions a ON a.id = d.action_id"
            )
        ).one()
    assert json.loads(row[0]) == ["not_allowlisted", "change_freeze"]
    assert bool(row[1]) and bool(row[2])
