"""Turning a raw proposal document into a validated, hashed spec; pure, no I/O."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from opsgate.audit import canonical_json
from opsgate.catalog import Catalog, first_error
from opsgate.errors import InvalidInput, did_you_mean
from opsgate.models import (
    MAX_REASON_LENGTH,
    Action,
    ActionType,
    ParamSpec,
    Proposal,
    VerificationSpec,
)
from opsgate.shared import PLACEHOLDER

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class ValidatedProposal:
    proposal: Proposal
    action_type: ActionType
    params: dict[str, Any]
    verification: VerificationSpec
    spec_hash: str


def _coerce(name: str, spec: ParamSpec, value: Any) -> Any:
    field = f"params.{name}"
    if spec.type == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false"}:
            return value.lower() == "true"
        raise InvalidInput(field, "expected true or false")
    if spec.type == "integer":
        if isinstance(value, bool):
            raise InvalidInput(field, "expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d{1,18}", value.strip()):
            return int(value)
        raise InvalidInput(field, "expected an integer")
    if spec.type == "number":
        if isinstance(value, bool):
            raise InvalidInput(field, "expected a number")
        if isinstance(value, int | float):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise InvalidInput(field, "expected a number") from None
        else:
            raise InvalidInput(field, "expected a number")
        if number != number or number in (float("inf"), float("-inf")):
            raise InvalidInput(field, "expected a finite number")
        return number
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidInput(field, "expected a string")
    return str(value)


def _check(name: str, spec: ParamSpec, value: Any) -> None:
    field = f"params.{name}"
    if isinstance(value, str):
        if _CONTROL.search(value):
            raise InvalidInput(field, "control characters are not allowed")
        if spec.min_length is not None and len(value) < spec.min_length:
            raise InvalidInput(field, f"shorter than {spec.min_length} characters")
        if spec.max_length is not None and len(value) > spec.max_length:
            raise InvalidInput(field, f"longer than {spec.max_length} characters")
        if spec.pattern is not None and not re.search(spec.pattern, value):
            raise InvalidInput(field, f"does not match {spec.pattern}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if spec.minimum is not None and value < spec.minimum:
            raise InvalidInput(field, f"{value} is below the minimum {spec.minimum:g}")
        if spec.maximum is not None and value > spec.maximum:
            raise InvalidInput(field, f"{value} is above the maximum {spec.maximum:g}")
    if spec.enum is not None and value not in spec.enum:
        choices = ", ".join(str(c) for c in spec.enum)
        raise InvalidInput(field, f"must be one of {choices}")


def validate_params(action_type: ActionType, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Coerce and check params against the action type's schema; defaults filled in."""
    unknown = sorted(set(raw) - set(action_type.params))
    if unknown:
        known = ", ".join(sorted(action_type.params)) or "none"
        hint = did_you_mean(unknown[0], action_type.params)
        raise InvalidInput(f"params.{unknown[0]}", f"unknown parameter{hint} (known: {known})")
    params: dict[str, Any] = {}
    for name, spec in action_type.params.items():
        if name not in raw:
            if spec.default is not None:
                params[name] = spec.default
                continue
            if spec.required:
                raise InvalidInput(f"params.{name}", "required parameter missing")
            continue
        value = _coerce(name, spec, raw[name])
        _check(name, spec, value)
        params[name] = value
    return params


_DEFINITIONS: dict[int, tuple[ActionType, str]] = {}


def definition_hash(action_type: ActionType) -> str:
    """The hash of an action type's full definition, computed once per loaded type."""
    cached = _DEFINITIONS.get(id(action_type))
    if cached is not None and cached[0] is action_type:
        return cached[1]
    dumped = canonical_json(action_type.model_dump(mode="json", by_alias=True))
    digest = "sha256:" + hashlib.sha256(dumped.encode("utf-8")).hexdigest()
    if len(_DEFINITIONS) > 1024:  # catalogs reloaded many times: start over
        _DEFINITIONS.clear()
    _DEFINITIONS[id(action_type)] = (action_type, digest)
    return digest


def spec_hash(
    action_type: ActionType,
    target: str,
    environment: str,
    params: Mapping[str, Any],
    verification: VerificationSpec,
) -> str:
    """What an approval authorizes: the action type's definition and this exact spec."""
    document = {
        "action_type": definition_hash(action_type),
        "target": target,
        "environment": environment,
        "params": dict(params),
        "verification": verification.model_dump(mode="json", by_alias=True),
    }
    return "sha256:" + hashlib.sha256(canonical_json(document).encode("utf-8")).hexdigest()


def _reject_control_characters(value: Any, path: str) -> None:
    """Control characters have no business in a proposal (and NUL breaks PostgreSQL)."""
    if isinstance(value, str):
        if _CONTROL.search(value):
            raise InvalidInput(path, "control characters are not allowed")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or _CONTROL.search(key):
                raise InvalidInput(path or "proposal", f"key {key!r} is not a plain string")
            name = f"{path}.{key}" if path else key
            _reject_control_characters(item, name)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _reject_control_characters(item, f"{path}.{index}")


def _leading_placeholders(action_type: ActionType) -> set[str]:
    names: set[str] = set()
    for step in (action_type.capture, action_type.run, action_type.undo):
        for element in (step.argv or ())[1:] if step else ():
            match = PLACEHOLDER.match(element)
            if match:
                names.add(match.group(1))
    return names


def _refuse_option_like(action_type: ActionType, params: Mapping[str, Any]) -> None:
    """A value that would begin an argv element with `-` could pass as an option."""
    for name in sorted(_leading_placeholders(action_type) & set(params)):
        if str(params[name]).startswith("-"):
            raise InvalidInput(f"params.{name}", "may not start with '-'")


def parse_proposal(document: Any) -> Proposal:
    if not isinstance(document, dict):
        raise InvalidInput("proposal", "expected a mapping (YAML or JSON object)")
    _reject_control_characters(document, "")
    reason = document.get("reason")
    if isinstance(reason, str) and len(reason) > MAX_REASON_LENGTH:
        raise InvalidInput("reason", f"longer than {MAX_REASON_LENGTH} characters")
    try:
        return Proposal.model_validate(document)
    except ValidationError as exc:
        raise first_error(exc) from exc


def validate(catalog: Catalog, document: Any) -> ValidatedProposal:
    """Everything short of policy: schema, catalog, params, verification, hash."""
    proposal = document if isinstance(document, Proposal) else parse_proposal(document)
    if _CONTROL.search(proposal.reason):
        raise InvalidInput("reason", "control characters are not allowed")
    action_type = catalog.get(proposal.action)
    params = validate_params(action_type, proposal.params)
    _refuse_option_like(action_type, params)
    verification = proposal.verification or action_type.verification
    digest = spec_hash(action_type, proposal.target, proposal.environment, params, verification)
    return ValidatedProposal(proposal, action_type, params, verification, digest)


def step_values(
    action: Action, captured: Mapping[str, Any], params: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What `{placeholders}` in an action's steps and queries may name; `params` stands
    in for the action's own where they are shown rather than run (masked)."""
    return {
        **(action.params if params is None else params),
        **captured,
        "target": action.target,
        "environment": action.environment,
    }


def proposal_of(action: Action) -> Proposal:
    """The proposal an action was made from, to be judged again."""
    return Proposal(
        action=action.action_type,
        target=action.target,
        environment=action.environment,
        params=action.params,
        reason=action.reason,
        incident=action.incident,
        verification=action.verification,
        idempotency_key=action.idempotency_key,
    )
