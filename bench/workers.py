"""1, 2 and 4 `opsgate worker` processes on PostgreSQL draining N approved no-op actions.

Each round gets a fresh database, copied from one template that holds the N approved
actions (`CREATE DATABASE ... TEMPLATE`), so every round starts from the same state.
A round is timed from starting the worker processes until every action is terminal.
Verification is real: a real Prometheus (scraping a fault service) answers an
always-passing query every `--interval` seconds, with `hold: 0s`.

Prints actions/s per round and the scaling ratio 4-workers / 1-worker from the same
run, checks that no action was claimed twice (one `action.executing` event and one
execution per action) and that every action succeeded. Target: ratio >= 1.6.

While a round runs, PostgreSQL's `pg_stat_activity` is sampled to show what the
workers' connections wait for (the audit head row lock serialises every transition),
and the CPU time of the workers and of PostgreSQL is read from /proc: the evidence for
where the time goes when the ratio misses.

    .venv/bin/python bench/workers.py [--actions 2000] [--workers 1,2,4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from threading import Event, Thread
from typing import Any

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from ulid import ULID

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opsgate.catalog import load_catalog  # noqa: E402
from opsgate.gate import Gate  # noqa: E402
from opsgate.models import ActionState, Identity  # noqa: E402
from opsgate.policies.embedded import EmbeddedEngine  # noqa: E402
from opsgate.store import open_store  # noqa: E402
from tests.integration.fault_service import FaultService  # noqa: E402
from tests.integration.prom import PrometheusServer, prometheus_binary  # noqa: E402

ADMIN_URL = os.environ.get(
    "OPSGATE_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
ALICE = Identity(id="alice", kind="human")
BOB = Identity(id="bob", kind="human")
TARGET_RATIO = 1.6
TERMINAL = sorted(s.value for s in ActionState if s.terminal)


def catalog_document(interval: float) -> dict[str, Any]:
    return {
        "name": "restart_service",
        "risk": "medium",
        "run": {"argv": ["true"], "timeout": "30s"},
        "undo": {"argv": ["true"], "timeout": "30s"},
        "verification": {
            "interval": f"{interval}s",
            "hold": "0s",
            "timeout": "60s",
            "signals": [{"name": "up", "query": "vector(1)", "pass": {"min": 1}}],
            "stop_conditions": [{"name": "never", "query": "vector(0)", "halt": {"min": 1}}],
            "failure_limit": 0,
            "error_limit": 3,
        },
    }


def database_url(name: str) -> str:
    return make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def fill_template(url: str, catalog: Path, actions: int) -> float:
    """Migrate and fill the template with `actions` approved actions; seconds taken."""
    started = time.perf_counter()
    store = open_store(url)
    try:
        store.migrate()
        gate = Gate(
            store=store,
            catalog=load_catalog(catalog),
            engine=EmbeddedEngine(ROOT / "policies"),
            approval_ttl=24 * 3600.0,
        )
        for i in range(actions):
            proposed = gate.propose(
                {
                    "action": "restart_service",
                    "target": f"svc-{i}",
                    "environment": "staging",
                    "reason": "workers benchmark",
                },
                ALICE,
            )
            gate.approve(proposed.action.id, BOB)
    finally:
        store.close()
    return time.perf_counter() - started


@dataclass
class Sampler:
    """Samples what the round database's connections are doing, every `every` s."""

    engine: Engine
    database: str
    every: float = 0.05
    waits: Counter[str] = field(default_factory=Counter)
    samples: int = 0
    _stop: Event = field(default_factory=Event)
    _thread: Thread | None = None

    def start(self) -> None:
        self._thread = Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        query = text(
            "SELECT state, wait_event_type, wait_event, query FROM pg_stat_activity "
            "WHERE datname = :db AND pid <> pg_backend_pid()"
        )
        with self.engine.connect() as conn:
            while not self._stop.wait(self.every):
                rows = conn.execute(query, {"db": self.database}).all()
                self.samples += 1
                for state, wait_type, wait_event, sql in rows:
                    if state == "idle in transaction":
                        # the transaction is open and waits for the worker's Python to
                        # send its next statement; its locks are held meanwhile
                        what = "idle in transaction, after"
                    elif state == "active":
                        what = f"{wait_type}:{wait_event}" if wait_type else "on CPU"
                    else:
                        continue
                    head = "audit_head" if "audit_head" in (sql or "") else _verb(sql or "")
                    self.waits[f"{what} ({head})"] += 1


