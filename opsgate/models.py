"""Immutable domain models: the catalog, proposals, decisions, approvals and evidence."""

from __future__ import annotations

import enum
import math
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from opsgate.verification.lookback import query_lookback

MAX_REASON_LENGTH = 2000
NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
TARGET_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,63}$")
# Ten years: beyond it a duration is a mistake, and date arithmetic would overflow.
MAX_DURATION = 3650 * 86400.0
# A verification step (interval, hold, timeout) or a runner step: at most a day.
MAX_STEP_DURATION = 86400.0
# Below this an interval is a busy loop against Prometheus.
MIN_INTERVAL = 0.05


def parse_duration(value: Any) -> float:
    """Seconds from `90`, `90s`, `2m`, `1h`, `500ms`; negative, NaN, infinite, more
    than ten years or garbage is refused."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 2m or 1h")
    seconds: float | None = None
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError("a duration must be at most 3650d") from None
    elif isinstance(value, str) and len(value) <= 40:
        match = _DURATION.match(value)
        if match:
            seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds is None:
        raise ValueError("expected a duration like 30s, 2m or 1h")
    if not math.isfinite(seconds):
        raise ValueError("a duration must be a finite number")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds > MAX_DURATION:
        raise ValueError("a duration must be at most 3650d")
    return seconds


def _step_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds > MAX_STEP_DURATION:
        raise ValueError("must be at most 1d")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
StepDuration = Annotated[float, BeforeValidator(_step_duration)]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


# --- lifecycle ---------------------------------------------------------------------------


class ActionState(enum.StrEnum):
    """States of an action; the edges live in `opsgate.lifecycle.TRANSITIONS`."""

    PROPOSED = "proposed"  # never stored: the decision is made in the same transaction
    BLOCKED = "blocked"  # terminal: policy denied at proposal
    PENDING_APPROVAL = "pending_approval"  # -> approved | rejected | expired | cancelled
    APPROVED = "approved"  # -> executing | blocked_at_execution | cancelled | expired
    REJECTED = "rejected"  # terminal
    EXPIRED = "expired"  # terminal
    CANCELLED = "cancelled"  # terminal
    BLOCKED_AT_EXECUTION = "blocked_at_execution"  # terminal: world changed since approval
    # -> verifying | rolling_back | failed | blocked_at_execution (no baseline, nothing ran)
    EXECUTING = "executing"
    VERIFYING = "verifying"  # -> succeeded | rolling_back | failed
    SUCCEEDED = "succeeded"  # terminal, verified (a manual rollback may still follow)
    ROLLING_BACK = "rolling_back"  # -> rolled_back | rollback_failed
    ROLLED_BACK = "rolled_back"  # terminal
    ROLLBACK_FAILED = "rollback_failed"  # terminal
    FAILED = "failed"  # terminal: irreversible action that could not be verified

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {
        ActionState.BLOCKED,
        ActionState.REJECTED,
        ActionState.EXPIRED,
        ActionState.CANCELLED,
        ActionState.BLOCKED_AT_EXECUTION,
        ActionState.SUCCEEDED,
        ActionState.ROLLED_BACK,
        ActionState.ROLLBACK_FAILED,
        ActionState.FAILED,
    }
)

# States in which an action holds (or is about to hold) its target.
ACTIVE_STATES = frozenset(
    {
        ActionState.APPROVED,
        ActionState.EXECUTING,
        ActionState.VERIFYING,
        ActionState.ROLLING_BACK,
    }
)


# --- the catalog -------------------------------------------------------------------------


class ParamSpec(Frozen):
    """A JSON-schema subset for one parameter."""

    type: Literal["string", "integer", "number", "boolean"]
    description: str = ""
    pattern: str | None = None
    min_length: int | None = Field(default=None, alias="minLength", ge=0)
    max_length: int | None = Field(default=256, alias="maxLength", ge=1)
    minimum: float | None = Field(default=None, allow_inf_nan=False)
    maximum: float | None = Field(default=None, allow_inf_nan=False)
    enum: tuple[str | int | float | bool, ...] | None = None
    required: bool = True
    default: str | int | float | bool | None = None
    secret: bool = False

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from exc
        return value


class HttpSpec(Frozen):
    """An HTTP call: method, URL template, JSON body template, expected status."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    url: str
    body: dict[str, Any] | None = None
    expect_status: tuple[int, ...] = (200, 201, 202, 204)
    # For a capture: the top-level JSON field of the response to keep (else the body).
    extract: str | None = None


