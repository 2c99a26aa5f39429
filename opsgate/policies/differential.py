"""Differential testing: the same inputs through regopy and OPA's Go evaluator.

Inputs follow the policy input contract (`opsgate.policies.input.build_input`): every
action type the bundle names, every environment, every principal in `data.roles` plus
strangers and agents, parameter values at and around each bound, times at the edges of
each freeze window, preconditions in every state, and the approval rule with every kind
of approver. The generator takes a `choose(options)` function, so the same space is
drawn by hypothesis in the tests (which then shrinks a failure to a minimal input) and
by a seeded `random.Random` in `opsgate policy test --against-opa`.

Two answers agree when allow, the deny codes (with repeats), required_approvals,
approver_roles and the deny messages are all equal: a message that differs means a
built-in (sprintf, a number's formatting) answers differently, which is a divergence too.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

from opsgate.policies.engine import APPROVAL_RULE, DECISION_RULE, PolicyResult

T = TypeVar("T")
Choose = Callable[[Sequence[T]], T]

SEVERITIES = ("sev2", "sev1", "sev3", "sev4", "", None)
TIERS = ("standard", "critical", "internal")
RISKS = ("medium", "low", "high", "critical", "")
KINDS = ("human", "agent", "service", "")
PHASES = ("propose", "execute")
BASE_TIME = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


class Engine(Protocol):
    def evaluate(self, rule: str, input: Mapping[str, Any]) -> PolicyResult: ...


@dataclass(frozen=True)
class Space:
    """What the bundle's data makes interesting: names, bounds and instants."""

    action_types: tuple[str, ...]
    environments: tuple[str, ...]
    principals: tuple[str, ...]
    param_values: Mapping[str, tuple[Any, ...]]
    instants: tuple[datetime, ...]

    @classmethod
    def from_data(cls, data: Mapping[str, Any], catalog: Sequence[str] = ()) -> Space:
        def keys(name: str) -> list[str]:
            table = data.get(name)
            return [str(k) for k in table] if isinstance(table, Mapping) else []

        allowlist = data.get("allowlist") if isinstance(data.get("allowlist"), Mapping) else {}
        types = {str(t) for v in (allowlist or {}).values() if isinstance(v, list) for t in v}
        types |= set(catalog) | set(keys("param_bounds"))
        environments = set(keys("allowlist")) | set(keys("propose_roles"))
        environments |= set(keys("approver_roles"))
        environments.discard("default")
        # Every bound, one either side of it, and values of the wrong type.
        params: dict[str, set[Any]] = {}
        bounds = data.get("param_bounds")
        for per_param in (bounds or {}).values() if isinstance(bounds, Mapping) else ():
            if not isinstance(per_param, Mapping):
                continue
            for param, per_env in per_param.items():
                values = params.setdefault(str(param), {0, 1, -1, 2.5, "12", None})
                for bound in per_env.values() if isinstance(per_env, Mapping) else ():
                    for key in ("min", "max"):
                        edge = bound.get(key) if isinstance(bound, Mapping) else None
                        if isinstance(edge, int | float) and not isinstance(edge, bool):
                            values |= {edge - 1, edge, edge + 1, edge + 0.5, edge * 3}
        instants = {BASE_TIME}
        windows = data.get("freeze_windows")
        for window in windows if isinstance(windows, list) else ():
            for key in ("start", "end"):
                moment = _parse(window.get(key)) if isinstance(window, Mapping) else None
                if moment is not None:
                    for delta in (-1, 0, 1):
                        instants.add(moment + timedelta(microseconds=delta))
        return cls(
            action_types=(*tuple(sorted(types)), "unlisted_action"),
            environments=(*tuple(sorted(environments)), "qa", ""),
            principals=(*tuple(sorted(keys("roles"))), "mallory", ""),
            param_values={k: tuple(sorted(v, key=repr)) for k, v in sorted(params.items())},
            instants=tuple(sorted(instants)),
        )