def _verb(sql: str) -> str:
    """`UPDATE executions`, `SELECT actions FOR UPDATE`, `COMMIT`: enough to tell apart."""
    words = sql.replace("\n", " ").split()
    if not words:
        return "?"
    verb = words[0].upper()
    if verb == "UPDATE" and len(words) > 1:
        return f"UPDATE {words[1]}"
    if verb == "INSERT" and len(words) > 2:
        return f"INSERT {words[2]}"
    if verb == "SELECT":
        upper = [w.upper() for w in words]
        table = words[upper.index("FROM") + 1] if "FROM" in upper else "?"
        locking = " FOR UPDATE" if "UPDATE" in upper[-4:] else ""
        skip = " SKIP LOCKED" if "SKIP" in upper[-3:] else ""
        return f"SELECT {table}{locking}{skip}"
    return verb


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its reaped children, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def postgres_cpu() -> float:
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith("postgres"):
            total += cpu_seconds(int(entry.name))
    return total


@dataclass
class Round:
    workers: int
    seconds: float
    actions: int
    states: dict[str, int]
    claims_max: int
    executions: int
    claims_by_worker: list[int]
    phases: dict[str, float]
    worker_cpu: float
    pg_cpu: float
    waits: Counter[str]
    samples: int
    exit_codes: list[int]
    events: int

    @property
    def rate(self) -> float:
        return self.actions / self.seconds

    @property
    def ok(self) -> bool:
        return (
            self.claims_max == 1
            and self.executions == self.actions
            and self.states == {"succeeded": self.actions}
            and all(code == 0 for code in self.exit_codes)
        )


PHASES_SQL = text(
    """
    WITH e AS (
        SELECT action_id, kind, at FROM audit_events
        WHERE kind IN ('action.executing', 'execution.run_started',
                       'execution.run_finished', 'action.verifying', 'action.succeeded')
    ), p AS (
        SELECT action_id,
               max(at) FILTER (WHERE kind = 'action.executing') AS claimed,
               max(at) FILTER (WHERE kind = 'execution.run_started') AS run_started,
               max(at) FILTER (WHERE kind = 'execution.run_finished') AS run_finished,
               max(at) FILTER (WHERE kind = 'action.verifying') AS verifying,
               max(at) FILTER (WHERE kind = 'action.succeeded') AS ended
        FROM e GROUP BY action_id
    )
    SELECT avg(extract(epoch FROM run_started - claimed)) AS "claimed -> run started",
           avg(extract(epoch FROM run_finished - run_started)) AS "run (spawn + exit)",
           avg(extract(epoch FROM verifying - run_finished)) AS "run finished -> verifying",
           avg(extract(epoch FROM ended - verifying)) AS "verifying -> succeeded",
           extract(epoch FROM max(claimed) - min(claimed)) AS "first to last claim",
           extract(epoch FROM max(ended) - min(claimed)) AS "first claim to last end"
    FROM p
    """
)


@contextmanager
def worker_processes(
    env: dict[str, str], count: int, logs: Path
) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(count):
            with open(logs / f"worker-{count}-{i}.log", "wb") as log:
                started.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "opsgate", "worker", "--poll", "0.2"],
                        env=env,
                        cwd=ROOT,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)


