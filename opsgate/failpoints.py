"""Failpoints: crash this process at a named instant, for crash-safety tests.

`OPSGATE_FAILPOINTS=after_capture` makes the process SIGKILL itself the moment it
passes `failpoint("after_capture")` (a comma-separated list arms several). Nothing is
armed unless the variable is set; it is read once, at import.
"""

from __future__ import annotations

import os
import signal

ARMED = frozenset(
    name.strip() for name in os.environ.get("OPSGATE_FAILPOINTS", "").split(",") if name.strip()
)

# Where the executor can be made to die; each is after the named fact was committed.
NAMES = (
    "after_claim",  # claimed: executing, nothing run
    "after_capture",  # prior state captured and stored (the baseline not yet), run not started
    "after_run_started",  # run_started_at and the baseline stored; the run step is under way
    "verify_tick",  # a verification interval stored
    "after_rollback_decided",  # rolling_back stored, undo not started
    "rollback_tick",  # a rollback-verification interval stored
)


def failpoint(name: str) -> None:
    """Die here, as a `kill -9` would, if `name` is armed."""
    if name in ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
