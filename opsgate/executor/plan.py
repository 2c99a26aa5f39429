"""What will run, as the approver reads it: each step with its params filled in
(secrets masked), and the verification plan with its rendered queries.

Pure: nothing is run or queried. Captured values that only exist once the action has
started show as `<captured NAME>` until they do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from opsgate.executor.runners import StepError, render_argv, render_body, render_url
from opsgate.models import Action, ActionType, Step
from opsgate.policies.input import mask_params
from opsgate.proposals import step_values
from opsgate.verification.evaluator import halt_range_text, pass_range_text
from opsgate.verification.lookback import query_lookback
from opsgate.verification.plan import verification_differences, verification_document
from opsgate.verification.promql import render_query

__all__ = ["action_plan", "plan_lines"]


def _values(
    action: Action,
    action_type: ActionType | None,
    captured: Mapping[str, Any],
    shown_params: Mapping[str, Any] | None,
) -> dict[str, Any]:
    if shown_params is None:
        # Which params are secret: today's catalog, else nobody can tell, so none is shown.
        shown_params = (
            mask_params(action.params, action_type.params)
            if action_type is not None
            else {name: "***" for name in action.params}
        )
    shown = captured
    if action_type is not None and action_type.capture is not None:
        name = action_type.capture.as_ or "captured"
        shown = {name: f"<captured {name}>", **captured}
    return step_values(action, shown, shown_params)


def _step(step: Step | None, values: Mapping[str, Any]) -> dict[str, Any] | None:
    if step is None:
        return None
    described: dict[str, Any] = {"runner": step.runner, "timeout": step.timeout}
    try:
        if step.argv is not None:
            described["argv"] = render_argv(step.argv, values)
        elif step.http is not None:
            described["http"] = {
                "method": step.http.method,
                "url": render_url(step.http.url, values),
                "body": render_body(step.http.body, values) if step.http.body else None,
                "expect_status": list(step.http.expect_status),
            }
    except StepError as exc:
        described["error"] = str(exc)
    if step.type is not None:
        described["type"] = step.type
    return described


def action_plan(
    action: Action,
    action_type: ActionType | None,
    captured: Mapping[str, Any] | None = None,
    *,
    shown_params: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The steps and verification of `action` as they will run (or ran).

    `shown_params` are the params as they may be shown (secrets masked as recorded when
    the action was proposed); without them, today's catalog says which are secret, and
    an action type it no longer has shows no param value at all.
    """
    captured = dict(captured or {})
    values = _values(action, action_type, captured, shown_params)
    plan: dict[str, Any] = {}
    if action_type is None:
        plan["steps"] = None
        plan["steps_note"] = f"action type {action.action_type} is not in today's catalog"
    else:
        plan["steps"] = {
            name: _step(step, values)
            for name, step in (
                ("capture", action_type.capture),
                ("run", action_type.run),
                ("undo", action_type.undo),
            )
            if step is not None
        }
    spec = action.verification
    document = verification_document(spec)
    scalars = {k: v for k, v in values.items() if isinstance(v, str | int | float | bool)}
    for entry, item in zip(document["signals"], spec.signals, strict=True):
        entry["rendered"] = _rendered(item.query, scalars)
        entry["lookback"] = _lookback(item.query)
        entry["range"] = pass_range_text(item)
    for entry, stop in zip(document["stop_conditions"], spec.stop_conditions, strict=True):
        entry["rendered"] = _rendered(stop.query, scalars)
        entry["lookback"] = _lookback(stop.query)
        entry["range"] = halt_range_text(stop)
    plan["verification"] = document
    default = action_type.verification if action_type is not None else None
    plan["custom"] = default is not None and default != spec
    plan["differences"] = (
        [d.as_input() for d in verification_differences(default, spec)] if default else []
    )
    return plan


def _rendered(query: str, values: Mapping[str, Any]) -> str:
    try:
        return render_query(query, values)
    except ValueError as exc:
        return f"(cannot render: {exc})"


def _lookback(query: str) -> float | None:
    try:
        return query_lookback(query)
    except ValueError:
        return None


def plan_lines(plan: Mapping[str, Any]) -> list[str]:
    """The plan as indented text lines, for `opsgate show`."""
    lines: list[str] = []
    steps = plan.get("steps")
    if steps is None:
        lines.append(f"steps: {plan.get('steps_note', 'unknown')}")
    else:
        for name, step in steps.items():
            if step is None:
                continue
            if "error" in step:
                lines.append(f"{name}: cannot render: {step['error']}")
            elif "argv" in step:
                lines.append(f"{name}: {' '.join(_quote(a) for a in step['argv'])}")
            else:
                http = step["http"]
                body = f" {json.dumps(http['body'])}" if http.get("body") is not None else ""
                lines.append(f"{name}: {http['method']} {http['url']}{body}")
            if step.get("type"):
                lines[-1] += f"  (kept as {step['type']})"
    v = plan["verification"]
    lines.append(
        f"verification: every {v['interval']:g}s, initial delay {v['initial_delay']:g}s, "
        f"hold {v['hold']:g}s, timeout {v['timeout']:g}s, failure_limit {v['failure_limit']}, "
        f"error_limit {v['error_limit']}"
    )
    for kind, key in (("signal", "signals"), ("stop", "stop_conditions")):
        for item in v[key]:
            lookback = item["lookback"]
            reach = f", reads back {lookback:g}s" if lookback else ""
            shown = item["range"] if kind == "signal" else f"halt {item['range']}"
            lines.append(f"  {kind} {item['name']} {shown}{reach}: {item['rendered']}")
    if plan.get("custom"):
        lines.append("the proposal replaced the action type's default verification:")
        for difference in plan.get("differences", []):
            mark = "weaker" if difference["weakens"] else "stricter"
            lines.append(f"  {difference['message']} ({mark})")
    return lines


def _quote(arg: str) -> str:
    if arg and all(ch.isalnum() or ch in "-_./=:,{}<>@%+" for ch in arg):
        return arg
    return "'" + arg.replace("'", "'\\''") + "'"
