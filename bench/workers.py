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

Each worker runs under `bench/_probe.py`, which counts (SQLAlchemy events, in the
worker process) the statements it sends, the transactions it commits, how long each
transaction held the audit head row, and the worker's CPU time from its first statement
to its last commit. Per action, the bench prints those, the CPU of the workers' policy
sandbox processes and PostgreSQL's. Targets on the happy path: <= 12 statements,
<= 4 commits and <= 6 ms of worker CPU per action.

    .venv/bin/python bench/workers.py [--actions 2000] [--workers 1,2,4] [--repeat 1]
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

from bench._rig import print_facts, spread  # noqa: E402
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
TARGET_STATEMENTS = 12
TARGET_COMMITS = 4
TARGET_CPU_MS = 6.0
PROBE = ROOT / "bench" / "_probe.py"
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


def children_cpu(pid: int) -> float:
    """CPU of the live children of `pid` (the policy sandbox processes a worker runs its
    evaluations in): /proc's cutime only counts children already reaped."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            total += cpu_seconds(int(entry.name))
    return total


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
    statements: int = 0
    commits: int = 0
    head_holds: list[float] = field(default_factory=list)
    probe_cpu: float = 0.0  # workers' own CPU, first statement to last commit
    kinds: Counter[str] = field(default_factory=Counter)
    sandbox_cpu: float = 0.0

    def per_action(self, value: float) -> float:
        return value / self.actions

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
            stats = logs / f"worker-{count}-{i}.json"
            stats.unlink(missing_ok=True)
            with open(logs / f"worker-{count}-{i}.log", "wb") as log:
                started.append(
                    subprocess.Popen(
                        [sys.executable, str(PROBE), str(stats), "worker", "--poll", "0.2"],
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


def stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, and again if the worker is still there after 15 s: a SIGTERM that lands
    inside a database call can be taken by the driver as a cancelled query, and the
    worker then keeps polling (seen with psycopg 3); a second one stops it."""
    # Writing a profile (BENCH_PROFILE) at exit takes a while.
    patience = 120 if os.environ.get("BENCH_PROFILE") else 15
    for _ in range(3):
        process.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            return process.wait(timeout=patience)
    process.kill()
    return process.wait(timeout=15)


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
    # Autocommit: the bench's own polling must not sit idle in a transaction.
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
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
            seconds = time.perf_counter() - started
            sampler.stop()
            worker_cpu = sum(cpu_seconds(p.pid) for p in processes)
            sandbox_cpu = sum(children_cpu(p.pid) for p in processes)
            pg_cpu = postgres_cpu() - pg_before
            exit_codes = [stop(process) for process in processes]
        probes = [
            json.loads((logs / f"worker-{workers}-{i}.json").read_text()) for i in range(workers)
        ]
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
            statements=sum(int(p["statements"]) for p in probes),
            commits=sum(int(p["commits"]) for p in probes),
            head_holds=[float(h) for p in probes for h in p["head_holds"]],
            probe_cpu=sum(float(p["cpu_seconds"]) for p in probes),
            sandbox_cpu=sandbox_cpu,
            kinds=sum((Counter(p["kinds"]) for p in probes), Counter()),
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


def report(rounds: Sequence[Round], verbose: bool, ceiling: float, repeat: int) -> bool:
    print()
    print(f"{'workers':>7} {'seconds':>8} {'actions/s':>10} {'claims per worker':>20} "
          f"{'CPU ms/action: worker':>21} {'sandbox':>7} {'postgres':>8} "
          f"{'statements':>10} {'commits':>7}  states")  # fmt: skip
    for r in rounds:
        print(
            f"{r.workers:>7} {r.seconds:>8.1f} {r.rate:>10.1f} "
            f"{'/'.join(map(str, r.claims_by_worker)):>20} "
            f"{r.per_action(r.probe_cpu) * 1000:>21.2f} {r.per_action(r.sandbox_cpu) * 1000:>7.2f} "
            f"{r.per_action(r.pg_cpu) * 1000:>8.2f} {r.per_action(r.statements):>10.1f} "
            f"{r.per_action(r.commits):>7.2f}  {json.dumps(r.states, sort_keys=True)}"
        )
    print(
        "\n(worker CPU: the worker processes' own, first statement to last commit; sandbox: "
        "their policy\nevaluation processes; statements and commits: every one the workers "
        "sent, heartbeats and\nverification ticks included, divided by the actions)"
    )
    print("\naudit head row held per transaction that appended (lock to COMMIT done):")
    for r in rounds:
        holds = spread(r.head_holds, "ms", 1000.0)
        busy = sum(r.head_holds) / r.seconds
        print(f"  {r.workers} worker(s): {holds}; held {busy:.0%} of the round")
    met = True
    ratios: list[float] = []
    for i in range(repeat):
        chunk = rounds[i * (len(rounds) // repeat) : (i + 1) * (len(rounds) // repeat)]
        by_count = {r.workers: r for r in chunk}
        if 1 in by_count and 4 in by_count:
            ratios.append(by_count[4].rate / by_count[1].rate)
    if ratios:
        ratio = sorted(ratios)[(len(ratios) - 1) // 2]
        met = ratio >= TARGET_RATIO
        each = " (each repetition: " + ", ".join(f"{x:.2f}" for x in ratios) + ")"
        print(
            f"\nscaling ratio 4 workers / 1 worker: {ratio:.2f}{each if repeat > 1 else ''} "
            f"(target >= {TARGET_RATIO}: {'met' if met else 'MISSED'})"
        )
    single = [r for r in rounds if r.workers == 1] or list(rounds)
    if verbose:
        first = single[0]
        print(f"\nstatements per action by kind ({first.workers} worker(s)):")
        for kind, count in first.kinds.most_common():
            print(f"  {first.per_action(count):6.2f}  {kind}")
    statements = min(r.per_action(r.statements) for r in single)
    commits = min(r.per_action(r.commits) for r in single)
    cpu_ms = min(r.per_action(r.probe_cpu) for r in single) * 1000
    for label, value, target in (
        ("statements per action", statements, TARGET_STATEMENTS),
        ("commits per action", commits, TARGET_COMMITS),
        ("worker CPU ms per action", cpu_ms, TARGET_CPU_MS),
    ):
        verdict = "met" if value <= target else "MISSED"
        print(f"{label} (1 worker): {value:.2f} (target <= {target:g}: {verdict})")
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
    parser.add_argument("--repeat", type=int, default=1, help="run the worker counts N times")
    parser.add_argument("--interval", type=float, default=0.2, help="verification interval")
    parser.add_argument("--timeout", type=float, default=600.0, help="per round, seconds")
    parser.add_argument("--verbose", action="store_true", help="always show the profile")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",")] * max(args.repeat, 1)
    binary = prometheus_binary()
    if binary is None:
        print("prometheus is not installed (make system-deps)", file=sys.stderr)
        return 2
    print_facts(
        "workers",
        f"{args.repeat} x workers {args.workers}, {args.actions} actions per round",
        postgres_url=ADMIN_URL,
    )
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
        ok = report(rounds, args.verbose, ceiling, max(args.repeat, 1))
    except BaseException:
        print(f"logs kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
