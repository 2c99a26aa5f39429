"""`run` and manual `rollback` through the API: the server is of the trusted tier, so an
executor in its process carries them out, exactly as `opsgate run` / `opsgate rollback`
do on a worker host, after the bundle's authz said yes."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from opsgate.app import App
from opsgate.auth.principal import Principal
from opsgate.errors import NotFound
from opsgate.executor.executor import Executor
from opsgate.models import Action, ActionState


class ServerExecutor:
    """One executor for the server's lifetime, built on first use (it needs Prometheus)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._executor: Executor | None = None

    def _get(self) -> Executor:
        from opsgate.auth.workers import register_worker_principal
        from opsgate.executor.executor import default_worker_id

        with self._lock:
            if self._executor is None:
                # The server runs actions as a worker would: a worker principal of its own.
                executor = self.app.build_executor(worker_id=f"server:{default_worker_id()}")
                register_worker_principal(
                    self.app.store,
                    executor.worker_id,
                    datetime.now(UTC),
                    self.app.settings.lease,
                )
                executor.start()
                self._executor = executor
            return self._executor

    def _action(self, action_id: str) -> Action:
        action = self.app.store.get_action(action_id)
        if action is None:
            raise NotFound(f"no action {action_id}; list them with `opsgate queue`")
        return action

    def run(self, principal: Principal, action_id: str) -> Action:
        """Authorize, claim (policy re-checked at claim), launch; returns at once."""
        self.app.gate.expire_due()
        self.app.gate.authorize("run", principal, self._action(action_id))
        executor = self._get()
        claimed = executor.claim(action_id)
        if claimed is None:  # claim(action_id) raises rather than returning None
            raise NotFound(f"no action {action_id}")
        if claimed.state is ActionState.EXECUTING:
            executor.launch(action_id)
        return claimed

    def rollback(self, principal: Principal, action_id: str, reason: str) -> Action:
        self.app.gate.authorize("rollback", principal, self._action(action_id))
        return self._get().request_rollback(action_id, principal.identity, reason)

    def close(self) -> None:
        """Hand held actions over (their leases lapse to the next worker) and stop."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.drain()
            executor.close()
