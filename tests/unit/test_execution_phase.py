"""execution_phase: the one reading of an execution's step times, as a table."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from opsgate.lifecycle import ExecutionPhase, execution_phase, run_outcome_unknown
from opsgate.models import ActionState
from opsgate.testing import make_action, make_execution, utcnow

S = ActionState
P = ExecutionPhase
T0 = utcnow()
T1 = T0 + timedelta(seconds=1)

RUN_STARTED: dict[str, Any] = {"run_started_at": T0}
RUN_DONE: dict[str, Any] = {"run_started_at": T0, "run_finished_at": T1, "run_exit_code": 0}
RUN_ERROR: dict[str, Any] = {**RUN_DONE, "run_exit_code": 1, "run_error": "exit 1"}
UNDONE: dict[str, Any] = {**RUN_DONE, "undo_started_at": T1, "undo_finished_at": T1}

TABLE: list[tuple[ActionState, dict[str, Any] | None, ExecutionPhase]] = [
    (S.EXECUTING, {}, P.NOT_STARTED),
    (S.EXECUTING, {"captured": {"replicas": 3}}, P.NOT_STARTED),  # capture changes nothing
    (S.EXECUTING, RUN_STARTED, P.RUN_IN_FLIGHT),
    # No execution row for an executing action: take the run as possibly started.
    (S.EXECUTING, None, P.RUN_IN_FLIGHT),
    (S.EXECUTING, RUN_ERROR, P.RUN_FAILED),
    (S.EXECUTING, RUN_DONE, P.RUN_FINISHED),
    (S.VERIFYING, RUN_DONE, P.VERIFYING),
    (S.VERIFYING, {**RUN_DONE, "verify_started_at": T1}, P.VERIFYING),
    (S.ROLLING_BACK, RUN_STARTED, P.UNDO_PENDING),
    (S.ROLLING_BACK, {**RUN_DONE, "undo_started_at": T1}, P.UNDO_PENDING),
    (S.ROLLING_BACK, None, P.UNDO_PENDING),
    (S.ROLLING_BACK, {**UNDONE, "undo_error": "exit 2"}, P.UNDO_FAILED),
    (S.ROLLING_BACK, UNDONE, P.UNDONE),
    (S.SUCCEEDED, RUN_DONE, P.FINISHED),
    (S.ROLLED_BACK, UNDONE, P.FINISHED),
    (S.ROLLBACK_FAILED, UNDONE, P.FINISHED),
    (S.FAILED, {}, P.FINISHED),
    (S.BLOCKED_AT_EXECUTION, {}, P.FINISHED),
    (S.APPROVED, None, P.NOT_EXECUTING),
    (S.PENDING_APPROVAL, None, P.NOT_EXECUTING),
]


@pytest.mark.parametrize(("state", "facts", "expected"), TABLE)
def test_execution_phase(
    state: ActionState, facts: dict[str, Any] | None, expected: ExecutionPhase
) -> None:
    action = make_action(state=state)
    execution = make_execution(action.id, **facts) if facts is not None else None
    assert execution_phase(action, execution) is expected


def test_every_phase_is_in_the_table() -> None:
    assert {expected for _, _, expected in TABLE} == set(ExecutionPhase)


def test_a_run_whose_end_was_never_stored_may_still_be_going() -> None:
    action = make_action()
    assert run_outcome_unknown(make_execution(action.id, **RUN_STARTED))
    assert not run_outcome_unknown(make_execution(action.id))
    assert not run_outcome_unknown(make_execution(action.id, **RUN_ERROR))
