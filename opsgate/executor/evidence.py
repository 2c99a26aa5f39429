"""Evidence: the measurements a worker stores. The hub hands each tick to an
`EvidenceSink` it was built with; the baseline is measured once before anything runs."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from opsgate.executor.held import Emit
from opsgate.failpoints import failpoint
from opsgate.models import Measurement, VerificationSpec
from opsgate.store.base import Store
from opsgate.verification.hub import TickReport, WatchPhase
from opsgate.verification.provider import SignalProvider

_STATE_FIELD: dict[WatchPhase, str] = {
    "verify": "verify_state",
    "rollback": "rollback_verify_state",
}


class EvidenceSink:
    """One transaction per tick: the measurements, each verification's state, and who
    holds each lease now. A watch whose lease another worker took, or whose action a
    human asked to roll back, is told to stop (`abort_reason`)."""

    def __init__(self, store: Store, worker_id: str, emit: Emit) -> None:
        self.store = store
        self.worker_id = worker_id
        self._emit = emit

    def __call__(self, report: TickReport) -> None:
        measurements: list[Measurement] = [
            record.to_measurement(watch.action_id, watch.phase)
            for watch in report.watches
            for record in watch.last_records
        ]
        by_field: dict[str, dict[str, dict[str, Any]]] = {}
        # Rows in action id order, as the heartbeat locks them: no deadlock between them.
        for watch in sorted(report.watches, key=lambda w: w.action_id):
            state_field = _STATE_FIELD.get(watch.phase)
            if state_field is not None:
                by_field.setdefault(state_field, {})[watch.action_id] = watch.state.model_dump(
                    mode="json"
                )
        run_phase = sorted(w.action_id for w in report.watches if w.phase == "run")
        with self.store.transaction() as tx:
            tx.insert_measurements(measurements)
            owners: dict[str, tuple[str, str | None]] = {}
            for state_field, states in by_field.items():
                owners.update(tx.save_verification_states(state_field, states))
            if run_phase:  # few at a time: the actions whose run step is under way
                for action_id in run_phase:
                    found = tx.lock_execution(action_id)
                    if found is not None:
                        owners[action_id] = (found.worker_id, found.rollback_requested_by)
        for watch in report.watches:
            if watch.action_id not in owners:
                continue
            owner, requested_by = owners[watch.action_id]
            if owner != self.worker_id:
                watch.abort_reason = f"lease taken over by {owner}"
            elif (
                requested_by is not None
                and watch.phase in ("run", "verify")
                and not watch.state.done
            ):
                watch.abort_reason = "manual"
        phases = {watch.phase for watch in report.watches}
        if "verify" in phases:
            failpoint("verify_tick")
        if "rollback" in phases:
            failpoint("rollback_tick")
        for watch in report.watches:
            self._emit("measured", watch.action_id, watch=watch)


@dataclass(frozen=True)
class Baseline:
    """Every signal and stop condition measured once just before anything runs."""

    values: dict[str, float | None]
    measurements: list[Measurement]
    missing: list[str]  # relative ranges with no value: nothing may run


def measure_baseline(
    provider: SignalProvider,
    action_id: str,
    spec: VerificationSpec,
    rendered: Mapping[str, str],
    clock: Callable[[], datetime],
) -> Baseline:
    """The values relative ranges are judged against (docs/design.md, "Baseline"),
    each stored as evidence whether it got a value or not."""
    queries = list(dict.fromkeys(rendered.values()))
    results = provider.query_many(queries) if queries else {}
    now = clock()  # when the answers came
    values: dict[str, float | None] = {}
    measurements: list[Measurement] = []
    kinds = [(s.name, "signal", s.pass_.relative) for s in spec.signals]
    kinds += [(c.name, "stop_condition", c.halt.relative) for c in spec.stop_conditions]
    missing: list[str] = []
    for name, kind, relative in kinds:
        query = rendered.get(name)
        result = results.get(query) if query is not None else None
        value = result.value if result is not None and result.error is None else None
        if value is not None and not math.isfinite(value):
            value = None
        values[name] = value
        if value is None and relative:
            missing.append(name)
        error = result.error if result is not None else "no result"
        measurements.append(
            Measurement(
                action_id=action_id,
                phase="baseline",
                name=name,
                kind=kind,  # type: ignore[arg-type]
                at=now,
                value=value,
                outcome="pass" if value is not None else ("error" if error else "inconclusive"),
                detail=(
                    f"baseline {value:g}"
                    if value is not None
                    else f"no baseline: {error or 'no data'}"
                ),
            )
        )
    return Baseline(values, measurements, missing)
