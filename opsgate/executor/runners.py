"""Runners: how a step is carried out. `shell` (an argv, never a shell string), `http`,
and third-party runners from the `opsgate.runners` entry-point group."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, quote_plus

import requests

from opsgate.models import Step
from opsgate.shared import PLACEHOLDER

OUTPUT_CAP = 64 * 1024


class StepError(Exception):
    """A step could not even be started (bad template, unknown runner)."""


@dataclass(frozen=True)
class StepResult:
    ok: bool
    exit_code: int | None
    output: str
    value: str | None = None
    error: str | None = None
    duration: float = 0.0


class Runner(Protocol):
    name: str

    def run(
        self,
        step: Step,
        values: Mapping[str, Any],
        *,
        secrets: Collection[str] = (),
        cancel: threading.Event | None = None,
    ) -> StepResult:
        """Carry out one step; never raises for a failure of the step itself."""


def text_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render_text(template: str, values: Mapping[str, Any], *, where: str) -> str:
    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise StepError(f"{where}: no value for placeholder {{{name}}}")
        return text_value(values[name])

    return PLACEHOLDER.sub(substitute, template)


def render_argv(argv: tuple[str, ...], values: Mapping[str, Any]) -> list[str]:
    """Each element stays one argument; a value that would start an element with `-`
    is refused, so a parameter can never become an option of the program."""
    rendered = []
    for index, element in enumerate(argv):
        first = PLACEHOLDER.match(element)
        if first and index > 0 and text_value(values.get(first.group(1), "")).startswith("-"):
            raise StepError(f"argv[{index}]: {{{first.group(1)}}} may not start with '-'")
        rendered.append(render_text(element, values, where=f"argv[{index}]"))
    return rendered


def secret_forms(secret: str) -> list[str]:
    """The ways a secret shows up in an error or a response body: as is, URL-encoded
    (path and form style), base64 (standard and URL-safe, padded or not), JSON-escaped."""
    raw = secret.encode("utf-8")
    forms = {
        secret,
        quote(secret, safe=""),
        quote(secret),
        quote_plus(secret),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
    }
    for encoded in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        text = encoded.decode("ascii")
        forms.update({text, text.rstrip("=")})
    # Longest first, so a form is masked whole before a shorter one inside it.
    return sorted((f for f in forms if len(f) >= 3 or f == secret), key=len, reverse=True)


def mask(text: str, secrets: Collection[str]) -> str:
    for secret in secrets:
        if secret:
            for form in secret_forms(secret):
                text = text.replace(form, "***")
    return text


def cap(text: str) -> str:
    if len(text) <= OUTPUT_CAP:
        return text
    return text[:OUTPUT_CAP] + f"\n... ({len(text) - OUTPUT_CAP} more characters cut)"


STEP_GUARD = Path(__file__).with_name("stepguard.py")


def step_environment(worker: Mapping[str, str]) -> dict[str, str]:
    """The worker's environment minus opsgate's own settings: those hold the database
    URL (and its password), the Prometheus and OPA tokens and the audit key's path,
    which only the worker tier may hold, never a step a catalog author wrote."""
    return {k: v for k, v in worker.items() if not k.startswith("OPSGATE_")}


def guarded_argv(program: str, argv: list[str]) -> list[str]:
    """The step under `stepguard.py`, which takes its process group down with it when
    this worker dies. `-I -S`: no user site, no environment, a fast start."""
    return [sys.executable, "-I", "-S", str(STEP_GUARD), str(os.getpid()), program, "--", *argv]


class ShellRunner:
    """Runs an argv with no shell, in its own process group, with a hard timeout; the
    group dies with this worker (see stepguard.py)."""

    name = "shell"

    def run(
        self,
        step: Step,
        values: Mapping[str, Any],
        *,
        secrets: Collection[str] = (),
        cancel: threading.Event | None = None,
    ) -> StepResult:
        if not step.argv:
            raise StepError("the shell runner needs argv")
        argv = render_argv(step.argv, values)
        env = step_environment(os.environ)
        for name, template in (step.env or {}).items():
            env[name] = render_text(template, values, where=f"env.{name}")
        started = time.monotonic()
        program = shutil.which(argv[0])
        if program is None:
            return StepResult(
                False, None, "", error=f"cannot start {argv[0]}: not found or not executable"
            )
        try:
            process = subprocess.Popen(
                guarded_argv(program, argv),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            return StepResult(False, None, "", error=f"cannot start {argv[0]}: {exc.strerror}")
        deadline = started + step.timeout
        reason: str | None = None
        while True:
            try:
                stdout, stderr = process.communicate(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    reason = f"timed out after {step.timeout:g}s"
                elif cancel is not None and cancel.is_set():
                    reason = "cancelled"
                if reason:
                    _kill_group(process)
                    stdout, stderr = process.communicate()
                    break
        duration = time.monotonic() - started
        out = stdout.decode("utf-8", "replace")
        err = stderr.decode("utf-8", "replace")
        output = cap(mask(out + (f"\n[stderr]\n{err}" if err.strip() else ""), secrets))
        code = process.returncode
        if reason is not None:
            return StepResult(False, code, output, error=reason, duration=duration)
        ok = code == 0
        return StepResult(
            ok,
            code,
            output,
            value=mask(out.strip(), secrets) if ok else None,
            error=None if ok else f"exit code {code}",
            duration=duration,
        )


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()


def render_body(template: Any, values: Mapping[str, Any]) -> Any:
    """A JSON template: a string that is exactly `{name}` takes the value with its type."""
    if isinstance(template, str):
        whole = PLACEHOLDER.fullmatch(template)
        if whole and whole.group(1) in values:
            return values[whole.group(1)]
        return render_text(template, values, where="body")
    if isinstance(template, dict):
        return {k: render_body(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [render_body(v, values) for v in template]
    return template


def render_url(template: str, values: Mapping[str, Any]) -> str:
    """A placeholder that starts the URL is the base (checked by its pattern); any
    other is percent-encoded, so a value cannot add path segments or a query."""

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise StepError(f"url: no value for placeholder {{{name}}}")
        text = text_value(values[name])
        return text if match.start() == 0 else quote(text, safe="")

    return PLACEHOLDER.sub(substitute, template)


class HttpRunner:
    name = "http"

    def __init__(self, session: requests.Session | None = None) -> None:
        self.session = session or requests.Session()

    def run(
        self,
        step: Step,
        values: Mapping[str, Any],
        *,
        secrets: Collection[str] = (),
        cancel: threading.Event | None = None,
    ) -> StepResult:
        if step.http is None:
            raise StepError("the http runner needs http")
        spec = step.http
        url = render_url(spec.url, values)
        body = render_body(spec.body, values) if spec.body is not None else None
        started = time.monotonic()
        try:
            response = self.session.request(
                spec.method, url, json=body, timeout=step.timeout, allow_redirects=False
            )
        except requests.RequestException as exc:
            return StepResult(
                False,
                None,
                "",
                error=mask(f"{type(exc).__name__}: {exc}", secrets),
                duration=time.monotonic() - started,
            )
        duration = time.monotonic() - started
        text = cap(mask(response.text, secrets))
        ok = response.status_code in spec.expect_status
        value: str | None = None
        if ok:
            value = response.text.strip()
            if spec.extract is not None:
                try:
                    document = response.json()
                    field = document[spec.extract]
                    # JSON text, so a capture typed `boolean` or `json` reads it back
                    value = field if isinstance(field, str) else json.dumps(field)
                except (ValueError, KeyError, TypeError):
                    return StepResult(
                        False,
                        response.status_code,
                        text,
                        error=f"response has no JSON field {spec.extract!r}",
                        duration=duration,
                    )
            value = mask(value, secrets)
        return StepResult(
            ok,
            response.status_code,
            f"HTTP {response.status_code}\n{text}",
            value=value,
            error=None if ok else f"HTTP {response.status_code}, expected {spec.expect_status}",
            duration=duration,
        )


class RunnerRegistry:
    """Built-in runners plus those registered under the `opsgate.runners` entry points."""

    def __init__(self, runners: Mapping[str, Runner] | None = None) -> None:
        self._runners: dict[str, Runner] = {"shell": ShellRunner(), "http": HttpRunner()}
        for ep in entry_points(group="opsgate.runners"):
            self._runners.setdefault(ep.name, _LazyRunner(ep.name, ep.load))
        self._runners.update(runners or {})

    def for_step(self, step: Step) -> Runner:
        name = "http" if step.http is not None and step.runner == "shell" else step.runner
        try:
            return self._runners[name]
        except KeyError:
            raise StepError(f"no runner named {name!r} is installed") from None

    def run(
        self,
        step: Step,
        values: Mapping[str, Any],
        *,
        secrets: Collection[str] = (),
        cancel: threading.Event | None = None,
    ) -> StepResult:
        """Run a step; a step that cannot start is a failed result, never an exception."""
        try:
            return self.for_step(step).run(step, values, secrets=secrets, cancel=cancel)
        except StepError as exc:
            return StepResult(False, None, "", error=str(exc))
        except Exception as exc:  # a third-party runner's bug is a failed step, not a crash
            return StepResult(False, None, "", error=f"runner error: {type(exc).__name__}: {exc}")


class _LazyRunner:
    def __init__(self, name: str, load: Any) -> None:
        self.name = name
        self._load = load
        self._runner: Runner | None = None

    def run(
        self,
        step: Step,
        values: Mapping[str, Any],
        *,
        secrets: Collection[str] = (),
        cancel: threading.Event | None = None,
    ) -> StepResult:
        if self._runner is None:
            loaded = self._load()
            self._runner = loaded() if isinstance(loaded, type) else loaded
        return self._runner.run(step, values, secrets=secrets, cancel=cancel)


_INTEGER = re.compile(r"^[+-]?[0-9]+$")


def typed_capture(text: str, kind: str | None) -> Any:
    """A captured value read as the type its capture declares, so `undo` puts back what
    was there (a JSON boolean, not the string "false"). ValueError names the problem."""
    value = text.strip()
    if kind is None or kind == "string":
        return value
    if kind == "integer":
        if not _INTEGER.match(value):
            raise ValueError(f"captured value {value[:40]!r} is not an integer")
        return int(value)
    if kind == "number":
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"captured value {value[:40]!r} is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"captured value {value[:40]!r} is not a finite number")
        return number
    if kind == "boolean":
        lowered = value.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        raise ValueError(f"captured value {value[:40]!r} is not true or false")
    if kind == "json":
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError(f"captured value {value[:40]!r} is not JSON") from None
    raise ValueError(f"unknown capture type {kind!r}")