CaptureType = Literal["string", "integer", "number", "boolean", "json"]


class Step(Frozen):
    """One runnable step: exactly one of `argv` (shell runner) or `http`."""

    runner: str = "shell"
    argv: tuple[str, ...] | None = None
    http: HttpSpec | None = None
    timeout: StepDuration = 60.0
    as_: str | None = Field(default=None, alias="as", pattern=NAME_PATTERN)
    # For a capture: the type of the kept value, so `undo` gets it back as it was (a
    # JSON boolean stays a boolean in an HTTP body, not the string "false").
    type: CaptureType | None = None

    # Extra environment variables of an argv step (values may use placeholders): the way
    # to hand a step a secret, since argv is visible to every user through `ps`.
    env: dict[str, str] | None = None

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for name in value or {}:
            if not _ENV_NAME.match(name):
                raise ValueError(f"env name {name!r}: expected upper-case letters, digits, _")
        if value is not None and len(value) > 64:
            raise ValueError("at most 64 env variables")
        return value

    @field_validator("argv", mode="before")
    @classmethod
    def _argv_is_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError("argv must be a list of strings, not a shell string")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> Step:
        if self.argv is None and self.http is None:
            raise ValueError("a step needs argv (shell runner) or http")
        if self.argv is not None and len(self.argv) == 0:
            raise ValueError("argv cannot be empty")
        if self.env is not None and self.argv is None:
            raise ValueError("env is for argv steps")
        return self


class Range(Frozen):
    """Flagger-style range: min and/or max, both inclusive, and optionally one bound
    relative to the action's baseline (the value measured just before `run`).

    `baseline_plus: x` puts the bound at baseline + x, `baseline_times: x` at
    baseline * x. Which side it bounds follows from the query's `worse_when`: in a halt
    range it is the worse side (a halt on "0.05 worse than before"), in a pass range the
    better side (a mitigation passes at "half the baseline or better"). A value is in the
    range when it is within the absolute bounds (if any) *or* beyond the relative one:
    `pass: {max: 0.01, baseline_times: 0.5}` passes at 1 % or at half the baseline.
    """

    # NaN never compares, so a NaN bound would make every value pass (or none, forever).
    min: float | None = Field(default=None, allow_inf_nan=False)
    max: float | None = Field(default=None, allow_inf_nan=False)
    baseline_plus: float | None = Field(default=None, allow_inf_nan=False)
    baseline_times: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _bounded(self) -> Range:
        bounds = (self.min, self.max, self.baseline_plus, self.baseline_times)
        if all(b is None for b in bounds):
            raise ValueError("a range needs min, max, baseline_plus or baseline_times")
        if any(b is not None and not math.isfinite(b) for b in bounds):
            raise ValueError("range bounds must be finite numbers")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is greater than max")
        if self.baseline_plus is not None and self.baseline_times is not None:
            raise ValueError("use baseline_plus or baseline_times, not both")
        return self

    @property
    def absolute(self) -> bool:
        return self.min is not None or self.max is not None

    @property
    def relative(self) -> bool:
        return self.baseline_plus is not None or self.baseline_times is not None

    def threshold(self, baseline: float) -> float:
        """The relative bound for this baseline (only for a relative range)."""
        if self.baseline_plus is not None:
            return baseline + self.baseline_plus
        assert self.baseline_times is not None
        return baseline * self.baseline_times

    def contains(self, value: float) -> bool:
        """Within the absolute bounds (False for a range that has none)."""
        if not self.absolute:
            return False
        if self.min is not None and value < self.min:
            return False
        return not (self.max is not None and value > self.max)


def _bounded_lookback(query: str) -> str:
    """A signal's query must say how far back it reads: the post-change evidence floor
    rests on it (docs/design.md, "Post-change evidence")."""
    query_lookback(query)
    return query


Worse = Literal["higher", "lower"]


class Signal(Frozen):
    """A PromQL query whose value must stay in `pass` for the action to be verified."""

    name: str = Field(pattern=NAME_PATTERN)
    query: str = Field(min_length=1, max_length=4000)
    pass_: Range = Field(alias="pass")
    # Which way is worse (error rates, latency: higher); orients relative bounds.
    worse_when: Worse = "higher"

    @field_validator("query")
    @classmethod
    def _lookback_known(cls, value: str) -> str:
        return _bounded_lookback(value)


