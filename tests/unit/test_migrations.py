"""The alembic migrations build exactly `tables.metadata`, up and down, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    assert script.get_heads() == ["0012"]


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
    """`alembic upgrade --sql` works up to 0011 (it needs the dialect, not a server)."""
    config = alembic_config()
    config.set_main_option("sqlalchemy.url", "postgresql+psycopg://u@localhost/x")
    command.upgrade(config, "0011", sql=True)
    script = capsys.readouterr().out
    assert "CREATE TABLE actions" in script
    assert "INSERT INTO audit_head" in script


def test_0012_refuses_to_render_offline() -> None:
    """Its backfill counts history in Python: rendered as SQL it would leave the summary
    empty and every track record clean, so it says so instead."""
    config = alembic_config()
    config.set_main_option("sqlalchemy.url", "postgresql+psycopg://u@localhost/x")
    with pytest.raises(RuntimeError, match="cannot be rendered as SQL"):
        command.upgrade(config, "0011:0012", sql=True)


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


def _action_at_0010(conn: Any, action_id: str, proposer: str) -> None:
    conn.execute(
        text(
            "INSERT INTO actions (id, action_type, target, environment, params, reason, "
            "incident_severity, incident_class, incident_tier, verification, risk, "
            "reversible, spec_hash, proposer_id, proposer_kind, state, required_approvals, "
            "approver_roles, created_at, updated_at, segment_id) VALUES (:id, "
            "'scale_deployment', 'checkout', 'prod', '{}', 'r', 'sev2', NULL, 'critical', "
            "'{}', 'medium', true, 'h', :proposer, 'agent', 'blocked', 1, '[]', :now, :now, "
            "(SELECT id FROM segments))"
        ),
        {"id": action_id, "proposer": proposer, "now": "2026-11-01 10:00:00"},
    )
    conn.execute(
        text(
            "INSERT INTO decisions (id, action_id, phase, allow, deny, deny_codes, deny_key, "
            "required_approvals, approver_roles, engine, bundle_revision, input, result, "
            "decided_at, duration_ms, segment_id) VALUES (:id, :action_id, 'propose', false, "
            """'[]', '["not_allowlisted"]', '["not_allowlisted"]', 1, '[]', 'embedded', 'r', """
            "'{}', NULL, :now, 1.0, (SELECT id FROM segments))"
        ),
        {"id": "d-" + action_id, "action_id": action_id, "now": "2026-11-01 10:00:00"},
    )


def _segments_of_facts(conn: Any) -> list[tuple[str, str, bool]]:
    return [
        (str(a), str(p), bool(same))
        for a, p, same in conn.execute(
            text(
                "SELECT a.id, s.proposer_id, d.segment_id = a.segment_id FROM actions a "
                "JOIN segments s ON s.id = a.segment_id "
                "JOIN decisions d ON d.action_id = a.id ORDER BY a.id"
            )
        ).all()
    ]


def test_0011_gives_each_proposer_its_own_segments_and_downgrade_merges_them(
    fresh: SqlStore,
) -> None:
    """Two proposers who shared a segment before 0011 get one each, facts included; a
    downgrade puts them back in one."""
    with fresh.engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0010")
        conn.execute(
            text(
                "INSERT INTO segments (severity, incident_class, tier, environment, action, "
                "proposer_kind) VALUES ('sev2', '', 'critical', 'prod', 'scale_deployment', "
                "'agent')"
            )
        )
        _action_at_0010(conn, "a1", "alice")
        _action_at_0010(conn, "a2", "bob")
    fresh.migrate()
    with fresh.engine.connect() as conn:
        assert _segments_of_facts(conn) == [("a1", "alice", True), ("a2", "bob", True)]
        assert conn.execute(text("SELECT COUNT(*) FROM segments")).scalar_one() == 2
    with fresh.engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0010")
    with fresh.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT COUNT(DISTINCT a.segment_id), COUNT(DISTINCT d.segment_id), "
                "(SELECT COUNT(*) FROM segments) FROM actions a "
                "JOIN decisions d ON d.action_id = a.id"
            )
        ).one()
    assert tuple(rows) == (1, 1, 1)