def run_round(
    admin: Engine,
    template: str,
    workers: int,
    actions: int,
    catalog: Path,
    prometheus_url: str,
    logs: Path,
    timeout: float,
) -> Round:
    name = f"opsgate_bench_{str(ULID()).lower()}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    url = database_url(name)
    engine = create_engine(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSGATE_")}
    env.update(
        {
            "OPSGATE_DB": url,
            "OPSGATE_CATALOG": str(catalog),
            "OPSGATE_POLICIES": str(ROOT / "policies"),
            "OPSGATE_PROMETHEUS_URL": prometheus_url,
            "OPSGATE_IDENTITY": "env",
            "OPSGATE_USER": "bob",
            "OPSGATE_LEASE": "30s",
        }
    )
    remaining = text("SELECT count(*) FROM actions WHERE NOT (state = ANY(:terminal))")
    sampler = Sampler(admin, name)
    try:
        pg_before = postgres_cpu()
        started = time.perf_counter()
        with worker_processes(env, workers, logs) as processes:
            sampler.start()
            deadline = started + timeout
            with engine.connect() as conn:
                while conn.execute(remaining, {"terminal": TERMINAL}).scalar_one():
                    if time.perf_counter() > deadline:
                        raise SystemExit(f"{workers} worker(s): not done after {timeout:g}s")
                    dead = [i for i, p in enumerate(processes) if p.poll() is not None]
                    if dead:
                        log = logs / f"worker-{workers}-{dead[0]}.log"
                        tail = "\n".join(log.read_text(errors="replace").splitlines()[-5:])
                        raise SystemExit(
                            f"{workers} worker(s): worker {dead[0]} exited early with "
                            f"{processes[dead[0]].returncode} (log kept in {log}):\n{tail}"
                        )
                    time.sleep(0.1)
                    conn.rollback()
            seconds = time.perf_counter() - started
            sampler.stop()
            worker_cpu = sum(cpu_seconds(p.pid) for p in processes)
            pg_cpu = postgres_cpu() - pg_before
            for process in processes:
                process.send_signal(signal.SIGTERM)
            exit_codes = [process.wait(timeout=60) for process in processes]
        with engine.connect() as conn:
            states: dict[str, int] = {
                str(state): int(count)
                for state, count in conn.execute(
                    text("SELECT state, count(*) FROM actions GROUP BY state")
                ).all()
            }
            claims = conn.execute(
                text(
                    "SELECT action_id, count(*) FROM audit_events "
                    "WHERE kind = 'action.executing' GROUP BY action_id"
                )
            ).all()
            by_worker = conn.execute(
                text(
                    "SELECT actor, count(*) FROM audit_events "
                    "WHERE kind = 'action.executing' GROUP BY actor ORDER BY 2 DESC"
                )
            ).all()
            executions = conn.execute(text("SELECT count(*) FROM executions")).scalar_one()
            phase_row = conn.execute(PHASES_SQL).mappings().one()
            events = conn.execute(
                text(
                    "SELECT count(*) FROM audit_events WHERE kind NOT IN "
                    "('action.pending_approval', 'approval.added', 'action.approved')"
                )
            ).scalar_one()
        return Round(
            workers=workers,
            seconds=seconds,
            actions=actions,
            states=states,
            claims_max=max((int(c) for _, c in claims), default=0),
            executions=int(executions),
            claims_by_worker=[int(c) for _, c in by_worker],
            phases={k: float(v or 0.0) for k, v in phase_row.items()},
            worker_cpu=worker_cpu,
            pg_cpu=pg_cpu,
            waits=sampler.waits,
            samples=sampler.samples,
            exit_codes=exit_codes,
            events=int(events),
        )
    finally:
        sampler.stop()
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def chain_append_ceiling(admin: Engine, appends: int = 500) -> float:
    """Serialised appends/s one connection gets: lock the head row, insert, move the
    head, durable commit -- what every opsgate transition does to the audit chain."""
    name = f"opsgate_bench_chain_{str(ULID()).lower()}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine = create_engine(database_url(name))
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE chain (seq bigint PRIMARY KEY, hash text)"))
            conn.execute(text("CREATE TABLE head (id int PRIMARY KEY, seq bigint, hash text)"))
            conn.execute(text("INSERT INTO head VALUES (1, 0, '')"))
        started = time.perf_counter()
        with engine.connect() as conn:
            for _ in range(appends):
                with conn.begin():
                    seq, _hash = conn.execute(
                        text("SELECT seq, hash FROM head WHERE id = 1 FOR UPDATE")
                    ).one()
                    conn.execute(
                        text("INSERT INTO chain VALUES (:s, :h)"), {"s": seq + 1, "h": "x" * 64}
                    )
                    conn.execute(text("UPDATE head SET seq = :s WHERE id = 1"), {"s": seq + 1})
        return appends / (time.perf_counter() - started)
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def report(rounds: Sequence[Round], verbose: bool, ceiling: float) -> bool:
    print()
    print(f"{'workers':>7} {'seconds':>8} {'actions/s':>10} {'claims per worker':>24} "
          f"{'worker CPU s':>12} {'postgres CPU s':>14}  states")  # fmt: skip
    for r in rounds:
        print(
            f"{r.workers:>7} {r.seconds:>8.1f} {r.rate:>10.1f} "
            f"{'/'.join(map(str, r.claims_by_worker)):>24} {r.worker_cpu:>12.1f} "
            f"{r.pg_cpu:>14.1f}  {json.dumps(r.states, sort_keys=True)}"
        )
    by_count = {r.workers: r for r in rounds}
    met = True
    if 1 in by_count and 4 in by_count:
        ratio = by_count[4].rate / by_count[1].rate
        met = ratio >= TARGET_RATIO
        print(
            f"\nscaling ratio 4 workers / 1 worker: {ratio:.2f} "
            f"(target >= {TARGET_RATIO}: {'met' if met else 'MISSED'})"
        )
    twice = [r.workers for r in rounds if r.claims_max > 1 or r.executions != r.actions]
    print(
        "no action claimed twice: " + ("yes" if not twice else f"NO (rounds with {twice} workers)")
    )
    failed = [r.workers for r in rounds if not r.ok]
    if failed:
        print(f"rounds with problems (not all succeeded, or a worker exit code != 0): {failed}")
    if verbose or not met or failed:
        print("\nwhere the time goes (mean seconds per action, from the audit trail):")
        for r in rounds:
            phases = ", ".join(f"{k} {v:.3f}" for k, v in r.phases.items())
            print(f"  {r.workers} worker(s): {phases}")
        per_action = rounds[0].events / rounds[0].actions
        print(
            f"\naudit chain: {per_action:.1f} events per action, each appended under the one "
            f"audit_head row lock held until a durable commit; one connection alone appends "
            f"{ceiling:.0f}/s here, a ceiling of ~{ceiling / per_action:.0f} actions/s for any "
            "number of workers"
        )
        print(
            "\nwhat the workers' PostgreSQL connections were doing "
            "(share of samples with a connection in that state):"
        )
        for r in rounds:
            top = ", ".join(
                f"{what} {count / max(r.samples, 1):.2f}" for what, count in r.waits.most_common(6)
            )
            print(f"  {r.workers} worker(s): {top}")
    return met and not twice and not failed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--actions", type=int, default=2000)
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--interval", type=float, default=0.2, help="verification interval")
    parser.add_argument("--timeout", type=float, default=600.0, help="per round, seconds")
    parser.add_argument("--verbose", action="store_true", help="always show the profile")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")]
    binary = prometheus_binary()
    if binary is None:
        print("prometheus is not installed (make system-deps)", file=sys.stderr)
        return 2
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    template = f"opsgate_bench_tpl_{str(ULID()).lower()}"
    # Kept when a round fails (the workers' logs are the evidence), removed otherwise.
    work = Path(tempfile.mkdtemp(prefix="opsgate-bench-"))
    try:
        catalog = work / "catalog"
        catalog.mkdir()
        (catalog / "restart_service.yaml").write_text(json.dumps(catalog_document(args.interval)))
        with (
            FaultService(["bench"]) as faults,
            PrometheusServer([faults.address], work / "prometheus", binary=binary) as prometheus,
        ):
            try:
                with admin.connect() as conn:
                    conn.execute(text(f'CREATE DATABASE "{template}"'))
                filled = fill_template(database_url(template), catalog, args.actions)
                print(
                    f"{args.actions} approved no-op actions (hold 0s, interval "
                    f"{args.interval:g}s, real Prometheus) prepared in {filled:.1f}s; "
                    f"{os.cpu_count()} CPUs"
                )
                rounds = []
                for count in counts:
                    done = run_round(
                        admin,
                        template,
                        count,
                        args.actions,
                        catalog,
                        prometheus.url,
                        work,
                        args.timeout,
                    )
                    rounds.append(done)
                    print(f"  {count} worker(s): {rounds[-1].seconds:.1f}s", flush=True)
                ceiling = chain_append_ceiling(admin)
            finally:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)'))
                admin.dispose()
        ok = report(rounds, args.verbose, ceiling)
    except BaseException:
        print(f"logs kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