class StopCondition(Frozen):
    """A PromQL query; one measurement in `halt` stops the action and rolls it back."""

    name: str = Field(pattern=NAME_PATTERN)
    query: str = Field(min_length=1, max_length=4000)
    halt: Range
    worse_when: Worse = "higher"

    @field_validator("query")
    @classmethod
    def _lookback_known(cls, value: str) -> str:
        return _bounded_lookback(value)


class VerificationSpec(Frozen):
    interval: StepDuration = 10.0
    hold: StepDuration = 120.0
    timeout: StepDuration = 600.0
    # Signal measurements taken before this many seconds after `run` ended are stored
    # but not counted (settling); it only ever lengthens the post-change evidence floor.
    initial_delay: StepDuration = 0.0
    signals: tuple[Signal, ...] = ()
    stop_conditions: tuple[StopCondition, ...] = ()
    failure_limit: int = Field(default=2, ge=0)
    error_limit: int = Field(default=3, ge=0)

    @model_validator(mode="after")
    def _coherent(self) -> VerificationSpec:
        if self.interval < MIN_INTERVAL:
            raise ValueError(f"interval must be at least {MIN_INTERVAL:g}s")
        if self.timeout < self.hold:
            raise ValueError("timeout must be at least hold")
        names = [s.name for s in self.signals] + [c.name for c in self.stop_conditions]
        if len(names) != len(set(names)):
            raise ValueError("signal and stop condition names must be unique")
        return self

    @property
    def defined(self) -> bool:
        return bool(self.signals) and bool(self.stop_conditions)

    @property
    def relative(self) -> bool:
        """Some range is relative to the baseline: the action needs one to run."""
        return any(s.pass_.relative for s in self.signals) or any(
            c.halt.relative for c in self.stop_conditions
        )


class ActionType(Frozen):
    """One entry of the action catalog: what may be proposed at all."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    risk: Literal["low", "medium", "high", "critical"] = "medium"
    # A mitigation is applied while signals are bad and must improve them; a change is
    # applied to a healthy system and must keep it healthy. The lint holds each to it.
    intent: Literal["mitigation", "change"] = "change"
    params: dict[str, ParamSpec] = Field(default_factory=dict)
    capture: Step | None = None
    run: Step
    undo: Step | None = None
    preconditions: tuple[str, ...] = ()
    verification: VerificationSpec = Field(default_factory=VerificationSpec)
    # Where post-change evidence may start: after `run` ended (the default), or after it
    # started, for a step that keeps running while its effect is already live (a slow
    # rollout). Only the action type can say so, and it must say why.
    evidence_after: Literal["run_end", "run_start"] = "run_end"
    evidence_after_reason: str | None = Field(default=None, max_length=500)

    @model_validator(mode="after")
    def _evidence_rule_explained(self) -> ActionType:
        reason = (self.evidence_after_reason or "").strip()
        if self.evidence_after == "run_start" and len(reason) < 10:
            raise ValueError(
                "evidence_after: run_start needs evidence_after_reason saying why evidence "
                "taken while run is under way shows the change"
            )
        return self

    @field_validator("params")
    @classmethod
    def _param_names(cls, value: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        for key in value:
            if not re.match(NAME_PATTERN, key) or key in {"target", "environment"}:
                raise ValueError(f"invalid parameter name {key!r}")
        return value

    @property
    def reversible(self) -> bool:
        return self.undo is not None


# --- proposals and actions ---------------------------------------------------------------


class Incident(Frozen):
    id: str | None = Field(default=None, max_length=128)
    severity: Literal["sev1", "sev2", "sev3", "sev4"] | None = None
    class_: str | None = Field(default=None, alias="class", max_length=64)
    tier: Literal["critical", "standard", "internal"] | None = None


class Proposal(Frozen):
    """What a proposer submits; validated against the catalog before policy sees it."""

    action: str = Field(pattern=NAME_PATTERN, max_length=64)
    target: str = Field(pattern=TARGET_PATTERN)
    environment: str = Field(pattern=r"^[a-z][a-z0-9-]{0,31}$")
    params: dict[str, str | int | float | bool] = Field(default_factory=dict)
    reason: str = Field(min_length=1, max_length=MAX_REASON_LENGTH)
    incident: Incident = Field(default_factory=Incident)
    verification: VerificationSpec | None = None
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=128)

    @field_validator("params")
    @classmethod
    def _param_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if not re.match(NAME_PATTERN, key):
                raise ValueError(f"invalid parameter name {key!r}")
        return value


class Identity(Frozen):
    id: str = Field(min_length=1, max_length=128)
    kind: Literal["human", "agent"] = "human"


class DenyReason(Frozen):
    code: str
    message: str = ""


class Decision(Frozen):
    """A policy verdict with everything needed to reproduce it."""

    id: str
    action_id: str | None
    phase: Literal["propose", "execute", "approval", "dry_run", "authz"]
    allow: bool
    deny: tuple[DenyReason, ...] = ()
    required_approvals: int = 1
    approver_roles: tuple[str, ...] = ()
    engine: str
    bundle_revision: str
    input: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None = None
    decided_at: datetime
    duration_ms: float = 0.0
    # The shadow bundle's verdict on the same input ({allow, deny, revision, ...}):
    # stored and reported as "would have blocked", never enforced.
    shadow: dict[str, Any] | None = None

    @property
    def deny_codes(self) -> list[str]:
        return [d.code for d in self.deny]


class Action(Frozen):
    """A proposal as stored, with its lifecycle state."""

    id: str
    action_type: str
    target: str
    environment: str
    params: dict[str, Any]
    reason: str
    incident: Incident
    verification: VerificationSpec
    risk: str
    reversible: bool
    spec_hash: str
    proposer: Identity
    state: ActionState
    required_approvals: int = 1
    approver_roles: tuple[str, ...] = ()
    idempotency_key: str | None = None
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None = None
    approved_at: datetime | None = None  # when the last required approval arrived


class Approval(Frozen):
    id: str
    action_id: str
    approver: Identity
    spec_hash: str
    comment: str = ""
    created_at: datetime


class AuditEvent(Frozen):
    """One link of the hash-chained audit log."""

    seq: int
    id: str
    at: datetime
    action_id: str | None
    kind: str
    actor: str
    from_state: str | None = None
    to_state: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    prev_hash: str
    hash: str


class AuditCheckpoint(Frozen):
    """The chain's head as the key holder (worker/server tier) saw and signed it."""

    seq: int
    hash: str
    at: datetime
    key_id: str
    signature: str  # base64 Ed25519 signature of `checkpoint_payload(seq, hash, at)`


