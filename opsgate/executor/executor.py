"""The worker shell: registers the worker, renews its leases, claims actions and hands
them to their flow, drains and shuts down.

Where the rest lives: `claims` (claiming, with the gate's re-check, and manual
rollback), `flow` (one action's life, baseline to terminal state, in order) and `steps`
(how each of its steps is done and recorded), `recovery` (taking over lapsed leases),
`evidence` (the sink the verification hub stores each tick through, and the baseline),
`held` (what the worker holds, shared by all of them).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from opsgate.catalog import Catalog
from opsgate.executor.claims import Claims
from opsgate.executor.evidence import EvidenceSink
from opsgate.executor.flow import ActionFlow
from opsgate.executor.held import ExecutorEvent, HeldAction, Holdings
from opsgate.executor.recovery import RUN_RECOVERY_GRACE, Recovery
from opsgate.executor.runners import RunnerRegistry
from opsgate.executor.steps import FlowSettings, Steps
from opsgate.gate import Gate
from opsgate.lifecycle import new_id
from opsgate.models import Action, ActionState, Identity, WorkerInfo
from opsgate.shared import utcnow
from opsgate.store.base import Store, StoreError
from opsgate.verification.hub import VerificationHub
from opsgate.verification.provider import PROMETHEUS_DEFAULT_SCRAPE_INTERVAL, SignalProvider

__all__ = ["RUN_RECOVERY_GRACE", "Executor", "ExecutorEvent", "default_worker_id"]

log = logging.getLogger(__name__)


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{new_id()[-6:].lower()}"


class Executor:
    """A worker's engine: holds leases, runs steps, feeds the hub, records everything.

    `catalog` is asked once per action (claim, recovery, manual rollback) and never kept
    across actions, so an edited catalog applies to the next action without a restart;
    None: the gate's catalog. `signals` is measured by this executor's own verification
    hub, which stores every tick through this executor's evidence sink.
    """

    def __init__(
        self,
        store: Store,
        gate: Gate,
        signals: SignalProvider,
        runners: RunnerRegistry | None = None,
        *,
        catalog: Callable[[], Catalog] | None = None,
        worker_id: str | None = None,
        lease: float = 30.0,
        concurrency: int = 4,
        clock: Callable[[], datetime] = utcnow,
        on_event: Callable[[ExecutorEvent], None] | None = None,
        scrape_interval: float | None = None,
        fallback_scrape_interval: float = PROMETHEUS_DEFAULT_SCRAPE_INTERVAL,
    ) -> None:
        self.store = store
        self.gate = gate
        self.runners = runners or RunnerRegistry()
        self.worker_id = worker_id or default_worker_id()
        self.lease = lease
        self.clock = clock
        self.on_event = on_event
        read_catalog = catalog if catalog is not None else lambda: gate.catalog
        self.hub = VerificationHub(signals, sink=EvidenceSink(store, self.worker_id, self._emit))
        self._holdings = Holdings(concurrency, self._emit)
        # Parts ask the executor's clock each time, so one set later (a test) applies to all.
        settings = FlowSettings(
            self.worker_id, self._now, scrape_interval, fallback_scrape_interval
        )
        steps = Steps(store, self.hub, self.runners, self._holdings, settings, self._emit)
        self._flow = ActionFlow(steps)
        self._claims = Claims(
            store, gate, self._holdings, read_catalog,
            worker_id=self.worker_id, lease=lease, clock=self._now, emit=self._emit,
        )  # fmt: skip
        self._recovery = Recovery(
            store, self._flow, self._holdings, read_catalog, lease=lease, emit=self._emit
        )
        self._heartbeat_stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._started = False

    # --- the worker itself --------------------------------------------------------------

    def start(self) -> None:
        """Register this worker and start renewing its leases."""
        if self._started:
            return
        self._started = True
        now = self.clock()
        self.store.register_worker(
            WorkerInfo(
                id=self.worker_id,
                hostname=socket.gethostname(),
                pid=os.getpid(),
                started_at=now,
                heartbeat_at=now,
            )
        )
        self._heartbeat = threading.Thread(target=self._beat, name="opsgate-lease", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._heartbeat_stop.wait(self.lease / 3):
            now = self.clock()
            holding = self._holdings.ids()
            try:
                self.store.renew_leases(
                    self.worker_id, now, now + timedelta(seconds=self.lease), only=holding
                )
            except StoreError as exc:  # the database may be restarting: keep trying
                log.warning("lease renewal failed: %s", exc)

    def drain(self) -> None:
        """Stop taking on work: running steps finish, verifications are handed over.

        A verification is not a step: it is left where it stands (its state is stored
        every interval) and its lease released, so the next worker resumes it at once.
        """
        self._holdings.draining = True
        for watch in self.hub.watches():
            if watch.phase != "run":  # a run must finish; its watch guards it meanwhile
                self.hub.abort(watch, "shutdown")

    def close(self) -> None:
        # Hub first, so no finished verification is handed to a pool that is shutting
        # down; draining makes a step that ends meanwhile hand its action over.
        self._holdings.draining = True
        self._heartbeat_stop.set()
        self.hub.close()
        self._holdings.shutdown()
        if self._started:
            try:
                self.store.stop_worker(self.worker_id, self.clock())
            except StoreError as exc:
                log.warning("could not mark worker %s stopped: %s", self.worker_id, exc)

    @property
    def in_flight(self) -> int:
        return len(self._holdings)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every action this worker holds has reached a terminal state."""
        while True:
            pending = self._holdings.pending()
            if not pending:
                return True
            if not pending[0].wait(timeout):
                return False

    def wait_for(self, action_id: str, timeout: float | None = None) -> ActionState | None:
        held = self._holdings.get(action_id)
        if held is None:
            action = self.store.get_action(action_id)
            return action.state if action else None
        held.finished.wait(timeout)
        return held.final_state

    def _now(self) -> datetime:
        return self.clock()

    def _emit(self, kind: str, action_id: str, message: str = "", **extra: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(ExecutorEvent(kind, action_id, message, **extra))
            except Exception:  # a broken display must never break an execution
                log.exception("event listener failed")

    # --- the ways in ----------------------------------------------------------------------

    def claim(
        self, action_id: str | None = None, *, principal: Identity | None = None
    ) -> Action | None:
        """Claim one approved action (this one, or the oldest), re-check it, hold it.

        The gate's re-check (preconditions, policy, approvals) is judged with no
        transaction open, so a slow policy or a hung Prometheus never holds the store's
        write lock; the claiming transaction then holds it only if what the judgement
        saw is still true (state, running actions on the target, approval rows), else
        judges again under the lock. `principal` is who asked for this run in the
        foreground (`opsgate run`); it is recorded beside the worker. Returns the action
        as executing or blocked_at_execution; None if nothing was approved.
        """
        return self._claims.claim(action_id, principal)

    def launch(self, action_id: str) -> None:
        """Start running a held (executing) action in the step pool."""
        held = self._holdings.get(action_id)
        if held is None:
            raise KeyError(action_id)
        self._holdings.submit(self._flow.guarded, held, self._flow.start, held)

    def request_rollback(self, action_id: str, actor: Identity, reason: str) -> Action:
        """`opsgate rollback`: a running action is rolled back by its worker; a succeeded
        one is rolled back here, by this process, and verified."""
        taken = self._claims.take_back(action_id, actor, reason)
        if not isinstance(taken, HeldAction):
            return taken
        self._holdings.submit(self._flow.guarded, taken, self._flow.undo, taken)
        return taken.action

    def recover_lapsed(self) -> list[str]:
        """Take over every execution whose worker stopped renewing its lease."""
        return self._recovery.recover_lapsed()

    def resume(self, action_id: str) -> bool:
        """Take over this one execution if its lease lapsed or was released (`opsgate run
        ID` after a Ctrl-C); False if another worker holds it or it has finished."""
        if self._holdings.draining:
            return False
        return self._recovery.take_over(action_id) is not None
