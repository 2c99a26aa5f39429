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
counts are written as JSON to STATS.json when the command exits.
"""

from __future__ import annotations

import atexit
import json
import sys
import threading
import time
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

    def as_json(self) -> dict[str, Any]:
        with self.lock:
            return {
                "statements": self.statements,
                "commits": self.commits,
                "head_holds": self.head_holds,
                "cpu_seconds": (self.cpu_last_commit or 0.0) - (self.cpu_first or 0.0),
            }


COUNTERS = Counters()


def install() -> None:
    @event.listens_for(Engine, "before_cursor_execute")
    def _statement(*_args: Any) -> None:
        with COUNTERS.lock:
            COUNTERS.statements += 1
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


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: _probe.py STATS.json opsgate-args...", file=sys.stderr)
        return 2
    out = Path(argv[0])
    install()
    atexit.register(lambda: out.write_text(json.dumps(COUNTERS.as_json())))
    from opsgate.cli import main as opsgate_main

    sys.argv = ["opsgate", *argv[1:]]
    return int(opsgate_main() or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