def _parse(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _epoch_ns(moment: datetime) -> int:
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000


def generate(space: Space, choose: Choose[Any]) -> tuple[str, dict[str, Any]]:
    """(rule, input): one draw from the contract. Options come simplest first."""
    action_type = choose(space.action_types)
    environment = choose(space.environments)
    params: dict[str, Any] = {}
    for param, values in space.param_values.items():
        if choose((True, False)):
            params[param] = choose(values)
    if choose((False, True)):
        params["reason_code"] = choose(("", "x", "ü", "a\nb"))
    preconditions: list[dict[str, Any]] = []
    for name in ("current_replicas", "error_rate_elevated", "change_freeze", "concurrent_action"):
        state = choose(("absent", "ok", "failed", "errored", "required-failed"))
        if state == "absent":
            continue
        item: dict[str, Any] = {
            "name": name,
            "ok": state == "ok",
            "value": choose((10, 0, 4, None, "black-friday", 0.001)),
            "required": state == "required-failed",
        }
        if state == "errored":
            item["error"] = "prometheus unreachable"
        preconditions.append(item)
    moment = choose(space.instants)
    proposer = choose(space.principals)
    document: dict[str, Any] = {
        "action": {
            "type": action_type,
            "target": choose(("checkout", "node-7", "")),
            "environment": environment,
            "params": params,
            "risk": choose(RISKS),
            "reversible": choose((True, False, None)),
            "spec_hash": "sha256:differential",
            "reason": choose(("p99 latency over SLO", "", "ü" * 3)),
        },
        "proposer": {"id": proposer, "kind": choose(KINDS)},
        "incident": {
            "id": "INC-1",
            "severity": choose(SEVERITIES),
            "class": "capacity",
            "tier": choose(TIERS),
        },
        "verification": {
            "defined": choose((True, False)),
            "signals": choose((1, 0, 3)),
            "stop_conditions": choose((1, 0, 2)),
        },
        "preconditions": preconditions,
        "context": {
            "now": _rfc3339(moment),
            "now_ns": _epoch_ns(moment),
            "phase": choose(PHASES),
            "active_on_target": choose((0, 1, 2)),
        },
    }
    if choose(("decision", "approval")) == "approval":
        document["approver"] = {"id": choose(space.principals), "kind": choose(KINDS)}
        return APPROVAL_RULE, document
    return DECISION_RULE, document


def summary(result: PolicyResult) -> dict[str, Any]:
    """The parts of a decision both engines must agree on."""
    return {
        "allow": result.allow,
        "deny": sorted((d["code"], d["message"]) for d in result.deny),
        "required_approvals": result.required_approvals,
        "approver_roles": list(result.approver_roles),
        "error": result.error is not None,
    }


@dataclass(frozen=True)
class Disagreement:
    rule: str
    input: dict[str, Any]
    embedded: dict[str, Any]
    opa: dict[str, Any]

    def fields(self) -> list[str]:
        return sorted(k for k in self.embedded if self.embedded[k] != self.opa.get(k))


def compare(
    embedded: Engine, opa: Engine, rule: str, document: dict[str, Any]
) -> Disagreement | None:
    a = summary(embedded.evaluate(rule, document))
    b = summary(opa.evaluate(rule, document))
    return None if a == b else Disagreement(rule, document, a, b)


def random_inputs(space: Space, count: int, seed: int) -> Iterator[tuple[str, dict[str, Any]]]:
    rng = random.Random(seed)  # not for security: reproducible test inputs
    for _ in range(count):
        yield generate(space, rng.choice)


def shrink(embedded: Engine, opa: Engine, found: Disagreement, budget: int = 400) -> Disagreement:
    """A smaller input that still disagrees the same way (in the same fields): drop keys
    and simplify values, greedily. Keeping the fields keeps the shrink on one divergence
    instead of sliding to another (an input with no fields at all diverges differently)."""
    rule, document = found.rule, copy.deepcopy(found.input)
    tries = 0
    changed = True
    while changed and tries < budget:
        changed = False
        for path, candidate in list(_simplifications(document)):
            tries += 1
            trial = _replace(document, path, candidate)
            smaller = compare(embedded, opa, rule, trial)
            if smaller is not None and smaller.fields() == found.fields():
                document, changed = trial, True
                break
            if tries >= budget:
                break
    return compare(embedded, opa, rule, document) or found


_DROP = object()


def _simplifications(
    node: Any, path: tuple[Any, ...] = ()
) -> Iterator[tuple[tuple[Any, ...], Any]]:
    if isinstance(node, dict):
        for key in list(node):
            yield (*path, key), _DROP
        for key, value in node.items():
            yield from _simplifications(value, (*path, key))
    elif isinstance(node, list):
        for index in range(len(node)):
            yield (*path, index), _DROP
        for index, value in enumerate(node):
            yield from _simplifications(value, (*path, index))
    elif isinstance(node, str) and node:
        yield path, ""
    elif isinstance(node, int | float) and not isinstance(node, bool) and node != 0:
        yield path, 0


def _replace(document: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    trial = copy.deepcopy(document)
    parent: Any = trial
    for key in path[:-1]:
        parent = parent[key]
    if value is _DROP:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return trial


class InProcess:
    """An evaluator in this process, no deadline: only for bundles known not to hang
    (the shipped one, in tests). User bundles go through the sandboxed engines."""

    def __init__(self, evaluator: str, directory: Path) -> None:
        from opsgate.policies.engine import bundle_files, bundle_revision, load_bundle_data
        from opsgate.policies.sandbox import EVALUATORS, Payload

        modules = tuple(
            (p.relative_to(directory).as_posix(), p.read_text("utf-8"))
            for p in bundle_files(directory)
            if p.suffix == ".rego"
        )
        self.revision = bundle_revision(directory)
        payload = Payload(
            self.revision,
            modules,
            load_bundle_data(directory),
            (DECISION_RULE, APPROVAL_RULE),
            evaluator,
        )
        self._evaluator = EVALUATORS[evaluator](payload.message())

    def evaluate(self, rule: str, input: Mapping[str, Any]) -> PolicyResult:
        from opsgate.policies.engine import interpret, unavailable

        answer = self._evaluator.evaluate(rule, dict(input))
        if answer.get("ok") is not True:
            return unavailable(str(answer.get("error")), self.revision)
        return interpret(answer.get("value"), self.revision)
