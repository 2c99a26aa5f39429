"""The action catalog: one YAML file per action type, validated on load."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from opsgate.errors import InvalidInput, did_you_mean
from opsgate.models import ActionType, ParamSpec, Step
from opsgate.shared import PLACEHOLDER
from opsgate.verification.lint import Finding, lint_action_type
from opsgate.verification.provider import PROMETHEUS_DEFAULT_SCRAPE_INTERVAL

BUILTINPLACEHOLDERS = frozenset({"target", "environment"})


def first_error(exc: ValidationError, prefix: str = "") -> InvalidInput:
    """One line naming the first bad field of a pydantic error."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if p != "__root__")
    field = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or "input")
    message = str(err["msg"])
    if err["type"] == "extra_forbidden":
        message = "unknown field"
    elif err["type"] == "missing":
        message = "required field missing"
    return InvalidInput(field, message)


MAX_YAML_BYTES = 1_000_000
MAX_YAML_DEPTH = 64


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader without aliases and with bounded nesting.

    An alias expands to a reference to another node, so a few hundred bytes of nested
    aliases ("billion laughs") become billions of values; no catalog entry or proposal
    needs one. Deep nesting would exhaust the stack instead.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed", event.start_mark
            )
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                event = self.peek_event()
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml_text(raw: bytes, source: str) -> Any:
    """Parse YAML or JSON bytes; non-UTF-8, oversized, aliased, too deep and malformed
    documents are InvalidInput."""
    if len(raw) > MAX_YAML_BYTES:
        raise InvalidInput(source, f"larger than {MAX_YAML_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(source, f"not UTF-8 (byte {exc.start})") from exc
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed YAML/JSON"
        raise InvalidInput(source, f"{problem}{where}") from exc


def step_placeholders(step: Step | None) -> set[str]:
    if step is None:
        return set()
    parts: list[str] = list(step.argv or ()) + list((step.env or {}).values())
    if step.http is not None:
        parts.append(step.http.url)
        parts.append(repr(step.http.body))
    return {m for part in parts for m in PLACEHOLDER.findall(part)}


def _check_placeholders(action: ActionType, source: str) -> None:
    secret = {name for name, spec in action.params.items() if spec.secret}
    for label, step in (("capture", action.capture), ("run", action.run), ("undo", action.undo)):
        argv = step.argv if step is not None else None
        in_argv = {m for part in (argv or ()) for m in PLACEHOLDER.findall(part)} & secret
        if in_argv:
            raise InvalidInput(
                f"{source}: {label}.argv",
                f"secret param {{{sorted(in_argv)[0]}}} may not be in argv, where `ps` shows "
                "it to every user; pass it in env",
            )
    known = set(action.params) | BUILTINPLACEHOLDERS
    for label, step in (("capture", action.capture), ("run", action.run)):
        unknown = step_placeholders(step) - known
        if unknown:
            raise InvalidInput(
                f"{source}: {label}", f"unknown placeholder {{{sorted(unknown)[0]}}}"
            )
    captured = {action.capture.as_} if action.capture and action.capture.as_ else set()
    unknown = step_placeholders(action.undo) - known - captured
    if unknown:
        raise InvalidInput(f"{source}: undo", f"unknown placeholder {{{sorted(unknown)[0]}}}")


def parse_action_type(document: Any, source: str) -> ActionType:
    if not isinstance(document, dict):
        raise InvalidInput(source, "expected a mapping at the top level")
    try:
        action = ActionType.model_validate(document)
    except ValidationError as exc:
        raise first_error(exc, source) from exc
    _check_placeholders(action, source)
    return action


@dataclass(frozen=True)
class Catalog:
    """The action types that may be proposed, by name."""

    types: Mapping[str, ActionType]
    revision: str
    directory: Path | None = None
    # Verifications that cannot be met as written (opsgate.verification.lint).
    warnings: tuple[Finding, ...] = field(default=())

    def get(self, name: str) -> ActionType:
        try:
            return self.types[name]
        except KeyError:
            known = ", ".join(sorted(self.types)) or "none"
            hint = did_you_mean(name, self.types)
            raise InvalidInput(
                "action", f"unknown action type {name!r}{hint} (known: {known})"
            ) from None

    def __iter__(self) -> Any:
        return iter(sorted(self.types.values(), key=lambda t: t.name))

    def __len__(self) -> int:
        return len(self.types)


def catalog_files(directory: Path) -> list[Path]:
    """The files a catalog is loaded from, in the order their bytes are hashed."""
    return sorted(p for p in directory.iterdir() if p.suffix in {".yaml", ".yml"})


def load_catalog(
    directory: Path,
    *,
    strict: bool = False,
    scrape_interval: float | None = None,
) -> Catalog:
    """Load every *.yaml / *.yml under `directory`; a broken file names file and field.

    Each verification is linted with `scrape_interval` (default: Prometheus's own 60s
    default): findings are kept as `warnings`, or refuse the file when `strict`."""
    interval = PROMETHEUS_DEFAULT_SCRAPE_INTERVAL if scrape_interval is None else scrape_interval
    warnings: list[Finding] = []
    if not directory.is_dir():
        raise InvalidInput("catalog", f"{directory} is not a directory (set OPSGATE_CATALOG)")
    types: dict[str, ActionType] = {}
    digest = hashlib.sha256()
    for path in catalog_files(directory):
        raw = path.read_bytes()
        digest.update(path.name.encode() + b"\0" + raw + b"\0")
        action = parse_action_type(load_yaml_text(raw, str(path)), str(path))
        if action.name in types:
            raise InvalidInput(str(path), f"action type {action.name!r} is defined twice")
        findings = lint_action_type(action, scrape_interval=interval)
        if strict and findings:
            raise InvalidInput(f"{path}: {findings[0].field}", findings[0].message)
        warnings.extend(findings)
        types[action.name] = action
    return Catalog(
        types=types,
        revision="sha256:" + digest.hexdigest(),
        directory=directory,
        warnings=tuple(warnings),
    )


def param_json_schema(spec: ParamSpec) -> dict[str, Any]:
    """The JSON-schema view of a parameter, for `catalog show` and agents."""
    schema: dict[str, Any] = {"type": spec.type}
    for key in ("pattern", "minimum", "maximum", "enum", "default", "description"):
        if key == "default" and spec.secret:
            continue  # a secret default is a secret: `catalog show` and agents never see it
        value = getattr(spec, key)
        if value not in (None, ""):
            if key in ("minimum", "maximum") and spec.type == "integer":
                value = int(value)
            schema[key] = list(value) if key == "enum" else value
    if spec.type == "string":
        if spec.min_length is not None:
            schema["minLength"] = spec.min_length
        if spec.max_length is not None:
            schema["maxLength"] = spec.max_length
    if spec.secret:
        # The standard JSON-Schema annotation (draft 7+) for a value that is sent but
        # never read back: opsgate masks it everywhere it shows it. The catalog's own
        # `secret: true` stays an input keyword; published schemas are standard.
        schema["writeOnly"] = True
    return schema


def action_type_json(action_type: ActionType) -> dict[str, Any]:
    """An action type as agents and API clients see it: parameters as JSON schema."""
    required = [
        name for name, spec in action_type.params.items() if spec.required and spec.default is None
    ]
    return {
        "name": action_type.name,
        "description": action_type.description,
        "risk": action_type.risk,
        "reversible": action_type.reversible,
        "preconditions": list(action_type.preconditions),
        "params": {
            "type": "object",
            "properties": {k: param_json_schema(v) for k, v in action_type.params.items()},
            "required": required,
            "additionalProperties": False,
        },
        "verification": action_type.verification.model_dump(
            mode="json", by_alias=True, exclude_none=True
        ),
    }