class Measurement(Frozen):
    """One query result at one time: the evidence behind every pass and fail.

    `phase` is when it was taken: `run` (stop conditions watched while the action's
    step runs), `verify` (after it ran) or `rollback` (verifying the undo).
    """

    action_id: str
    phase: Literal["baseline", "run", "verify", "rollback"] = "verify"
    name: str
    kind: Literal["signal", "stop_condition"]
    at: datetime
    value: float | None
    outcome: Literal["pass", "fail", "inconclusive", "error"]
    detail: str = ""
    # Evidence that did not count toward hold or failure_limit: `pre_change` (its query
    # window still reached back before the change) or `settling` (initial_delay).
    not_counted: Literal["pre_change", "settling"] | None = None


ExecutionOutcome = Literal[
    "succeeded",  # verification passed
    "stopped",  # a stop condition fired
    "failed_verification",  # failed measurements exceeded failure_limit
    "timeout",  # hold not reached before timeout
    "provider_errors",  # consecutive provider errors exceeded error_limit
    "runner_error",  # capture/run failed, timed out or was cancelled
    "manual",  # `opsgate rollback` of a running or succeeded action
]


class Execution(Frozen):
    """One execution of an approved action: claim, capture, run, verify, roll back.

    Times are recorded before each step starts, so a new owner of a lapsed lease knows
    whether `run` may have started (then it never starts it again).
    """

    action_id: str
    target: str
    environment: str
    worker_id: str
    claimed_at: datetime
    lease_expires_at: datetime
    heartbeat_at: datetime
    captured: dict[str, Any] = Field(default_factory=dict)
    capture_output: str = ""
    # Each signal's and stop condition's value just before `run` (None: no value).
    baseline: dict[str, float | None] | None = None
    run_started_at: datetime | None = None
    run_finished_at: datetime | None = None
    run_exit_code: int | None = None
    run_output: str = ""
    run_error: str | None = None
    verify_started_at: datetime | None = None
    verify_state: dict[str, Any] | None = None  # a VerificationState, JSON
    outcome: ExecutionOutcome | None = None
    reason: str = ""  # why it ended as it did, in one line
    trigger_name: str | None = None  # the stop condition or signal that decided
    trigger_kind: Literal["signal", "stop_condition"] | None = None
    trigger_value: float | None = None
    rollback_decided_at: datetime | None = None
    rollback_requested_by: str | None = None
    undo_started_at: datetime | None = None
    undo_finished_at: datetime | None = None
    undo_exit_code: int | None = None
    undo_output: str = ""
    undo_error: str | None = None
    rollback_verify_state: dict[str, Any] | None = None
    rollback_verified_at: datetime | None = None
    finished_at: datetime | None = None
    recovered_from: str | None = None  # the worker whose lapsed lease this one took over

    @property
    def rollback_time(self) -> float | None:
        """Seconds from the rollback decision until rollback verification passed."""
        if self.rollback_decided_at is None or self.rollback_verified_at is None:
            return None
        return (self.rollback_verified_at - self.rollback_decided_at).total_seconds()

    @property
    def run_may_have_started(self) -> bool:
        """`run_started_at` is stored before the step starts: from then on the target may
        have changed, so `run` is never started again (docs/design.md, "Recovery")."""
        return self.run_started_at is not None


