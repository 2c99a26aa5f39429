"""Recovery of lapsed leases and clean shutdown: nothing lost, `run` never twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from opsgate.catalog import load_catalog
from opsgate.executor.executor import RUN_RECOVERY_GRACE, Executor
from opsgate.executor.runners import RunnerRegistry
from opsgate.lifecycle import record_transition
from opsgate.models import ActionState, Execution, ExecutionUpdate
from opsgate.verification.evaluator import VerificationState
from tests.unit.executor_rig import SCALE, Rig, audit_ok

S = ActionState
DEAD = "dead-host:4242:abcdef"


def plant(rig: Rig, path: list[ActionState], **facts: Any) -> str:
    """An action a dead worker left behind: moved along `path`, its lease lapsed."""
    action_id = rig.approved()
    now = datetime.now(UTC)
    with rig.store.transaction() as tx:
        action = tx.lock_action(action_id)
        assert action is not None
        for state in path:
            action = record_transition(tx, action, state, actor=DEAD, now=now)
        tx.insert_execution(
            Execution(
                action_id=action_id,
                target=action.target,
                environment=action.environment,
                worker_id=DEAD,
                claimed_at=now - timedelta(seconds=60),
                lease_expires_at=now - timedelta(seconds=1),
                heartbeat_at=now - timedelta(seconds=31),
                captured={"previous_replicas": "3"},
                **facts,
            )
        )
    return action_id


def recover(rig: Rig, action_id: str, dead: str = DEAD) -> ActionState:
    assert rig.executor.recover_lapsed() == [action_id]
    assert rig.executor.wait_idle(timeout=10)
    action = rig.store.get_action(action_id)
    assert action is not None
    execution = rig.store.get_execution(action_id)
    assert execution is not None and execution.recovered_from == dead
    events = [e for e in rig.store.audit_events(action_id=action_id)]
    recovered = [e for e in events if e.kind == "execution.recovered"]
    assert len(recovered) == 1 and recovered[0].data["dead_worker"] == dead
    audit_ok(rig.store)
    return action.state


def test_claimed_but_not_started_runs_normally(rig: Rig) -> None:
    action_id = plant(rig, [S.EXECUTING])
    assert recover(rig, action_id) is S.SUCCEEDED
    assert rig.runner.verbs() == ["get", "scale"]


def test_run_under_way_is_never_started_again_but_rolled_back(rig: Rig) -> None:
    now = datetime.now(UTC)
    action_id = plant(rig, [S.EXECUTING], run_started_at=now - timedelta(seconds=40))
    assert recover(rig, action_id) is S.ROLLED_BACK
    # only the undo ran, with the prior state captured by the dead worker
    assert rig.runner.calls == [["scale", "checkout", "3"]]
    execution = rig.store.get_execution(action_id)
    assert execution is not None and "outcome is unknown" in execution.reason


def test_run_finished_then_death_goes_on_to_verify(rig: Rig) -> None:
    now = datetime.now(UTC)
    action_id = plant(
        rig,
        [S.EXECUTING],
        run_started_at=now - timedelta(seconds=40),
        run_finished_at=now - timedelta(seconds=39),
        run_exit_code=0,
    )
    assert recover(rig, action_id) is S.SUCCEEDED
    assert rig.runner.calls == []


def test_verification_resumes_where_it_was(rig: Rig) -> None:
    now = datetime.now(UTC)
    started = now - timedelta(seconds=0.5)
    stored = VerificationState.start(started).model_copy(
        update={"failures": 1, "passing_since": started, "intervals": 3}
    )
    action_id = plant(
        rig,
        [S.EXECUTING, S.VERIFYING],
        run_started_at=now - timedelta(seconds=1),
        run_finished_at=now - timedelta(seconds=0.9),
        verify_started_at=started,
        verify_state=stored.model_dump(mode="json"),
    )
    assert recover(rig, action_id) is S.SUCCEEDED
    assert rig.runner.calls == []
    execution = rig.store.get_execution(action_id)
    assert execution is not None and execution.verify_state is not None
    final = VerificationState.model_validate(execution.verify_state)
    # the same verification went on: its start, failures and interval count carried over
    assert final.started_at == started and final.failures == 1 and final.intervals > 3


def test_rollback_whose_undo_had_not_started_is_completed(rig: Rig) -> None:
    now = datetime.now(UTC)
    action_id = plant(
        rig,
        [S.EXECUTING, S.VERIFYING, S.ROLLING_BACK],
        run_started_at=now - timedelta(seconds=5),
        run_finished_at=now - timedelta(seconds=4),
        outcome="stopped",
        rollback_decided_at=now - timedelta(seconds=2),
    )
    assert recover(rig, action_id) is S.ROLLED_BACK
    assert rig.runner.calls == [["scale", "checkout", "3"]]


def test_a_live_lease_is_left_alone(rig: Rig) -> None:
    action_id = plant(rig, [S.EXECUTING])
    with rig.store.transaction() as tx:
        later = datetime.now(UTC) + timedelta(seconds=30)
        tx.update_execution(action_id, ExecutionUpdate(lease_expires_at=later))
    assert rig.executor.recover_lapsed() == []
    assert rig.runner.calls == []


def test_shutdown_hands_verification_over_and_the_next_worker_finishes_it(rig: Rig) -> None:
    rig.executor.close()
    slow = SCALE.replace("hold: 0.15s", "hold: 0.6s").replace("timeout: 1s", "timeout: 30s")
    (rig.catalog_dir / "scale_deployment.yaml").write_text(slow)
    rig.gate.catalog = load_catalog(rig.catalog_dir)

    def executor(worker_id: str) -> Executor:
        return Executor(
            rig.store,
            rig.gate,
            rig.provider,
            RunnerRegistry({"fake": rig.runner}),
            worker_id=worker_id,
        )

    first = executor("first")
    action_id = rig.approved()
    claimed = first.claim(action_id)
    assert claimed is not None
    first.launch(action_id)
    deadline = time.monotonic() + 10
    while rig.store.get_action(action_id).state is not S.VERIFYING:  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    first.drain()
    assert first.wait_idle(timeout=10)
    first.close()
    handed = rig.store.get_execution(action_id)
    assert handed is not None and handed.finished_at is None
    assert handed.lease_expires_at <= datetime.now(UTC)
    assert rig.store.get_action(action_id).state is S.VERIFYING  # type: ignore[union-attr]
    assert "execution.released" in [e.kind for e in rig.store.audit_events(action_id=action_id)]

    rig.executor = executor("second")
    assert recover(rig, action_id, dead="first") is S.SUCCEEDED
    assert rig.runner.verbs().count("scale") == 1


def test_an_armed_failpoint_kills_the_process_and_an_unarmed_one_does_not() -> None:
    code = "from opsgate.failpoints import failpoint; failpoint('b'); failpoint('a'); print('x')"
    env = {**os.environ, "OPSGATE_FAILPOINTS": "a"}
    killed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL and killed.stdout == b""
    env["OPSGATE_FAILPOINTS"] = "c"
    alive = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert alive.returncode == 0 and alive.stdout == b"x\n"


def test_undo_waits_until_a_run_still_in_flight_has_timed_out(rig: Rig) -> None:
    """A lapsed lease may be a partitioned worker whose run step goes on until its
    timeout (5 s here): the new owner takes over only after it plus the grace."""
    margin = 1.5
    started = datetime.now(UTC) - timedelta(seconds=5 + RUN_RECOVERY_GRACE - margin)
    action_id = plant(rig, [S.EXECUTING], run_started_at=started)
    assert rig.executor.recover_lapsed() == []
    assert rig.runner.calls == []
    assert not [
        e for e in rig.store.audit_events(action_id=action_id) if e.kind == "execution.recovered"
    ]
    execution = rig.store.get_execution(action_id)
    assert execution is not None and execution.worker_id == DEAD
    time.sleep(margin + 0.1)
    assert recover(rig, action_id) is S.ROLLED_BACK
    assert rig.runner.calls == [["scale", "checkout", "3"]]
    taken_at = next(
        e.at for e in rig.store.audit_events(action_id=action_id) if e.kind == "execution.recovered"
    )
    assert taken_at >= started + timedelta(seconds=5 + RUN_RECOVERY_GRACE)


def test_a_finished_run_is_not_waited_for(rig: Rig) -> None:
    now = datetime.now(UTC)
    finished = plant(
        rig,
        [S.EXECUTING],
        run_started_at=now - timedelta(seconds=1),
        run_finished_at=now - timedelta(seconds=0.5),
        run_exit_code=0,
    )
    assert recover(rig, finished) is S.SUCCEEDED
