"""Workers as principals of kind `worker`.

A worker is of the trusted tier: it holds the database and production credentials, so no
token could prove more about it than its own database connection does. What the trail
can hold is who and where it is: its id (`--name`, or host:pid:random), the operating
system account it runs as (the real uid, never LOGNAME or USER), its host and pid, all
recorded once in a `worker.registered` event in the transaction that registers it. Every
event the worker writes afterwards names that id as its actor.
"""

from __future__ import annotations

import os
import pwd
import socket
from dataclasses import dataclass
from datetime import datetime

from opsgate.auth.principal import check_name
from opsgate.errors import ConfigError, InvalidInput, StateConflict
from opsgate.lifecycle import record_event
from opsgate.models import WorkerInfo
from opsgate.store.base import Store

KIND = "worker"


@dataclass(frozen=True)
class WorkerPrincipal:
    id: str
    os_user: str
    uid: int
    hostname: str
    pid: int

    def as_json(self) -> dict[str, object]:
        return {
            "principal": self.id,
            "principal_kind": KIND,
            "os_user": self.os_user,
            "uid": self.uid,
            "hostname": self.hostname,
            "pid": self.pid,
        }


def worker_name(value: str | None) -> str | None:
    """`--name`: one printable token, as every principal name is; InvalidInput naming it."""
    if value is None:
        return None
    try:
        return check_name("--name", value)
    except InvalidInput as exc:
        raise InvalidInput("--name", exc.problem) from None


def this_process(worker_id: str) -> WorkerPrincipal:
    uid = os.getuid()
    try:
        account = pwd.getpwuid(uid).pw_name
    except KeyError:
        raise ConfigError(
            f"uid {uid} has no account name; cannot tell who runs this worker"
        ) from None
    return WorkerPrincipal(worker_id, account, uid, socket.gethostname(), os.getpid())


def register_worker_principal(
    store: Store, worker_id: str, now: datetime, lease: float
) -> WorkerPrincipal:
    """Record this process as worker `worker_id`: its row and its `worker.registered`
    event in one transaction. A name a live worker holds is refused: two processes under
    one id would renew each other's leases."""
    principal = this_process(worker_id)
    for info in store.list_workers():
        if info.id == worker_id and info.status(now, lease) == "live":
            raise StateConflict(
                f"worker {worker_id} is live on {info.hostname} (pid {info.pid}); "
                "give this one another --name"
            )
    with store.transaction() as tx:
        tx.register_worker(
            WorkerInfo(
                id=worker_id,
                hostname=principal.hostname,
                pid=principal.pid,
                started_at=now,
                heartbeat_at=now,
            )
        )
        record_event(
            tx,
            action_id=None,
            kind="worker.registered",
            actor=worker_id,
            now=now,
            data=principal.as_json(),
        )
    return principal
