"""Run `opsgate ARGS...` in this process and count what it costs the database.

    python bench/_probe.py STATS.json worker --poll 0.2

SQLAlchemy's engine and pool events, listened to from here, count in every engine the
command opens: statements sent (`before_cursor_execute`; an executemany is one),
transactions committed (`commit`), and how long each transaction held the audit
chain's head row (from the first statement on `audit_head` returning -- the lock is
taken by then -- until the connection goes back to the pool, i.e. after COMMIT). The
process CPU time is read at the first statement and at every commit, so CPU per action
leaves out interpreter start-up and the idle polls after the last action.

Nothing in opsgate changes: without this wrapper none of these listeners exist. The
counts are written as JSON to STATS.json when the command exits, with the statements
by kind (`UPDATE executions`, `SELECT audit_head`, ...). With BENCH_PROFILE=FILE set,
every thread also runs under cProfile (thread CPU time) and the merged profile is
written to FILE.PID.
"""

from __future__ import annotations

import atexit
import cProfile
import json
import os
import pstats
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_HEAD_LOCKED = "bench_audit_head_locked_at"


class Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statements = 0
        self.commits = 0
        self.head_holds: list[float] = []  # seconds
        self.cpu_first: float | None = None
        self.cpu_last_commit: float | None = None
        self.kinds: Counter[str] = Counter()

    def as_json(self) -> dict[str, Any]:
        with self.lock:
            return {
                "statements": self.statements,
                "commits": self.commits,
                "head_holds": self.head_holds,
                "cpu_seconds": (self.cpu_last_commit or 0.0) - (self.cpu_first or 0.0),
                "kinds": dict(self.kinds),
            }


COUNTERS = Counters()


def install() -> None:
    @event.listens_for(Engine, "before_cursor_execute")
    def _statement(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        kind = statement_kind(statement)
        with COUNTERS.lock:
            COUNTERS.statements += 1
            COUNTERS.kinds[kind] += 1
            if COUNTERS.cpu_first is None:
                COUNTERS.cpu_first = time.process_time()

    @event.listens_for(Engine, "after_cursor_execute")
    def _executed(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "audit_head" in statement and _HEAD_LOCKED not in conn.info:
            conn.info[_HEAD_LOCKED] = time.perf_counter()

    @event.listens_for(Engine, "commit")
    def _commit(_conn: Any) -> None:
        with COUNTERS.lock:
            COUNTERS.commits += 1
            COUNTERS.cpu_last_commit = time.process_time()

    @event.listens_for(Pool, "checkin")
    def _checkin(_dbapi: Any, record: Any) -> None:
        locked = record.info.pop(_HEAD_LOCKED, None) if record is not None else None
        if locked is not None:
            held = time.perf_counter() - locked
            with COUNTERS.lock:
                COUNTERS.head_holds.append(held)


def statement_kind(sql: str) -> str:
    """`UPDATE executions`, `SELECT actions FOR UPDATE`, `WITH audit_head INSERT`."""
    words = sql.replace("\n", " ").replace("(", " ").split()
    if not words:
        return "?"
    upper = [w.upper() for w in words]
    verb = upper[0]
    if verb == "WITH":
        return "WITH (UPDATE audit_head) INSERT audit_events"
    if verb in ("UPDATE", "DELETE") and len(words) > 1:
        return f"{verb} {words[1]}"
    if verb == "INSERT" and len(words) > 2:
        return f"INSERT {words[2]}"
    if verb == "SELECT":
        table = words[upper.index("FROM") + 1] if "FROM" in upper else "?"
        if "COUNT" in sql.upper()[:40]:
            table = f"count {table}"
        return f"SELECT {table}{' FOR UPDATE' if 'FOR UPDATE' in sql.upper() else ''}"
    return verb


PROFILES: list[cProfile.Profile] = []


def _profile_this_thread(*_args: Any) -> None:
    # Runs once per new thread, then the thread's own profiler replaces this hook.
    # CPU time, not wall: what costs the worker CPU, not what it waits for.
    profile = cProfile.Profile(time.thread_time)
    PROFILES.append(profile)
    profile.enable()


def _write_profile(path: Path) -> None:
    stats: pstats.Stats | None = None
    for profile in PROFILES:
        # A thread still running at exit may refuse; its profile is left out.
        try:
            profile.create_stats()
        except Exception:
            continue
        if stats is None:
            stats = pstats.Stats(profile)
        else:
            stats.add(profile)
    if stats is not None:
        stats.dump_stats(str(path))


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: _probe.py STATS.json opsgate-args...", file=sys.stderr)
        return 2
    out = Path(argv[0])
    install()
    profile_to = os.environ.get("BENCH_PROFILE")
    if profile_to:
        threading.setprofile(_profile_this_thread)
        _profile_this_thread()
        atexit.register(_write_profile, Path(f"{profile_to}.{os.getpid()}"))
    # Registered last, so it runs first: the counts are there even if profiling is slow.
    atexit.register(lambda: out.write_text(json.dumps(COUNTERS.as_json())))
    from opsgate.cli import main as opsgate_main

    sys.argv = ["opsgate", *argv[1:]]
    return int(opsgate_main() or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
