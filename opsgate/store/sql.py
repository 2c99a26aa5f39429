"""The SQL store: SQLite (WAL, synchronous=FULL) or PostgreSQL, through SQLAlchemy Core."""

from __future__ import annotations

import functools
import importlib
import json
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import (
    Connection,
    Engine,
    Executable,
    Row,
    Select,
    and_,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

from opsgate.audit import AuditDraft, seal
from opsgate.models import (
    ACTIVE_STATES,
    MUTABLE_EXECUTION_FIELDS,
    Action,
    ActionState,
    ApiToken,
    Approval,
    AuditCheckpoint,
    AuditEvent,
    Decision,
    Execution,
    ExecutionUpdate,
    Measurement,
    TrustReset,
    WorkerInfo,
)
from opsgate.notify.events import NOTIFIED_KINDS, outbox_entry
from opsgate.shared import FAR_FUTURE
from opsgate.store import summary_sql
from opsgate.store.base import (
    MUTABLE_ACTION_FIELDS,
    ActionQuery,
    DuplicateIdempotencyKey,
    OutboxItem,
    StoreError,
    TargetBusy,
    refuse_immutable,
)
from opsgate.store.tables import (
    RUNNING_ON_TARGET_INDEX,
    actions,
    api_tokens,
    approvals,
    audit_checkpoints,
    audit_events,
    audit_head,
    decisions,
    executions,
    measurements,
    metadata,
    outbox,
    segments,
    trust_resets,
    workers,
)
from opsgate.store.track_summary import (
    NO_LATEST,
    Counts,
    Latest,
    SummaryChanges,
    Who,
    action_counts,
    decision_counts,
    execution_counts,
    execution_latest,
)

if TYPE_CHECKING:  # alembic loads only to migrate: every command opens a store
    from alembic.config import Config

    from opsgate.trust import Facts, Figures

P = ParamSpec("P")
R = TypeVar("R")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def _sqlite_pragma(conn: Connection, statement: str) -> None:
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(statement)
    finally:
        cursor.close()


# Serialises concurrent `migrate()` calls on one PostgreSQL database (any constant works).
_MIGRATE_LOCK_KEY = 0x6F7073676174
_AUDIT_PAGE = 500
_ACTIVE = sorted(s.value for s in ACTIVE_STATES)
_EXPIRABLE = [ActionState.PENDING_APPROVAL.value, ActionState.APPROVED.value]
# Tables that `row_counts` reports; audit_head is bookkeeping, not data.
SEGMENT_COLUMNS = (
    "severity",
    "incident_class",
    "tier",
    "environment",
    "action",
    "proposer_kind",
    "proposer_id",
)
# audit_head and segments (a dimension table for reports) are bookkeeping, not data.
# Derived tables (segments, the track record's summary) follow the facts: not counted.
_DERIVED = {"audit_head", "segments", "track_record_days", "track_record_latest"}
_COUNTED = [t for t in metadata.sorted_tables if t.name not in _DERIVED]


def normalize_url(url: str) -> URL:
    """Parse a database URL; plain `postgresql://` (or `postgres://`) means psycopg 3."""
    try:
        parsed = make_url(url)
    except SQLAlchemyError:
        raise StoreError(
            "invalid database URL; use sqlite:///path/to/opsgate.db or "
            "postgresql://user@host/dbname"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "postgres":  # Heroku-style alias that SQLAlchemy no longer accepts
        backend = "postgresql"
        parsed = parsed.set(drivername="postgresql" + parsed.drivername[len("postgres") :])
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
    elif backend == "sqlite":
        database = parsed.database or ""
        if database in {"", ":memory:"}:
            raise StoreError(
                "an in-memory SQLite database cannot be shared between connections; "
                "use a file (sqlite:///opsgate.db) or memory:// for tests"
            )
        if not database.startswith("file:"):
            parsed = parsed.set(database=str(Path(database).expanduser()))
    else:
        raise StoreError(
            f"unsupported database {parsed.drivername!r}; use sqlite:///path or postgresql://"
        )
    return parsed


def alembic_config(connection: Connection | None = None) -> Config:
    """An alembic Config built in code, pointing at the packaged migrations."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _translate_errors(
    method: Callable[Concatenate[Any, P], R],
) -> Callable[Concatenate[Any, P], R]:
    """Turn driver errors into a one-line StoreError that never shows a password."""

    @functools.wraps(method)
    def wrapper(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except SQLAlchemyError as exc:
            raise self.store_error(exc) from None

    return wrapper


class SqlStore:
    """`Store` over SQLAlchemy Core; one engine (a small connection pool) per store."""

    def __init__(self, url: str) -> None:
        parsed = normalize_url(url)
        # Masked: the URL ends up in messages and listings; the engine keeps the real one.
        self.url = parsed.render_as_string(hide_password=True)
        self._display_url = self.url
        self._password = parsed.password if isinstance(parsed.password, str) else None
        self._local = threading.local()
        # Report segment ids known to be committed (a few hundred at most).
        self.segment_ids: dict[tuple[str, ...], int] = {}
        self.dialect = parsed.get_backend_name()
        # Only `migrate` (opsgate init) creates a SQLite file and its directory: a read
        # must not leave an empty database (or directories) behind a typo in OPSGATE_DB.
        self._may_create = False
        try:
            if self.dialect == "sqlite":
                self._engine = self._sqlite_engine(parsed, lambda: self._may_create)
                self._read_engine = self._engine.execution_options(opsgate_read=True)
            else:
                self._engine = self._postgresql_engine(parsed)
                # Reads are single statements; autocommit saves BEGIN and ROLLBACK round trips.
                self._read_engine = self._engine.execution_options(isolation_level="AUTOCOMMIT")
        except SQLAlchemyError as exc:
            raise self.store_error(exc) from None

    @staticmethod
    def _sqlite_engine(url: URL, may_create: Callable[[], bool]) -> Engine:
        database = url.database or ""
        path = None if database.startswith("file:") or database in ("", ":memory:") else database
        engine = create_engine(url)

        @event.listens_for(engine, "do_connect")
        def _refuse_to_create(_dialect: Any, _record: Any, _cargs: Any, _cparams: Any) -> None:
            if path is None or Path(path).exists():
                return
            if not may_create():
                raise StoreError(f"there is no store at {path}")
            Path(path).parent.mkdir(parents=True, exist_ok=True)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy, not sqlite3, decide where transactions begin (see `_on_begin`).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("PRAGMA busy_timeout = 30000")
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute("PRAGMA synchronous = FULL")
                cursor.execute("PRAGMA foreign_keys = ON")
            finally:
                cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # Writers take the write lock up front, so they queue on busy_timeout instead of
            # failing on lock upgrade, and read the audit head only once they own it.
            # Single-statement reads need no transaction at all.
            if not conn.get_execution_options().get("opsgate_read"):
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine

    @staticmethod
    def _postgresql_engine(url: URL) -> Engine:
        connect_args: dict[str, Any] = {}
        if "connect_timeout" not in url.query:
            connect_args["connect_timeout"] = 10
        if "application_name" not in url.query:
            connect_args["application_name"] = "opsgate"
        return create_engine(url, pool_pre_ping=True, connect_args=connect_args)

    def __repr__(self) -> str:
        return f"SqlStore({self._display_url!r})"

    @property
    def read_engine(self) -> Engine:
        """For reads outside a transaction (SQLite: no write lock taken)."""
        return self._read_engine

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, for reports and tests that need SQL aggregates."""
        return self._engine

    def store_error(self, exc: BaseException) -> StoreError:
        """A one-line StoreError for a driver error, with the password masked."""
        detail = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
        lines = [line.strip() for line in str(detail).splitlines() if line.strip()]
        message = lines[0] if lines else type(detail).__name__
        if self._password:
            message = message.replace(self._password, "***")
        hint = ""
        lowered = message.lower()
        if "no such table" in lowered or ("relation" in lowered and "does not exist" in lowered):
            hint = " (is the schema migrated?)"
        return StoreError(f"database error ({self._display_url}): {message}{hint}")

    # --- transactions ------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[SqlTx]:
        """One database transaction: committed when the block ends, rolled back if it raises."""
        if getattr(self._local, "active", False):
            raise StoreError("a transaction is already open in this thread; nesting is not allowed")
        try:
            conn = self._engine.connect()
        except SQLAlchemyError as exc:
            raise self.store_error(exc) from None
        self._local.active = True
        try:
            try:
                conn.begin()
            except SQLAlchemyError as exc:
                raise self.store_error(exc) from None
            tx = SqlTx(self, conn)
            try:
                yield tx
                if not tx.failed:  # else refused below, with nothing written
                    tx.write_audit()
                    tx.write_track_summary()
            except BaseException:
                self._rollback_quietly(conn)
                raise
            if tx.failed:
                # SQLite would commit the statements that did succeed, PostgreSQL would
                # silently roll back: refuse both, all or nothing.
                self._rollback_quietly(conn)
                raise StoreError(
                    "a statement in this transaction failed; nothing of it was written"
                )
            try:
                conn.commit()
            except SQLAlchemyError as exc:
                raise self.store_error(exc) from None
        finally:
            self._local.active = False
            self._close_quietly(conn)

    @staticmethod
    def _rollback_quietly(conn: Connection) -> None:
        # The exception that got us here matters more than a failing rollback.
        try:
            conn.rollback()
        except SQLAlchemyError:
            conn.invalidate()

    @staticmethod
    def _close_quietly(conn: Connection) -> None:
        try:
            conn.close()
        except SQLAlchemyError:
            conn.invalidate()

    @_translate_errors
    def migrate(self) -> None:
        """Upgrade the schema to the newest revision (alembic `upgrade head`)."""
        from alembic import command
        from alembic.util import CommandError

        self._may_create = True
        try:
            with self._engine.connect() as conn:
                if self.dialect == "sqlite":
                    # SQLite changes a constraint by copying the table; with foreign keys on,
                    # dropping the old copy would fail for every row that references it.
                    # The documented procedure: keys off outside the transaction, checked
                    # before commit, on again after (raw cursor: no BEGIN around a PRAGMA).
                    _sqlite_pragma(conn, "PRAGMA foreign_keys = OFF")
                try:
                    with conn.begin():
                        if self.dialect == "postgresql":
                            conn.execute(select(func.pg_advisory_xact_lock(_MIGRATE_LOCK_KEY)))
                        command.upgrade(alembic_config(conn), "head")
                        if self.dialect == "sqlite":
                            broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                            if broken:
                                raise StoreError(
                                    f"migration left {len(broken)} broken references in "
                                    f"{broken[0][0]}; nothing was changed"
                                )
                finally:
                    if self.dialect == "sqlite":
                        _sqlite_pragma(conn, "PRAGMA foreign_keys = ON")
        except CommandError as exc:  # e.g. the database is at a revision this code lacks
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "failed"
            raise StoreError(
                f"cannot migrate {self._display_url}: {first} (is this opsgate older than "
                "the database?)"
            ) from None

    # --- reads -------------------------------------------------------------------------

    def _all(
        self, statement: Executable, params: Mapping[str, Any] | None = None
    ) -> Sequence[Row[Any]]:
        with self._read_engine.connect() as conn:
            return conn.execute(statement, params).all()

    @_translate_errors
    def get_action(self, action_id: str) -> Action | None:
        rows = self._all(_SELECT_ACTION, {"action_id": action_id})
        return action_from_row(rows[0]._mapping) if rows else None

    @_translate_errors
    def find_action_by_idempotency_key(self, key: str, proposer_id: str) -> Action | None:
        rows = self._all(_ACTION_BY_KEY, {"key": key, "proposer_id": proposer_id})
        return action_from_row(rows[0]._mapping) if rows else None

    @_translate_errors
    def list_actions(
        self,
        *,
        states: Collection[ActionState] | None = None,
        proposer_id: str | None = None,
        limit: int = 100,
    ) -> list[Action]:
        """Oldest first."""
        statement = select(actions)
        if states is not None:
            statement = statement.where(actions.c.state.in_([ActionState(s).value for s in states]))
        if proposer_id is not None:
            statement = statement.where(actions.c.proposer_id == proposer_id)
        statement = statement.order_by(actions.c.created_at, actions.c.id).limit(max(limit, 0))
        return [action_from_row(row._mapping) for row in self._all(statement)]

    @_translate_errors
    def find_actions(self, query: ActionQuery) -> list[Action]:
        """Actions matching every filter of the query, newest first, at most query.limit."""
        statement = select(actions)
        if query.states:
            statement = statement.where(actions.c.state.in_(sorted(s.value for s in query.states)))
        if query.environments:
            statement = statement.where(actions.c.environment.in_(sorted(query.environments)))
        if query.action_types:
            statement = statement.where(actions.c.action_type.in_(sorted(query.action_types)))
        if query.targets:
            statement = statement.where(actions.c.target.in_(sorted(query.targets)))
        if query.proposer_id is not None:
            statement = statement.where(actions.c.proposer_id == query.proposer_id)
        if query.since is not None:
            statement = statement.where(actions.c.created_at >= query.since)
        statement = statement.order_by(actions.c.created_at.desc(), actions.c.id.desc()).limit(
            max(query.limit, 0)
        )
        return [action_from_row(row._mapping) for row in self._all(statement)]

    @_translate_errors
    def action_ids_with_prefix(self, prefix: str, limit: int) -> list[str]:
        """Ids starting with `prefix` (exact, case as stored), in id order, at most limit."""
        statement = (
            select(actions.c.id)
            .where(actions.c.id.startswith(prefix, autoescape=True))
            .order_by(actions.c.id)
            .limit(max(limit, 0))
        )
        # SQLite's LIKE ignores ASCII case; the prefix must match as stored.
        return [row[0] for row in self._all(statement) if row[0].startswith(prefix)]

    @_translate_errors
    def neighbour_ids(self, action_id: str) -> tuple[str | None, str | None]:
        """The ids just before and just after `action_id` in id order."""
        row = self._all(_NEIGHBOURS, {"action_id": action_id})[0]._mapping
        return row["before"], row["after"]

    @_translate_errors
    def holders_on_target(
        self, target: str, environment: str, *, running: bool, exclude_id: str | None = None
    ) -> list[tuple[str, str]]:
        statement = _holders(running, exclude_id)
        params = {"target": target, "environment": environment, "exclude_id": exclude_id}
        return [(r._mapping["id"], r._mapping["state"]) for r in self._all(statement, params)]

    @_translate_errors
    def due_for_expiry(self, now: datetime) -> list[Action]:
        """Pending or approved actions whose expires_at has passed."""
        rows = self._all(_DUE_FOR_EXPIRY, {"now": now})
        return [action_from_row(row._mapping) for row in rows]

    @_translate_errors
    def decisions_for(self, action_id: str) -> list[Decision]:
        rows = self._all(_DECISIONS_OF, {"action_id": action_id})
        return [decision_from_row(row._mapping) for row in rows]

    def decisions_between(
        self, since: datetime, until: datetime, phases: Collection[str]
    ) -> Iterator[Decision]:
        """Decisions made in [since, until) at these phases, oldest first, in pages."""
        after: tuple[datetime, str] | None = None
        while True:
            page = self._decisions_page(since, until, list(phases), after)
            yield from page
            if len(page) < _AUDIT_PAGE:
                return
            after = (page[-1].decided_at, page[-1].id)

    @_translate_errors
    def _decisions_page(
        self,
        since: datetime,
        until: datetime,
        phases: list[str],
        after: tuple[datetime, str] | None,
    ) -> list[Decision]:
        d = decisions
        statement = select(d).where(
            d.c.decided_at >= since, d.c.decided_at < until, d.c.phase.in_(phases)
        )
        if after is not None:
            statement = statement.where(
                or_(d.c.decided_at > after[0], and_(d.c.decided_at == after[0], d.c.id > after[1]))
            )
        statement = statement.order_by(d.c.decided_at, d.c.id).limit(_AUDIT_PAGE)
        return [decision_from_row(row._mapping) for row in self._all(statement)]

    @_translate_errors
    def approvals_for(self, action_id: str) -> list[Approval]:
        rows = self._all(_APPROVALS_OF, {"action_id": action_id})
        return [approval_from_row(row._mapping) for row in rows]

    @_translate_errors
    def count_active_on_target(
        self, target: str, environment: str, *, exclude_id: str | None = None
    ) -> int:
        statement, params = _count_active(target, environment, exclude_id)
        return int(self._all(statement, params)[0][0])

    @_translate_errors
    def count_running_on_target(
        self, target: str, environment: str, *, exclude_id: str | None = None
    ) -> int:
        statement, params = _count_running(target, environment, exclude_id)
        return int(self._all(statement, params)[0][0])

    @_translate_errors
    def get_execution(self, action_id: str) -> Execution | None:
        rows = self._all(_SELECT_EXECUTION, {"action_id": action_id})
        return execution_from_row(rows[0]._mapping) if rows else None

    @_translate_errors
    def measurements_for(self, action_id: str) -> list[Measurement]:
        """In the order they were taken (stored)."""
        rows = self._all(_MEASUREMENTS_OF, {"action_id": action_id})
        return [measurement_from_row(row._mapping) for row in rows]

    def renew_leases(
        self,
        worker_id: str,
        now: datetime,
        until: datetime,
        only: Collection[str] | None = None,
    ) -> int:
        """Extend this worker's unfinished leases and its heartbeat in one transaction."""
        with self.transaction() as tx:
            return tx.renew_leases(worker_id, now, until, only)

    def register_worker(self, worker: WorkerInfo) -> None:
        """Insert or replace a worker's row."""
        with self.transaction() as tx:
            tx.register_worker(worker)

    def stop_worker(self, worker_id: str, now: datetime) -> None:
        """Mark a worker stopped; a worker that never registered is left alone."""
        with self.transaction() as tx:
            tx.stop_worker(worker_id, now)

    @_translate_errors
    def list_workers(self) -> list[WorkerInfo]:
        """Newest heartbeat first."""
        return [worker_from_row(row._mapping) for row in self._all(_LIST_WORKERS)]

    @_translate_errors
    def unfinished_executions(self) -> list[Execution]:
        """Every execution under way (leases held or lapsed), oldest claim first."""
        return [execution_from_row(row._mapping) for row in self._all(_UNFINISHED_EXECUTIONS)]

    @_translate_errors
    def lapsed_executions(self, now: datetime) -> list[Execution]:
        """Unfinished executions whose lease expired before `now`, oldest lease first."""
        rows = self._all(_LAPSED_EXECUTIONS, {"now": now})
        return [execution_from_row(row._mapping) for row in rows]

    def audit_events(self, *, action_id: str | None = None) -> Iterator[AuditEvent]:
        """In sequence order, fetched in pages so no connection stays open while iterating."""
        after = 0
        while True:
            page = self._audit_page(after, action_id)
            yield from page
            if len(page) < _AUDIT_PAGE:
                return
            after = page[-1].seq

    @_translate_errors
    def _audit_page(self, after: int, action_id: str | None) -> list[AuditEvent]:
        if action_id is None:
            rows = self._all(_AUDIT_PAGE_ALL, {"after": after})
        else:
            rows = self._all(_AUDIT_PAGE_OF, {"after": after, "action_id": action_id})
        return [audit_event_from_row(row._mapping) for row in rows]

    @_translate_errors
    def audit_head(self) -> tuple[int, str]:
        row = self._all(select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1))
        if not row:
            raise StoreError("the audit_head row is missing (is the schema migrated?)")
        return int(row[0].seq), str(row[0].hash)

    def insert_audit_checkpoint(self, checkpoint: AuditCheckpoint) -> None:
        with self.transaction() as tx:
            tx.insert_audit_checkpoint(checkpoint)

    @_translate_errors
    def audit_checkpoints(self) -> list[AuditCheckpoint]:
        rows = self._all(_AUDIT_CHECKPOINTS)
        return [AuditCheckpoint.model_validate(dict(row._mapping)) for row in rows]

    @_translate_errors
    def row_counts(self) -> dict[str, int]:
        """Rows per table, read in one statement so the counts are one consistent snapshot."""
        row = self._all(_ROW_COUNTS)[0]
        return {name: int(value) for name, value in row._mapping.items()}

    @_translate_errors
    def session_user(self) -> str | None:
        if self.dialect != "postgresql":
            return None
        return str(self._all(select(func.session_user()))[0][0])

    @_translate_errors
    def get_api_token(self, token_id: str) -> ApiToken | None:
        rows = self._all(_SELECT_API_TOKEN, {"token_id": token_id})
        return api_token_from_row(rows[0]._mapping) if rows else None

    @_translate_errors
    def list_api_tokens(self) -> list[ApiToken]:
        return [api_token_from_row(row._mapping) for row in self._all(_LIST_API_TOKENS)]

    @_translate_errors
    def claim_outbox(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[OutboxItem]:
        with self.transaction() as tx:
            return tx.claim_outbox(owner, now, lease_until, limit)

    @_translate_errors
    def settle_outbox(
        self,
        item_id: str,
        owner: str,
        *,
        delivered_to: Sequence[str],
        delivered_at: datetime | None,
        failed_at: datetime | None,
        next_attempt_at: datetime,
        error: str | None,
    ) -> bool:
        statement = (
            update(outbox)
            .where(outbox.c.id == item_id, outbox.c.lease_owner == owner)
            .values(
                attempts=outbox.c.attempts + 1,
                delivered_to=list(delivered_to),
                delivered_at=delivered_at,
                failed_at=failed_at,
                next_attempt_at=next_attempt_at,
                last_error=error[:1000] if error is not None else None,
                lease_owner=None,
                lease_until=None,
            )
        )
        with self.transaction() as tx:
            return tx.execute_count(statement) == 1

    @_translate_errors
    def outbox_items(self, *, action_id: str | None = None) -> list[OutboxItem]:
        statement = select(outbox).order_by(outbox.c.created_at, outbox.c.id)
        if action_id is not None:
            statement = statement.where(outbox.c.action_id == action_id)
        return [outbox_item_from_row(row._mapping) for row in self._all(statement)]

    def last_trust_reset(
        self, proposer_id: str, action_type: str, before: datetime | None = None
    ) -> datetime | None:
        rows = self._all(
            _LAST_TRUST_RESET,
            {
                "proposer_id": proposer_id,
                "action_type": action_type,
                "before": before or FAR_FUTURE,
            },
        )
        return rows[0][0] if rows else None

    def track_record_figures(
        self, proposer_id: str, action_type: str, environment: str, since: datetime
    ) -> dict[str, Figures]:
        """Everything recorded for the proposer since `since` (a UTC midnight): the summary."""
        from opsgate.trust import summary_figures

        try:
            with self._read_engine.connect() as conn:
                days, latest = summary_sql.read(
                    conn, self.dialect, proposer_id, action_type, environment, since
                )
        except SQLAlchemyError as exc:
            raise self.store_error(exc) from None
        return summary_figures(days, latest, action_type, environment)

    def track_record_facts(
        self, proposer_id: str, action_type: str, environment: str, since: datetime, until: datetime
    ) -> Facts:
        from opsgate.trust import sql_facts

        try:
            with self._read_engine.connect() as conn:
                return sql_facts(self, conn, proposer_id, action_type, environment, since, until)
        except SQLAlchemyError as exc:
            raise self.store_error(exc) from None

    def close(self) -> None:
        self._engine.dispose()


class SqlTx:
    """`StoreTx` on one connection inside one open transaction."""

    def __init__(self, store: SqlStore, conn: Connection) -> None:
        self._store = store
        self._conn = conn
        self._postgresql = store.dialect == "postgresql"
        (
            self._insert_action,
            self._upsert_worker,
            self._insert_segment,
            self._insert_execution,
        ) = _dialect_statements(store.dialect)
        self.failed = False  # a driver error happened: the transaction must not commit
        self._segments: dict[str, int | None] = {}  # action id -> segment id, this tx
        # Actions as this transaction last wrote them: a notification's payload needs the
        # action, and the change it announces was just made here (saves a read).
        self._written: dict[str, Action] = {}
        # The chain's head as this transaction moved it (None until it first appends), and
        # the events sealed onto it that are not written yet (see `append_audit`).
        self._head: tuple[int, str] | None = None
        self._unwritten: list[dict[str, Any]] = []
        self._at_commit: list[AuditDraft] = []  # see append_audit_at_commit
        # The track record's summary moves with the facts it counts (see write_track_summary):
        # the rows as this transaction last read or wrote them are the "before" of a change.
        self._summary = SummaryChanges()
        self._who: dict[str, Who] = {}
        self._actions_seen: dict[str, Action] = {}
        self._executions_seen: dict[str, Execution] = {}

    def store_error(self, exc: BaseException) -> StoreError:
        self.failed = True
        return self._store.store_error(exc)

    @_translate_errors
    def lock_action(self, action_id: str) -> Action | None:
        """Read an action and lock it until the transaction ends (FOR UPDATE).

        SQLite needs no row lock: BEGIN IMMEDIATE already made this the only writer.
        """
        statement = _LOCK_ACTION if self._postgresql else _SELECT_ACTION
        row = self._conn.execute(statement, {"action_id": action_id}).first()
        return self._saw_action(action_from_row(row._mapping)) if row is not None else None

    def _saw_action(self, action: Action) -> Action:
        self._actions_seen[action.id] = action
        self._who[action.id] = (action.proposer.id, action.action_type, action.environment)
        return action

    def _who_of(self, action_id: str) -> Who | None:
        """Whose track record a row of this action counts in (None: no such action)."""
        who = self._who.get(action_id)
        if who is None:
            row = self._conn.execute(_WHO_OF, {"action_id": action_id}).first()
            if row is None:
                return None
            who = self._who[action_id] = (row[0], row[1], row[2])
        return who

    @_translate_errors
    def write_track_summary(self) -> None:
        """Write what this transaction changed in the track record's summary. Called as it
        commits, after the audit events: whoever takes summary rows holds nothing else it
        could wait for, so two writers never deadlock on them."""
        if self._summary:
            changes, self._summary = self._summary, SummaryChanges()
            summary_sql.write(self._conn, self._store.dialect, changes)

    @_translate_errors
    def insert_action(self, action: Action) -> None:
        """Insert a new action; DuplicateIdempotencyKey if its key is taken."""
        # ON CONFLICT on the key alone: no aborted PostgreSQL transaction, no extra round trip,
        # and a concurrent insert of the same key waits for the other transaction to finish.
        row = action_to_row(action)
        row["segment_id"] = self._segment_id(segment_key(action))
        inserted = self._conn.execute(self._insert_action, row).first()
        if inserted is not None:
            self._segments[action.id] = row["segment_id"]
            self._written[action.id] = action
            self._saw_action(action)
            self._summary.count(self._who[action.id], {}, _action_counts(action))
        if inserted is None:
            raise DuplicateIdempotencyKey(
                f"idempotency key {action.idempotency_key!r} is already used by another action"
            )

    @_translate_errors
    def update_action(self, action_id: str, **fields: Any) -> Action:
        """Change MUTABLE_ACTION_FIELDS of a locked action and return the new row."""
        values = mutable_values(fields)
        if not values:
            found = self.lock_action(action_id)
            if found is None:
                raise StoreError(f"no action {action_id}")
            return found
        before = None
        if _ACTION_COUNTED & values.keys():
            before = self._actions_seen.get(action_id) or self.lock_action(action_id)
        statement = (
            update(actions).where(actions.c.id == action_id).values(**values).returning(actions)
        )
        row = self._conn.execute(statement).first()
        if row is None:
            raise StoreError(f"no action {action_id}")
        updated = self._saw_action(action_from_row(row._mapping))
        self._written[action_id] = updated
        if before is not None:
            self._summary.count(
                self._who[action_id], _action_counts(before), _action_counts(updated)
            )
        return updated

    @_translate_errors
    def insert_decision(self, decision: Decision) -> None:
        # The action's segment is read by the INSERT itself: no round trip of its own.
        row = decision_to_row(decision)
        row["segment_of"] = decision.action_id
        self._conn.execute(_INSERT_DECISION, row)
        counts = decision_counts(
            decision.phase, decision.decided_at, decision.allow, row["deny_key"]
        )
        if counts and decision.action_id is not None:
            who = self._who_of(decision.action_id)
            if who is not None:
                self._summary.count(who, {}, counts)

    def _segment_id(self, key: dict[str, str]) -> int:
        """The id of a report segment, created on first use (races resolve by the key)."""
        cache_key = tuple(key.values())
        cached = self._store.segment_ids.get(cache_key)
        if cached is not None:
            return cached
        found = self._conn.execute(_SEGMENT_ID, key).scalar_one_or_none()
        if found is not None:
            # Read before this transaction wrote it: committed, and segments are never
            # deleted, so every later proposal of this kind skips both statements.
            self._store.segment_ids[cache_key] = int(found)
            return int(found)
        self._conn.execute(self._insert_segment, key)
        return int(self._conn.execute(_SEGMENT_ID, key).scalar_one())

    @_translate_errors
    def insert_approval(self, approval: Approval) -> None:
        self._conn.execute(_INSERT_APPROVAL, approval_to_row(approval))

    @_translate_errors
    def approvals_for(self, action_id: str) -> list[Approval]:
        rows = self._conn.execute(_APPROVALS_OF, {"action_id": action_id})
        return [approval_from_row(row._mapping) for row in rows]

    @_translate_errors
    def count_active_on_target(
        self, target: str, environment: str, *, exclude_id: str | None = None
    ) -> int:
        """Actions on this target in ACTIVE_STATES (approved .. rolling_back)."""
        statement, params = _count_active(target, environment, exclude_id)
        return int(self._conn.execute(statement, params).scalar_one())

    @_translate_errors
    def holders_on_target(
        self, target: str, environment: str, *, running: bool, exclude_id: str | None = None
    ) -> list[tuple[str, str]]:
        statement = _holders(running, exclude_id)
        params = {"target": target, "environment": environment, "exclude_id": exclude_id}
        rows = self._conn.execute(statement, params)
        return [(r._mapping["id"], r._mapping["state"]) for r in rows]

    @_translate_errors
    def append_audit(self, draft: AuditDraft) -> AuditEvent:
        """Seal the draft onto the end of the chain (serialised across writers).

        The first append of a transaction locks the head row (or SQLite's write lock is
        already held), and the lock is held until commit, so concurrent appenders queue
        here and each sees the head its predecessor left. The sealed events are written,
        and the head moved, in one go just before COMMIT (`write_audit`): one statement
        on PostgreSQL for all of a transaction's events instead of two per event.
        """
        # Drafts queued for commit were appended first: they keep their place.
        self._seal_queued()
        return self._seal(draft)

    @_translate_errors
    def append_audit_at_commit(self, draft: AuditDraft) -> None:
        """As append_audit, sealed and written when the transaction commits: the head
        is then locked just before the write and COMMIT, and held for those alone, not
        for whatever else the transaction does after its transition."""
        self._at_commit.append(draft)

    def _seal_queued(self) -> None:
        queued, self._at_commit = self._at_commit, []
        for draft in queued:
            self._seal(draft)

    def _seal(self, draft: AuditDraft) -> AuditEvent:
        if self._head is None:
            head = self._conn.execute(_HEAD_FOR_UPDATE).first()
            if head is None:
                raise StoreError("the audit_head row is missing (is the schema migrated?)")
            self._head = (int(head.seq), str(head.hash))
        seq, prev_hash = self._head
        event = seal(draft, seq=seq + 1, prev_hash=prev_hash)
        self._unwritten.append(audit_event_to_row(event))
        self._head = (event.seq, event.hash)
        if draft.kind in NOTIFIED_KINDS:
            # In this transaction: the notification exists exactly when the change does.
            found = self._written.get(draft.action_id) if draft.action_id else None
            if found is None and draft.action_id is not None:
                row = self._conn.execute(_SELECT_ACTION, {"action_id": draft.action_id}).first()
                found = action_from_row(row._mapping) if row is not None else None
            entry = outbox_entry(event, found)
            if entry is not None:
                self._conn.execute(_INSERT_OUTBOX, entry)
        if len(self._unwritten) >= _AUDIT_PAGE:  # bounds the statement's parameters
            self.write_audit()
        return event

    @_translate_errors
    def write_audit(self) -> None:
        """Seal what waits for commit, write the events sealed since the last write and
        move the head past them."""
        self._seal_queued()
        if not self._unwritten:
            return
        rows, self._unwritten = self._unwritten, []
        assert self._head is not None
        moved = {"new_seq": self._head[0], "new_hash": self._head[1]}
        try:
            if self._postgresql:
                self._conn.execute(_insert_events_moving_head(len(rows)), _flat(rows, moved))
            else:
                self._conn.execute(_INSERT_AUDIT_EVENT, rows)
                self._conn.execute(_MOVE_HEAD, moved)
        except IntegrityError:
            # opsgate moves the head with every event it appends, so a row already in
            # the range this transaction sealed was written by someone else. It is
            # evidence: say so, touch nothing.
            first, last = int(rows[0]["seq"]), int(rows[-1]["seq"])
            where = f"seq {first}" if first == last else f"seq {first}..{last}"
            raise StoreError(
                f"audit event {where} already exists "
                f"though the chain's head is at seq {first - 1}: it was written outside "
                "opsgate, and no event can be appended until it is dealt with; "
                "`opsgate audit verify` names it"
            ) from None

    @_translate_errors
    def claim_outbox(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[OutboxItem]:
        due = (
            select(outbox.c.id)
            .where(
                outbox.c.delivered_at.is_(None),
                outbox.c.failed_at.is_(None),
                outbox.c.next_attempt_at <= now,
                or_(outbox.c.lease_until.is_(None), outbox.c.lease_until < now),
            )
            .order_by(outbox.c.created_at, outbox.c.id)
            .limit(limit)
        )
        if self._postgresql:  # several servers: each takes rows no other holds
            due = due.with_for_update(skip_locked=True)
        ids = [row[0] for row in self._conn.execute(due)]
        if not ids:
            return []
        claimed = self._conn.execute(
            update(outbox)
            .where(outbox.c.id.in_(ids))
            .values(lease_owner=owner, lease_until=lease_until)
            .returning(outbox)
        ).all()
        items = [outbox_item_from_row(row._mapping) for row in claimed]
        return sorted(items, key=lambda item: (item.created_at, item.id))

    @_translate_errors
    def execute_count(self, statement: Executable) -> int:
        """Rows an UPDATE changed (the store's own statements only)."""
        return int(self._conn.execute(statement).rowcount)

    # --- execution ----------------------------------------------------------------------

    @_translate_errors
    def claim_next_approved(self, now: datetime) -> Action | None:
        """Lock the oldest approved, unexpired action no other transaction holds, or None.

        SQLite needs no SKIP LOCKED: BEGIN IMMEDIATE already made this the only writer.
        """
        statement = _CLAIM_NEXT_SKIP_LOCKED if self._postgresql else _CLAIM_NEXT
        row = self._conn.execute(statement, {"now": now}).first()
        return self._saw_action(action_from_row(row._mapping)) if row is not None else None

    @_translate_errors
    def count_running_on_target(
        self, target: str, environment: str, *, exclude_id: str | None = None
    ) -> int:
        """Unfinished executions on this target: what is touching it right now."""
        statement, params = _count_running(target, environment, exclude_id)
        return int(self._conn.execute(statement, params).scalar_one())

    @_translate_errors
    def insert_execution(self, execution: Execution) -> None:
        """Record a claim; TargetBusy if another unfinished execution holds the target."""
        # One statement checks and inserts: ON CONFLICT on the unique index of unfinished
        # executions inserts nothing when the target is held (the action's own unfinished
        # row included) and leaves the transaction usable; an uncommitted claim on the
        # target makes it wait for that transaction, then decide. A finished row holds
        # nothing, as in the index.
        try:
            row = execution_to_row(execution)
            row["segment_of"] = execution.action_id
            inserted = self._conn.execute(self._insert_execution, row).first()
        except IntegrityError as exc:
            if not _violates_running_index(exc):
                raise
            # The index refused all the same (it differs from the conflict target): still
            # a busy target, and PostgreSQL has aborted the transaction.
            self.failed = True
            raise TargetBusy(_busy_message(execution)) from None
        if inserted is None:
            raise TargetBusy(_busy_message(execution))
        self._ran(execution.action_id, None, execution)

    @_translate_errors
    def lock_execution(self, action_id: str) -> Execution | None:
        """Read an execution and lock it until the transaction ends (FOR UPDATE)."""
        statement = _LOCK_EXECUTION if self._postgresql else _SELECT_EXECUTION
        row = self._conn.execute(statement, {"action_id": action_id}).first()
        if row is None:
            return None
        found = execution_from_row(row._mapping)
        self._executions_seen[action_id] = found
        return found

    def _ran(self, action_id: str, before: Execution | None, after: Execution) -> None:
        """Count an execution's change in its proposer's summary."""
        self._executions_seen[action_id] = after
        who = self._who_of(action_id)
        if who is None:
            return
        self._summary.count(
            who,
            _execution_counts(before) if before is not None else {},
            _execution_counts(after),
        )
        self._summary.run_ended(
            who,
            _execution_latest(before) if before is not None else NO_LATEST,
            _execution_latest(after),
        )

    @_translate_errors
    def update_execution(self, action_id: str, changes: ExecutionUpdate) -> Execution:
        """Write the fields `changes` sets to a locked execution and return the new row."""
        values = mutable_execution_values(changes.changes())
        if not values:
            found = self.lock_execution(action_id)
            if found is None:
                raise StoreError(f"no execution of action {action_id}")
            return found
        before = None
        if _EXECUTION_COUNTED & values.keys():
            before = self._executions_seen.get(action_id) or self.lock_execution(action_id)
        statement = (
            update(executions)
            .where(executions.c.action_id == action_id)
            .values(**values)
            .returning(executions)
        )
        row = self._conn.execute(statement).first()
        if row is None:
            raise StoreError(f"no execution of action {action_id}")
        updated = execution_from_row(row._mapping)
        if before is not None:
            self._ran(action_id, before, updated)
        else:
            self._executions_seen[action_id] = updated
        return updated

    @_translate_errors
    def save_verification_states(
        self, field: str, states: Mapping[str, dict[str, Any]]
    ) -> dict[str, tuple[str, str | None]]:
        if field not in _STATE_FIELDS:
            raise ValueError(f"{field} is not a verification state field")
        if states:
            # One executemany, no RETURNING: a tick of 1,000 actions is two statements.
            self._conn.execute(
                _STATE_FIELDS[field],
                [{"key": action_id, "state": state} for action_id, state in states.items()],
            )
        return self.execution_owners(list(states))

    def execution_owners(self, action_ids: Sequence[str]) -> dict[str, tuple[str, str | None]]:
        owners: dict[str, tuple[str, str | None]] = {}
        for start in range(0, len(action_ids), 500):  # bound the IN list
            chunk = list(action_ids[start : start + 500])
            rows = self._conn.execute(_OWNERS, {"ids": chunk})
            owners.update({row[0]: (row[1], row[2]) for row in rows})
        return owners

    @_translate_errors
    def insert_measurements(self, measurements: Sequence[Measurement]) -> None:
        if not measurements:  # executemany with no rows is an error in SQLAlchemy
            return
        self._conn.execute(_INSERT_MEASUREMENT, [measurement_to_row(m) for m in measurements])

    # Not in StoreTx: SqlStore runs each of these in a transaction of its own.

    @_translate_errors
    def renew_leases(
        self,
        worker_id: str,
        now: datetime,
        until: datetime,
        only: Collection[str] | None = None,
    ) -> int:
        if only is not None and not only:
            renewed = 0
        else:
            statement = _RENEW_LEASES
            if only is not None:
                statement = statement.where(executions.c.action_id.in_(sorted(only)))
            renewed = self._conn.execute(
                statement, {"owner": worker_id, "now": now, "until": until}
            ).rowcount
        self._conn.execute(_WORKER_HEARTBEAT, {"worker_id": worker_id, "now": now})
        return int(renewed)

    @_translate_errors
    def register_worker(self, worker: WorkerInfo) -> None:
        self._conn.execute(self._upsert_worker, worker_to_row(worker))

    @_translate_errors
    def insert_audit_checkpoint(self, checkpoint: AuditCheckpoint) -> None:
        self._conn.execute(insert(audit_checkpoints), checkpoint.model_dump())

    @_translate_errors
    def stop_worker(self, worker_id: str, now: datetime) -> None:
        self._conn.execute(_STOP_WORKER, {"worker_id": worker_id, "now": now})

    @_translate_errors
    def insert_api_token(self, token: ApiToken) -> None:
        self._conn.execute(insert(api_tokens), api_token_to_row(token))

    @_translate_errors
    def insert_trust_reset(self, reset: TrustReset) -> None:
        self._conn.execute(insert(trust_resets), reset.model_dump())

    @_translate_errors
    def last_trust_reset(
        self, proposer_id: str, action_type: str, before: datetime | None = None
    ) -> datetime | None:
        row = self._conn.execute(
            _LAST_TRUST_RESET,
            {
                "proposer_id": proposer_id,
                "action_type": action_type,
                "before": before or FAR_FUTURE,
            },
        ).first()
        return row[0] if row is not None else None

    @_translate_errors
    def track_record_figures(
        self, proposer_id: str, action_type: str, environment: str, since: datetime
    ) -> dict[str, Figures]:
        """From the summary, with what this transaction has counted but not yet written."""
        from opsgate.trust import summary_figures

        days, latest = summary_sql.read(
            self._conn,
            self._store.dialect,
            proposer_id,
            action_type,
            environment,
            since,
            self._summary,
        )
        return summary_figures(days, latest, action_type, environment)

    def track_record_facts(
        self, proposer_id: str, action_type: str, environment: str, since: datetime, until: datetime
    ) -> Facts:
        """In this transaction: a decision sees what its own transaction sees."""
        from opsgate.trust import sql_facts

        return sql_facts(
            self._store, self._conn, proposer_id, action_type, environment, since, until
        )

    @_translate_errors
    def revoke_api_token(self, token_id: str, at: datetime, by: str) -> ApiToken | None:
        row = self._conn.execute(
            _REVOKE_API_TOKEN, {"token_id": token_id, "at": at, "by": by}
        ).first()
        return api_token_from_row(row._mapping) if row is not None else None


_SELECT_API_TOKEN = select(api_tokens).where(api_tokens.c.id == bindparam("token_id"))
_LIST_API_TOKENS = select(api_tokens).order_by(api_tokens.c.created_at, api_tokens.c.id)
_REVOKE_API_TOKEN = (
    update(api_tokens)
    .where(api_tokens.c.id == bindparam("token_id"), api_tokens.c.revoked_at.is_(None))
    .values(revoked_at=bindparam("at"), revoked_by=bindparam("by"))
    .returning(api_tokens)
)

# Statements are built once, with bind parameters: building and cache-keying a select on
# every call costs more than running it on SQLite.
_SELECT_ACTION = select(actions).where(actions.c.id == bindparam("action_id"))
_LOCK_ACTION = _SELECT_ACTION.with_for_update()
_ACTION_BY_KEY = select(actions).where(
    actions.c.idempotency_key == bindparam("key"),
    actions.c.proposer_id == bindparam("proposer_id"),
)
_DUE_FOR_EXPIRY = (
    select(actions)
    .where(
        actions.c.state.in_(_EXPIRABLE),
        actions.c.expires_at.is_not(None),
        actions.c.expires_at <= bindparam("now", type_=actions.c.expires_at.type),
    )
    .order_by(actions.c.expires_at, actions.c.id)
)
_DECISIONS_OF = (
    select(decisions)
    .where(decisions.c.action_id == bindparam("action_id"))
    .order_by(decisions.c.decided_at, decisions.c.id)
)
_APPROVALS_OF = (
    select(approvals)
    .where(approvals.c.action_id == bindparam("action_id"))
    .order_by(approvals.c.created_at, approvals.c.id)
)
_COUNT_ACTIVE = (
    select(func.count())
    .select_from(actions)
    .where(
        actions.c.target == bindparam("target"),
        actions.c.environment == bindparam("environment"),
        actions.c.state.in_(_ACTIVE),
    )
)
_COUNT_ACTIVE_EXCLUDING = _COUNT_ACTIVE.where(actions.c.id != bindparam("exclude_id"))
_AUDIT_PAGE_ALL = (
    select(audit_events)
    .where(audit_events.c.seq > bindparam("after"))
    .order_by(audit_events.c.seq)
    .limit(_AUDIT_PAGE)
)
_AUDIT_PAGE_OF = _AUDIT_PAGE_ALL.where(audit_events.c.action_id == bindparam("action_id"))
_AUDIT_CHECKPOINTS = select(
    audit_checkpoints.c.seq,
    audit_checkpoints.c.hash,
    audit_checkpoints.c.at,
    audit_checkpoints.c.key_id,
    audit_checkpoints.c.signature,
).order_by(audit_checkpoints.c.seq, audit_checkpoints.c.id)
_INSERT_OUTBOX = insert(outbox)
_ROW_COUNTS = select(
    *(select(func.count()).select_from(t).scalar_subquery().label(t.name) for t in _COUNTED)
)
# The segment of the action a row is about, read inside the INSERT that stores the row.
_SEGMENT_OF_ACTION = (
    select(actions.c.segment_id)
    .where(actions.c.id == bindparam("segment_of", type_=actions.c.id.type))
    .scalar_subquery()
)
_INSERT_DECISION = insert(decisions).values(segment_id=_SEGMENT_OF_ACTION)
_WHO_OF = select(actions.c.proposer_id, actions.c.action_type, actions.c.environment).where(
    actions.c.id == bindparam("action_id")
)
# The columns whose change can change a track record's count.
_ACTION_COUNTED = frozenset({"state", "approved_at", "created_at"})
_EXECUTION_COUNTED = frozenset(
    {
        "run_started_at",
        "outcome",
        "rollback_decided_at",
        "rollback_requested_by",
        "finished_at",
        "rollback_verified_at",
    }
)


def _action_counts(action: Action) -> Counts:
    return action_counts(action.created_at, action.state, action.approved_at)


def _execution_counts(execution: Execution) -> Counts:
    e = execution
    return execution_counts(
        e.run_started_at,
        e.outcome,
        e.rollback_decided_at,
        e.rollback_requested_by,
        e.finished_at,
        e.rollback_verified_at,
    )


def _execution_latest(execution: Execution) -> Latest:
    e = execution
    return execution_latest(e.finished_at, e.outcome, e.rollback_decided_at, e.rollback_verified_at)


_LAST_TRUST_RESET = (
    select(trust_resets.c.at)
    .where(
        trust_resets.c.proposer_id == bindparam("proposer_id"),
        trust_resets.c.action_type == bindparam("action_type"),
        trust_resets.c.at <= bindparam("before", type_=trust_resets.c.at.type),
    )
    .order_by(trust_resets.c.at.desc())
    .limit(1)
)
_STATE_FIELDS = {
    name: update(executions)
    .where(executions.c.action_id == bindparam("key"))
    .values({name: bindparam("state", type_=executions.c[name].type)})
    for name in ("verify_state", "rollback_verify_state")
}
_OWNERS = select(
    executions.c.action_id, executions.c.worker_id, executions.c.rollback_requested_by
).where(executions.c.action_id.in_(bindparam("ids", expanding=True)))
_SEGMENT_ID = select(segments.c.id).where(
    *(segments.c[name] == bindparam(name) for name in SEGMENT_COLUMNS)
)
_INSERT_APPROVAL = insert(approvals)
_INSERT_AUDIT_EVENT = insert(audit_events)
_HEAD_FOR_UPDATE = (
    select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1).with_for_update()
)
_MOVE_HEAD = (
    update(audit_head)
    .where(audit_head.c.id == 1)
    .values(seq=bindparam("new_seq"), hash=bindparam("new_hash"))
)
_AUDIT_COLUMNS = [c.name for c in audit_events.c]


@functools.lru_cache(maxsize=16)
def _insert_events_moving_head(count: int) -> Executable:
    """PostgreSQL: `WITH moved AS (UPDATE audit_head ...) INSERT INTO audit_events VALUES
    (...), ...` -- the events and the head in one statement, for `count` events."""
    rows = [
        {
            name: bindparam(f"e{i}_{name}", type_=audit_events.c[name].type)
            for name in _AUDIT_COLUMNS
        }
        for i in range(count)
    ]
    return insert(audit_events).values(rows).add_cte(_MOVE_HEAD.cte("moved_head"))


def _flat(rows: Sequence[Mapping[str, Any]], extra: Mapping[str, Any]) -> dict[str, Any]:
    flat = dict(extra)
    for i, row in enumerate(rows):
        for name in _AUDIT_COLUMNS:
            flat[f"e{i}_{name}"] = row[name]
    return flat


_CLAIM_NEXT = (
    select(actions)
    .where(
        actions.c.state == ActionState.APPROVED.value,
        or_(
            actions.c.expires_at.is_(None),
            actions.c.expires_at > bindparam("now", type_=actions.c.expires_at.type),
        ),
    )
    .order_by(actions.c.created_at, actions.c.id)
    .limit(1)
)
# Another worker's claimed row is skipped, not waited for: claims never queue.
_CLAIM_NEXT_SKIP_LOCKED = _CLAIM_NEXT.with_for_update(skip_locked=True)
_SELECT_EXECUTION = select(executions).where(executions.c.action_id == bindparam("action_id"))
_LOCK_EXECUTION = _SELECT_EXECUTION.with_for_update()
_COUNT_RUNNING = (
    select(func.count())
    .select_from(executions)
    .where(
        executions.c.target == bindparam("target"),
        executions.c.environment == bindparam("environment"),
        executions.c.finished_at.is_(None),
    )
)
_COUNT_RUNNING_EXCLUDING = _COUNT_RUNNING.where(executions.c.action_id != bindparam("exclude_id"))
_INSERT_EXECUTION = insert(executions)
_INSERT_MEASUREMENT = insert(measurements)
_MEASUREMENTS_OF = (
    select(measurements)
    .where(measurements.c.action_id == bindparam("action_id"))
    .order_by(measurements.c.id)
)
_UNFINISHED_EXECUTIONS = (
    select(executions)
    .where(executions.c.finished_at.is_(None))
    .order_by(executions.c.claimed_at, executions.c.action_id)
)
_LAPSED_EXECUTIONS = (
    select(executions)
    .where(
        executions.c.finished_at.is_(None),
        executions.c.lease_expires_at < bindparam("now", type_=executions.c.lease_expires_at.type),
    )
    .order_by(executions.c.lease_expires_at, executions.c.action_id)
)
# Rows are locked in action id order (as the verification tick updates them): two
# multi-row lockers that take rows in different orders deadlock.
_RENEW_LEASES = (
    update(executions)
    .where(
        executions.c.action_id.in_(
            select(executions.c.action_id)
            .where(
                executions.c.worker_id == bindparam("owner"),
                executions.c.finished_at.is_(None),
            )
            .order_by(executions.c.action_id)
            .with_for_update()
            .scalar_subquery()
        ),
        executions.c.worker_id == bindparam("owner"),
        executions.c.finished_at.is_(None),
    )
    .values(
        lease_expires_at=bindparam("until", type_=executions.c.lease_expires_at.type),
        heartbeat_at=bindparam("now", type_=executions.c.heartbeat_at.type),
    )
)
_WORKER_HEARTBEAT = (
    update(workers)
    .where(workers.c.id == bindparam("worker_id"))
    .values(heartbeat_at=bindparam("now", type_=workers.c.heartbeat_at.type))
)
_STOP_WORKER = (
    update(workers)
    .where(workers.c.id == bindparam("worker_id"))
    .values(stopped_at=bindparam("now", type_=workers.c.stopped_at.type))
)
_LIST_WORKERS = select(workers).order_by(workers.c.heartbeat_at.desc(), workers.c.id)


@functools.cache
def _dialect_statements(name: str) -> tuple[Executable, Executable, Executable, Executable]:
    """The statements whose SQL differs by dialect, built (and the dialect imported) on
    first use: a SQLite user never loads the PostgreSQL dialect and its asyncio."""
    dialect: Any = importlib.import_module(f"sqlalchemy.dialects.{name}")
    # ON CONFLICT on the (proposer, key) pair alone; any other constraint still raises.
    insert_action = (
        dialect.insert(actions)
        .on_conflict_do_nothing(index_elements=[actions.c.proposer_id, actions.c.idempotency_key])
        .returning(actions.c.id)
    )
    # A worker that restarts under the same id replaces its row.
    upsert = dialect.insert(workers)
    upsert_worker = upsert.on_conflict_do_update(
        index_elements=[workers.c.id],
        set_={c.name: upsert.excluded[c.name] for c in workers.c if c.name != "id"},
    )
    insert_segment = dialect.insert(segments).on_conflict_do_nothing()
    # A conflict on the unfinished-executions index (the target is busy) inserts nothing;
    # any other constraint (the action's own finished row) still raises.
    insert_execution = (
        dialect.insert(executions)
        .values(segment_id=_SEGMENT_OF_ACTION)
        .on_conflict_do_nothing(
            index_elements=[executions.c.target, executions.c.environment],
            index_where=executions.c.finished_at.is_(None),
        )
        .returning(executions.c.action_id)
    )
    return insert_action, upsert_worker, insert_segment, insert_execution


def _count_running(
    target: str, environment: str, exclude_id: str | None
) -> tuple[Select[Any], dict[str, Any]]:
    params = {"target": target, "environment": environment}
    if exclude_id is None:
        return _COUNT_RUNNING, params
    return _COUNT_RUNNING_EXCLUDING, {**params, "exclude_id": exclude_id}


_HOLDERS_LIMIT = 5
_HOLDERS_ACTIVE = (
    select(actions.c.id, actions.c.state)
    .where(
        actions.c.target == bindparam("target"),
        actions.c.environment == bindparam("environment"),
        actions.c.state.in_(_ACTIVE),
    )
    .order_by(actions.c.created_at.desc(), actions.c.id.desc())
    .limit(_HOLDERS_LIMIT)
)
_HOLDERS_RUNNING = (
    select(actions.c.id, actions.c.state)
    .select_from(executions.join(actions, actions.c.id == executions.c.action_id))
    .where(
        executions.c.target == bindparam("target"),
        executions.c.environment == bindparam("environment"),
        executions.c.finished_at.is_(None),
    )
    .order_by(actions.c.created_at.desc(), actions.c.id.desc())
    .limit(_HOLDERS_LIMIT)
)
_NEIGHBOURS = select(
    select(func.max(actions.c.id))
    .where(actions.c.id < bindparam("action_id"))
    .scalar_subquery()
    .label("before"),
    select(func.min(actions.c.id))
    .where(actions.c.id > bindparam("action_id"))
    .scalar_subquery()
    .label("after"),
)


def _holders(running: bool, exclude_id: str | None) -> Select[Any]:
    statement = _HOLDERS_RUNNING if running else _HOLDERS_ACTIVE
    if exclude_id is not None:
        statement = statement.where(actions.c.id != bindparam("exclude_id"))
    return statement


def _busy_message(execution: Execution) -> str:
    return f"another action is executing on {execution.target} ({execution.environment})"


def _violates_running_index(exc: IntegrityError) -> bool:
    """Whether the unique index on unfinished executions refused the insert."""
    diag = getattr(exc.orig, "diag", None)  # psycopg names the violated constraint
    if diag is not None:
        return bool(diag.constraint_name == RUNNING_ON_TARGET_INDEX)
    # sqlite3 only has the message: "UNIQUE constraint failed: executions.target, ..."
    return "executions.target" in str(exc.orig)


def _count_active(
    target: str, environment: str, exclude_id: str | None
) -> tuple[Select[Any], dict[str, Any]]:
    params = {"target": target, "environment": environment}
    if exclude_id is None:
        return _COUNT_ACTIVE, params
    return _COUNT_ACTIVE_EXCLUDING, {**params, "exclude_id": exclude_id}


# --- rows <-> models ---------------------------------------------------------------------


def mutable_values(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Column values for an action update; ValueError for a field that may not change."""
    refuse_immutable(fields, MUTABLE_ACTION_FIELDS, "an action")
    values = dict(fields)
    if "state" in values:
        values["state"] = ActionState(values["state"]).value
    if "approver_roles" in values:
        values["approver_roles"] = [str(role) for role in values["approver_roles"]]
    if "required_approvals" in values:
        values["required_approvals"] = int(values["required_approvals"])
    return values


def segment_key(action: Action) -> dict[str, str]:
    """An action's report segment; '' where the incident did not say."""
    return {
        "severity": action.incident.severity or "",
        "incident_class": action.incident.class_ or "",
        "tier": action.incident.tier or "",
        "environment": action.environment,
        "action": action.action_type,
        "proposer_kind": action.proposer.kind,
        "proposer_id": action.proposer.id,
    }


def action_to_row(action: Action) -> dict[str, Any]:
    return {
        "id": action.id,
        "action_type": action.action_type,
        "target": action.target,
        "environment": action.environment,
        "params": action.params,
        "reason": action.reason,
        "incident_id": action.incident.id,
        "incident_severity": action.incident.severity,
        "incident_class": action.incident.class_,
        "incident_tier": action.incident.tier,
        "verification": action.verification.model_dump(mode="json", by_alias=True),
        "risk": action.risk,
        "reversible": action.reversible,
        "spec_hash": action.spec_hash,
        "proposer_id": action.proposer.id,
        "proposer_kind": action.proposer.kind,
        "state": action.state.value,
        "required_approvals": action.required_approvals,
        "approver_roles": list(action.approver_roles),
        "idempotency_key": action.idempotency_key,
        "created_at": action.created_at,
        "updated_at": action.updated_at,
        "expires_at": action.expires_at,
        "approved_at": action.approved_at,
    }


def action_from_row(row: Mapping[Any, Any]) -> Action:
    return Action.model_validate(
        {
            "id": row["id"],
            "action_type": row["action_type"],
            "target": row["target"],
            "environment": row["environment"],
            "params": row["params"],
            "reason": row["reason"],
            "incident": {
                "id": row["incident_id"],
                "severity": row["incident_severity"],
                "class": row["incident_class"],
                "tier": row["incident_tier"],
            },
            "verification": row["verification"],
            "risk": row["risk"],
            "reversible": row["reversible"],
            "spec_hash": row["spec_hash"],
            "proposer": {"id": row["proposer_id"], "kind": row["proposer_kind"]},
            "state": row["state"],
            "required_approvals": row["required_approvals"],
            "approver_roles": row["approver_roles"],
            "idempotency_key": row["idempotency_key"],
            "created_at": row["created_at"],
            "updated_at": row["updated_at"],
            "expires_at": row["expires_at"],
            "approved_at": row["approved_at"],
        }
    )


def decision_to_row(decision: Decision) -> dict[str, Any]:
    return {
        "id": decision.id,
        "action_id": decision.action_id,
        "phase": decision.phase,
        "allow": decision.allow,
        "deny": [{"code": d.code, "message": d.message} for d in decision.deny],
        "deny_codes": decision.deny_codes,
        "required_approvals": decision.required_approvals,
        "approver_roles": list(decision.approver_roles),
        "engine": decision.engine,
        "bundle_revision": decision.bundle_revision,
        "input": decision.input,
        "result": decision.result,
        "error": decision.error,
        "decided_at": decision.decided_at,
        "duration_ms": decision.duration_ms,
        "deny_key": json.dumps(decision.deny_codes) if decision.deny else None,
        "shadow": decision.shadow,
    }


def decision_from_row(row: Mapping[Any, Any]) -> Decision:
    fields = dict(row)
    for derived in ("deny_codes", "segment_id", "deny_key"):
        fields.pop(derived, None)
    return Decision.model_validate(fields)


def approval_to_row(approval: Approval) -> dict[str, Any]:
    return {
        "id": approval.id,
        "action_id": approval.action_id,
        "approver_id": approval.approver.id,
        "approver_kind": approval.approver.kind,
        "spec_hash": approval.spec_hash,
        "comment": approval.comment,
        "created_at": approval.created_at,
    }


def approval_from_row(row: Mapping[Any, Any]) -> Approval:
    return Approval.model_validate(
        {
            "id": row["id"],
            "action_id": row["action_id"],
            "approver": {"id": row["approver_id"], "kind": row["approver_kind"]},
            "spec_hash": row["spec_hash"],
            "comment": row["comment"],
            "created_at": row["created_at"],
        }
    )


def audit_event_to_row(event: AuditEvent) -> dict[str, Any]:
    return event.model_dump()


def audit_event_from_row(row: Mapping[Any, Any]) -> AuditEvent:
    return AuditEvent.model_validate(dict(row))


# Built once: one adapter per field, so an update is checked like a whole model would be.
_EXECUTION_FIELD_TYPES = {
    name: TypeAdapter[Any](info.rebuild_annotation())
    for name, info in Execution.model_fields.items()
    if name in MUTABLE_EXECUTION_FIELDS
}


def mutable_execution_values(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Column values for an execution update; ValueError for a field that may not change."""
    refuse_immutable(fields, MUTABLE_EXECUTION_FIELDS, "an execution")
    # A bad value (an unknown outcome) is refused before it is written, not when read back.
    values = {}
    for name, value in fields.items():
        try:
            values[name] = _EXECUTION_FIELD_TYPES[name].validate_python(value)
        except ValidationError as exc:
            raise ValueError(f"invalid {name} for an execution: {_first_error(exc)}") from None
    return values


def _first_error(exc: ValidationError) -> str:
    return str(exc.errors()[0]["msg"]).splitlines()[0]


def execution_to_row(execution: Execution) -> dict[str, Any]:
    return execution.model_dump()


def execution_from_row(row: Mapping[Any, Any]) -> Execution:
    fields = dict(row)
    fields.pop("segment_id", None)
    return Execution.model_validate(fields)


def measurement_to_row(measurement: Measurement) -> dict[str, Any]:
    return measurement.model_dump()


def measurement_from_row(row: Mapping[Any, Any]) -> Measurement:
    fields = dict(row)
    fields.pop("id", None)
    return Measurement.model_validate(fields)


def worker_to_row(worker: WorkerInfo) -> dict[str, Any]:
    return worker.model_dump()


def worker_from_row(row: Mapping[Any, Any]) -> WorkerInfo:
    return WorkerInfo.model_validate(dict(row))


def api_token_to_row(token: ApiToken) -> dict[str, Any]:
    row = token.model_dump()
    row["groups"] = list(token.groups)
    return row


def outbox_item_from_row(row: Mapping[Any, Any]) -> OutboxItem:
    values = dict(row)
    values["delivered_to"] = tuple(values["delivered_to"] or ())
    return OutboxItem(**values)


def api_token_from_row(row: Mapping[Any, Any]) -> ApiToken:
    return ApiToken.model_validate(dict(row))