class ExecutionUpdate(Frozen):
    """The facts one step changes in an execution row: only the fields set here (set to
    None included) are written, and key fields cannot be named (`extra="forbid"`). Each
    value is checked against `Execution`'s own field type by the store."""

    worker_id: str | None = None
    lease_expires_at: datetime | None = None
    heartbeat_at: datetime | None = None
    captured: dict[str, Any] | None = None
    capture_output: str | None = None
    baseline: dict[str, float | None] | None = None
    run_started_at: datetime | None = None
    run_finished_at: datetime | None = None
    run_exit_code: int | None = None
    run_output: str | None = None
    run_error: str | None = None
    verify_started_at: datetime | None = None
    verify_state: dict[str, Any] | None = None
    outcome: ExecutionOutcome | None = None
    reason: str | None = None
    trigger_name: str | None = None
    trigger_kind: Literal["signal", "stop_condition"] | None = None
    trigger_value: float | None = None
    rollback_decided_at: datetime | None = None
    rollback_requested_by: str | None = None
    undo_started_at: datetime | None = None
    undo_finished_at: datetime | None = None
    undo_exit_code: int | None = None
    undo_output: str | None = None
    undo_error: str | None = None
    rollback_verify_state: dict[str, Any] | None = None
    rollback_verified_at: datetime | None = None
    finished_at: datetime | None = None
    recovered_from: str | None = None

    def changes(self) -> dict[str, Any]:
        """Field -> new value, for the fields this update sets."""
        return {name: getattr(self, name) for name in sorted(self.model_fields_set)}

    def merged(self, other: ExecutionUpdate) -> ExecutionUpdate:
        """This update followed by `other` (its fields win)."""
        return ExecutionUpdate(**{**self.changes(), **other.changes()})


class WorkerInfo(Frozen):
    """A worker process, as `opsgate workers` lists it."""

    id: str
    hostname: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None = None

    def status(self, now: datetime, lease: float) -> Literal["live", "lapsed", "stopped"]:
        """live, lapsed (no heartbeat for a whole lease: presumed dead) or stopped."""
        if self.stopped_at is not None:
            return "stopped"
        if (now - self.heartbeat_at).total_seconds() > lease:
            return "lapsed"
        return "live"


# Fields of an execution fixed when it is claimed; everything else may change.
EXECUTION_KEY_FIELDS = frozenset({"action_id", "target", "environment", "claimed_at"})
MUTABLE_EXECUTION_FIELDS = frozenset(Execution.model_fields) - EXECUTION_KEY_FIELDS


# --- API credentials ----------------------------------------------------------------------


class TrustReset(Frozen):
    """A human lifting `trust_revoked` for one proposer and action type."""

    id: str
    proposer_id: str = Field(min_length=1, max_length=128)
    action_type: str = Field(min_length=1, max_length=128)
    reset_by: str = Field(min_length=1, max_length=128)
    reason: str = Field(min_length=1, max_length=2000)
    at: datetime


class ApiToken(Frozen):
    """An opaque API token for `opsgate server`; only the secret's SHA-256 is kept."""

    id: str = Field(min_length=1, max_length=64)
    principal: str = Field(min_length=1, max_length=128)
    kind: Literal["human", "agent"] = "agent"
    groups: tuple[str, ...] = ()
    secret_hash: str
    created_at: datetime
    created_by: str
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    revoked_by: str | None = None

    def status(self, now: datetime) -> Literal["active", "expired", "revoked"]:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"
