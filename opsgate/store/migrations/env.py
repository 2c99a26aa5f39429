"""Alembic environment: runs on the connection `SqlStore.migrate()` passes in, or on a URL."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection

from opsgate.store.tables import metadata

config = context.config
target_metadata = metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("OPSGATE_DB")
    if not url:
        raise RuntimeError("set sqlalchemy.url or OPSGATE_DB to the database to migrate")
    return url


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        return
    # Run from the alembic command line: open the database the way opsgate does.
    from opsgate.store.sql import SqlStore

    store = SqlStore(_url())
    try:
        with store.engine.begin() as conn:
            _configure(conn)
    finally:
        store.close()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
