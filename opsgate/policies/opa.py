"""The OPA server engine: decisions from an Open Policy Agent over its REST API.

Built on opa-python-client. Two modes:

- ``push``: opsgate uploads the bundle's policies (Policy API, one module per ``.rego``
  file, ids ``opsgate/<path>``) and data (Data API, one ``PUT /v1/data/<key>`` per
  top-level key, never the data root: a root PUT would wipe every other document in
  that OPA) at start and whenever the files change. A marker document
  ``data.opsgate_push`` records the revision, module ids and data keys pushed, so a
  later push (even by a restarted process) removes modules and keys the bundle no
  longer has. The revision is ``bundle_revision(policies)`` of what was pushed.
- ``external``: OPA is fed by its own bundle service; opsgate only queries, and the
  revision is what OPA reports as query provenance.

Every query asks for strict built-in errors, like the embedded engine: OPA's default
makes an erroring built-in inside a ``deny contains ...`` rule undefined, i.e. allow.
Any error, timeout, non-2xx, undefined or malformed result is a deny with
``policy_engine_unavailable``; ``failures`` counts them. ``evaluate`` never raises.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import requests
from opa_client import OpaClient
from opa_client.errors import (
    DeleteDataError,
    DeletePolicyError,
    PolicyNotFoundError,
    RegoParseError,
)

from opsgate.errors import ConfigError
from opsgate.policies.engine import (
    DECISION_RULE,
    UNAVAILABLE,
    PolicyResult,
    bundle_files,
    bundle_revision,
    interpret,
    load_bundle_data,
    unavailable,
)
from opsgate.shared import files_signature, one_line
from opsgate.tls import pin_ca

# How often the bundle's files are checked for changes (stat only), as in the embedded engine.
RELOAD_CHECK_SECONDS = 1.0
# Policy ids opsgate owns in OPA; only ids with this prefix are ever deleted.
MODULE_PREFIX = "opsgate/"
# The data document that records what the last push uploaded.
MARKER_KEY = "opsgate_push"
EXTERNAL_UNKNOWN = "external:unknown"
MODES = ("push", "external")
# A complete, well-formed input for probes (doctor, revision): every field present, so a
# policy that reads input defensively still yields a defined decision.
PROBE_INPUT: dict[str, Any] = {
    "action": {
        "type": "opsgate_probe",
        "target": "opsgate-probe",
        "environment": "opsgate-probe",
        "params": {},
        "risk": "low",
        "reversible": True,
        "spec_hash": "sha256:probe",
        "reason": "opsgate doctor probe",
    },
    "proposer": {"id": "opsgate-probe", "kind": "human"},
    "incident": {"id": "PROBE", "severity": "sev3", "class": "probe", "tier": "internal"},
    "verification": {"defined": True, "signals": 1, "stop_conditions": 1},
    "preconditions": [],
    "context": {
        "now": "2026-01-01T00:00:00.000000+00:00",
        "now_ns": 1767225600000000000,
        "phase": "propose",
        "active_on_target": 0,
    },
}


@dataclass(frozen=True)
class _Pushed:
    """What the last push left in OPA (push mode); `error` set means fail closed."""

    revision: str = ""
    signature: tuple[tuple[str, int, int], ...] = ()
    error: str | None = None
    modules: frozenset[str] = frozenset()
    data_keys: frozenset[str] = frozenset()
    at: str = ""


@dataclass(frozen=True)
class _Answer:
    """One query's outcome: the decoded response body, or why there is none."""

    body: Mapping[str, Any] | None
    error: str | None = None


@dataclass
class _Target:
    """Where OPA is, parsed once from OPSGATE_OPA_URL."""

    url: str
    host: str
    port: int
    https: bool
    prefix: str = ""


def _parse_url(url: str) -> _Target:
    """Validate OPSGATE_OPA_URL; a malformed URL is a config error, not a runtime deny."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"OPSGATE_OPA_URL: {exc}") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(
            "OPSGATE_OPA_URL: expected http(s)://host[:port], e.g. http://127.0.0.1:8181"
        )
    if parts.username or parts.password:
        raise ConfigError("OPSGATE_OPA_URL: put credentials in OPSGATE_OPA_TOKEN, not in the URL")
    if parts.query or parts.fragment:
        raise ConfigError("OPSGATE_OPA_URL: no query or fragment, just scheme://host[:port][/path]")
    https = parts.scheme == "https"
    host = parts.hostname
    # The client formats `{host}:{port}`: an IPv6 literal needs its brackets back.
    if ":" in host:
        host = f"[{host}]"
    return _Target(
        url=f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}",
        host=host,
        port=port if port is not None else (443 if https else 80),
        https=https,
        prefix=parts.path.strip("/"),
    )


def _response_error(response: requests.Response | None) -> str:
    """OPA's error body (`code: message`) or the HTTP status, on one line."""
    if response is None:
        return "no response"
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, Mapping) and (body.get("code") or body.get("message")):
        details = [
            str(e.get("message"))
            for e in body.get("errors") or []
            if isinstance(e, Mapping) and e.get("message")
        ]
        text = f"{body.get('code', '')}: {body.get('message', '')}"
        if details:
            text += " (" + "; ".join(details[:3]) + ")"
        return one_line(text)
    return one_line(f"HTTP {response.status_code} {response.text[:200]}")


def _exception_text(exc: BaseException) -> str:
    """A short reason: requests' connection errors nest the useful part deep inside."""
    if isinstance(exc, requests.HTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return f"HTTP {status}: {_response_error(exc.response)}"
    if isinstance(exc, RegoParseError):
        return one_line(f"{exc.expression}: {exc}")
    message = getattr(exc, "message", None)
    if isinstance(message, str):  # opa_client's other errors: (expression, message)
        return one_line(f"{getattr(exc, 'expression', '')}: {message}")
    text = str(exc)
    errno = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if errno:
        return f"{type(exc).__name__}: {errno.group(1).strip()}"
    return one_line(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def _provenance_revision(body: Mapping[str, Any]) -> str | None:
    """The bundle revision(s) OPA reports with `?provenance`, or None when it has none."""
    provenance = body.get("provenance")
    if not isinstance(provenance, Mapping):
        return None
    bundles = provenance.get("bundles")
    if isinstance(bundles, Mapping):
        revisions = {
            str(name): info["revision"]
            for name, info in bundles.items()
            if isinstance(info, Mapping)
            and isinstance(info.get("revision"), str)
            and info["revision"]
        }
        if revisions:
            return ",".join(f"{name}:{rev}" for name, rev in sorted(revisions.items()))
    # OPA reports a single legacy-configured bundle as a top-level `revision`.
    legacy = provenance.get("revision")
    if isinstance(legacy, str) and legacy:
        return legacy
    return None


class OpaEngine:
    """Evaluates the opsgate rules on an OPA server; fails closed on anything unexpected.

    Each thread gets its own OpaClient (its own requests session), as the embedded engine
    gives each thread its own interpreter.
    """

    name = "opa"

    def __init__(
        self,
        url: str,
        *,
        mode: str = "push",
        policies: Path | None = None,
        token: str | None = None,
        ca_file: str | None = None,
        timeout: float = 2.0,
    ) -> None:
        self._target = _parse_url(url)
        if mode not in MODES:
            raise ConfigError("OPSGATE_OPA_MODE: expected push or external")
        if mode == "push" and policies is None:
            raise ConfigError("OPSGATE_OPA_MODE=push needs a policy bundle (OPSGATE_POLICIES)")
        if timeout <= 0:
            raise ConfigError("OPSGATE_OPA_TIMEOUT: must be positive")
        if ca_file is not None and not Path(ca_file).is_file():
            raise ConfigError(f"OPSGATE_OPA_CA_FILE: {ca_file} is not a file")
        if ca_file is not None and not self._target.https:
            raise ConfigError("OPSGATE_OPA_CA_FILE is set but OPSGATE_OPA_URL is not https")
        self.url = self._target.url
        self.mode = mode
        self.policies = policies
        self.timeout = float(timeout)
        self._token = token or None
        self._ca_file = ca_file
        self._local = threading.local()
        self._clients: list[tuple[threading.Thread, Any]] = []
        self._clients_lock = threading.Lock()
        # Metrics read these: every deny with policy_engine_unavailable is a failure.
        self.evaluations = 0
        self.failures = 0
        self.last_error: str | None = None
        self.pushes = 0
        self.push_failures = 0
        self._counter_lock = threading.Lock()
        # Push state. `_seq` is odd while a push is uploading, so a query that overlapped a
        # push is asked again rather than stored with a revision it may not have used.
        self._lock = threading.Lock()
        self._seq = 0
        self._stale = False
        self._pushed = _Pushed()
        self._external_revision = EXTERNAL_UNKNOWN
        self._external_checked = float("-inf")
        self.opa_version: str | None = None
        if mode == "push":
            with self._lock:
                self._pushed = self._push()
        self._checked_at = time.monotonic()

    # --- HTTP clients ------------------------------------------------------------------

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = OpaClient(
                host=self._target.host,
                port=self._target.port,
                version=f"{self._target.prefix}/v1" if self._target.prefix else "v1",
                ssl=self._target.https,
                token=self._token,
                # One attempt per query: the timeout bounds a decision, and a retry of a
                # failed decision is the caller's business (it fails closed meanwhile).
                retries=0,
                timeout=self.timeout,
            )
            if self._ca_file is not None:
                # OpaClient's `ssl` is a bool (verify against the system CAs). Setting
                # `session.verify` is not enough either: requests lets REQUESTS_CA_BUNDLE and
                # CURL_CA_BUNDLE override it. An adapter pins the CA file for every request.
                pin_ca(_session(client), self._ca_file)
            self._local.client = client
            with self._clients_lock:
                # Threads come and go (a server may use one per request): close the sessions
                # of finished threads, or their pooled connections would pile up.
                finished = [c for t, c in self._clients if not t.is_alive()]
                self._clients = [(t, c) for t, c in self._clients if t.is_alive()]
                self._clients.append((threading.current_thread(), client))
            for old in finished:
                old.close_connection()
        return client

    def close(self) -> None:
        """Close every thread's HTTP session."""
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for _thread, client in clients:
            client.close_connection()
        self._local = threading.local()

    def __enter__(self) -> OpaEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- push mode -----------------------------------------------------------------------

    def _current(self) -> _Pushed:
        now = time.monotonic()
        if self.mode == "push" and now - self._checked_at >= RELOAD_CHECK_SECONDS:
            with self._lock:
                if now - self._checked_at >= RELOAD_CHECK_SECONDS:
                    self._checked_at = now
                    assert self.policies is not None
                    try:
                        changed = (
                            files_signature(bundle_files(self.policies)) != self._pushed.signature
                        )
                    except OSError:
                        changed = True
                    # A failed push is retried on every check; so is a push OPA has lost
                    # (a restarted OPA answers undefined).
                    if changed or self._pushed.error is not None or self._stale:
                        self._pushed = self._push()
        return self._pushed

    def reload(self) -> None:
        """Push the bundle now (push mode) or re-read OPA's revision (external mode)."""
        if self.mode == "push":
            with self._lock:
                self._pushed = self._push()
                self._checked_at = time.monotonic()
        else:
            self._external_checked = float("-inf")
            self.revision()

    def _push(self) -> _Pushed:
        """Upload the bundle; the caller holds `_lock`. Never raises."""
        assert self.policies is not None
        self._seq += 1
        try:
            pushed = self._upload(self.policies)
        except Exception as exc:  # any failure means "not pushed": fail closed, retry later
            reason = f"push to OPA at {self.url} failed: {_exception_text(exc)}"
            with self._counter_lock:
                self.push_failures += 1
                self.last_error = reason
            # Keep what OPA last held on record, so the next push can clean it up.
            previous = self._pushed
            return _Pushed(
                revision=previous.revision,
                signature=(),
                error=reason,
                modules=previous.modules,
                data_keys=previous.data_keys,
            )
        finally:
            self._seq += 1
        self._stale = False
        with self._counter_lock:
            self.pushes += 1
        return pushed

    def _read_bundle(
        self, directory: Path
    ) -> tuple[str, tuple[tuple[str, int, int], ...], dict[str, str], dict[str, Any]]:
        """(revision, signature, modules by id, data) read consistently: retried if it changed."""
        if not directory.is_dir():
            raise FileNotFoundError(f"policy bundle {directory} is not a directory")
        for _ in range(3):
            signature = files_signature(bundle_files(directory))
            revision = bundle_revision(directory)
            # read_bytes, not read_text: newline translation would upload other bytes than
            # the revision hashes.
            modules = {
                MODULE_PREFIX + path.relative_to(directory).as_posix(): path.read_bytes().decode()
                for path in bundle_files(directory)
                if path.suffix == ".rego"
            }
            data = load_bundle_data(directory)
            # The revision must name exactly the bytes uploaded: re-read if a file moved.
            if bundle_revision(directory) == revision:
                return revision, signature, modules, data
        raise RuntimeError(f"{directory} kept changing while it was read; will retry")

    def _upload(self, directory: Path) -> _Pushed:
        revision, signature, modules, data = self._read_bundle(directory)
        if not modules:
            raise ValueError(f"{directory} has no .rego policy files")
        if MARKER_KEY in data:
            raise ValueError(f"data key {MARKER_KEY!r} is reserved for opsgate's push record")
        client = self._client()
        previous_modules, previous_keys = self._previous_push(client)

        # Data first, one top-level key at a time: the bundle owns those keys, nothing else.
        for key, value in sorted(data.items()):
            self._put_data(client, key, value)
        try:
            self._put_modules(client, modules)
        except RegoParseError:
            # A module can fail to compile only against the old set (a rule moved between
            # files): remove what opsgate pushed before, then upload the bundle once more.
            for module_id in sorted(previous_modules | set(modules)):
                self._delete_module(client, module_id)
            self._put_modules(client, modules)
        for module_id in sorted(previous_modules - set(modules)):
            self._delete_module(client, module_id)
        for key in sorted(previous_keys - set(data)):
            self._delete_data(client, key)

        at = datetime.now(UTC).isoformat(timespec="seconds")
        # The record goes last: it names a revision only once all of it is in OPA.
        self._put_data(
            client,
            MARKER_KEY,
            {
                "revision": revision,
                "modules": sorted(modules),
                "data_keys": sorted(data),
                "pushed_at": at,
            },
        )
        return _Pushed(
            revision=revision,
            signature=signature,
            modules=frozenset(modules),
            data_keys=frozenset(data),
            at=at,
        )

    def _previous_push(self, client: Any) -> tuple[set[str], set[str]]:
        """Module ids and data keys opsgate pushed before: this process's and OPA's record."""
        modules = set(self._pushed.modules)
        keys = set(self._pushed.data_keys)
        try:
            record = client.get_data(MARKER_KEY).get("result")
        except PolicyNotFoundError:
            record = None  # a fresh OPA: nothing pushed yet
        if isinstance(record, Mapping):
            modules |= {
                m
                for m in record.get("modules") or []
                if isinstance(m, str) and m.startswith(MODULE_PREFIX)
            }
            keys |= {k for k in record.get("data_keys") or [] if isinstance(k, str)}
        keys.discard(MARKER_KEY)
        return modules, keys

    def _put_modules(self, client: Any, modules: Mapping[str, str]) -> None:
        # OPA compiles each PUT against the modules it already holds, so a module that uses
        # a rule from a file not pushed yet is rejected: push in passes, each retrying the
        # rejected ones, until a pass makes no progress (then the last rejection stands).
        pending = sorted(modules.items())
        while pending:
            rejected: list[tuple[str, str]] = []
            error: RegoParseError | None = None
            for module_id, source in pending:
                try:
                    # rego_compat=False: on a rejection the client would otherwise rewrite
                    # v0 syntax and upload bytes the revision hash does not cover.
                    client.update_policy_from_string(
                        source, quote(module_id, safe="/"), rego_compat=False
                    )
                except RegoParseError as exc:
                    rejected.append((module_id, source))
                    error = exc
            if error is not None and len(rejected) == len(pending):
                raise error
            pending = rejected

    def _put_data(self, client: Any, key: str, value: Any) -> None:
        endpoint = quote(key, safe="")
        if isinstance(value, dict):
            client.update_or_create_data(value, endpoint)
            return
        # update_or_create_data refuses anything but an object (TypeException), yet the Data
        # API takes any JSON document (freeze_windows is a list): PUT it on the same session.
        response = _session(client).put(
            f"{client.root_url}/data/{endpoint}", json=value, timeout=self.timeout
        )
        if response.status_code != 204:
            raise RuntimeError(f"PUT /v1/data/{key}: {_response_error(response)}")

    def _delete_module(self, client: Any, module_id: str) -> None:
        try:
            client.delete_policy(quote(module_id, safe="/"))
        except DeletePolicyError as exc:
            if exc.expression != "resource_not_found":
                raise

    def _delete_data(self, client: Any, key: str) -> None:
        try:
            client.delete_data(quote(key, safe=""))
        except DeleteDataError as exc:
            if exc.expression != "resource_not_found":
                raise

    # --- queries ---------------------------------------------------------------------------

    def _ask(self, rule: str, input: Mapping[str, Any], *, provenance: bool) -> _Answer:
        """POST /v1/data/<rule> with strict built-in errors; never raises."""
        params = {"strict-builtin-errors": "true"}
        if provenance:
            params["provenance"] = "true"
        where = "data." + rule.replace("/", ".")
        try:
            body = self._client().query_rule(
                input_data=dict(input), package_path=rule, query_params=params
            )
        except requests.Timeout:
            return _Answer(
                None, f"OPA at {self.url} did not answer {where} within {self.timeout:g}s"
            )
        except requests.HTTPError as exc:
            return _Answer(None, f"OPA answered {_exception_text(exc)} for {where}")
        except (requests.RequestException, ValueError, TypeError) as exc:
            return _Answer(None, f"cannot query OPA at {self.url} ({_exception_text(exc)})")
        if not isinstance(body, Mapping):
            return _Answer(
                None, f"OPA answered {where} with a {type(body).__name__}, not an object"
            )
        reported = body.get("provenance")
        if isinstance(reported, Mapping) and isinstance(reported.get("version"), str):
            self.opa_version = reported["version"]
        if "result" not in body:
            return _Answer(
                body, f"{where} is undefined in OPA at {self.url} (is the policy loaded?)"
            )
        return _Answer(body)

    def evaluate(self, rule: str, input: Mapping[str, Any]) -> PolicyResult:
        """Ask OPA for `rule`; any failure is a deny with policy_engine_unavailable."""
        try:
            result = self._evaluate(rule, input)
        except Exception as exc:  # the contract is "never raise": a bug here must deny
            result = unavailable(f"unexpected {type(exc).__name__}: {exc}", "")
        with self._counter_lock:
            self.evaluations += 1
            if UNAVAILABLE in result.deny_codes:
                self.failures += 1
                self.last_error = result.error or next(
                    d["message"] for d in result.deny if d["code"] == UNAVAILABLE
                )
        return result

    def _evaluate(self, rule: str, input: Mapping[str, Any]) -> PolicyResult:
        if self.mode == "external":
            answer = self._ask(rule, input, provenance=True)
            revision = self._external_revision
            if answer.body is not None:
                revision = _provenance_revision(answer.body) or EXTERNAL_UNKNOWN
                self._external_revision = revision
                self._external_checked = time.monotonic()
            if answer.error is not None:
                return unavailable(answer.error, revision)
            assert answer.body is not None
            return interpret(answer.body["result"], revision)

        for _attempt in range(3):
            pushed = self._current()
            if pushed.error is not None:
                return unavailable(pushed.error, pushed.revision)
            seq = self._seq
            if seq % 2 == 0:
                answer = self._ask(rule, input, provenance=False)
                if self._seq == seq:
                    if answer.error is not None:
                        if answer.body is not None:
                            # Undefined although we pushed: OPA lost the bundle (restarted).
                            self._stale = True
                        return unavailable(answer.error, pushed.revision)
                    assert answer.body is not None
                    return interpret(answer.body["result"], pushed.revision)
            # A push overlapped this query: wait for it to finish and ask again.
            with self._lock:
                pass
        return unavailable("the bundle was being re-pushed during every attempt", "")

    def revision(self) -> str:
        """The bundle revision the next evaluation will use."""
        if self.mode == "push":
            return self._current().revision
        if time.monotonic() - self._external_checked >= RELOAD_CHECK_SECONDS:
            answer = self._ask(DECISION_RULE, PROBE_INPUT, provenance=True)
            if answer.body is not None:
                self._external_revision = _provenance_revision(answer.body) or EXTERNAL_UNKNOWN
                self._external_checked = time.monotonic()
        return self._external_revision

    # --- health --------------------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        """OPA's /health, the push state, and whether data.opsgate.decision is defined."""
        client = self._client()
        base = (
            f"{'https' if self._target.https else 'http'}://{self._target.host}:{self._target.port}"
        )
        health_url = f"{base}/{self._target.prefix}/health" if self._target.prefix else None
        # External mode: `?bundles` also requires OPA's bundles to be activated.
        query = {"bundles": "true"} if self.mode == "external" else None
        if not client.check_health(query=query, diagnostic_url=health_url):
            extra = " or its bundles are not activated" if self.mode == "external" else ""
            return False, f"OPA at {self.url} is unreachable or unhealthy{extra} (GET /health)"
        if self.mode == "push":
            pushed = self._current()
            if pushed.error is not None:
                return False, pushed.error
        answer = self._ask(DECISION_RULE, PROBE_INPUT, provenance=True)
        if answer.error is not None:
            return False, answer.error
        assert answer.body is not None
        if self.mode == "external":
            self._external_revision = _provenance_revision(answer.body) or EXTERNAL_UNKNOWN
            self._external_checked = time.monotonic()
        version = f"OPA {self.opa_version} " if self.opa_version else "OPA "
        return True, f"{version}at {self.url} is healthy and answers data.opsgate.decision"

    def describe(self) -> dict[str, Any]:
        """What doctor prints: mode, where, revision, push state and counters."""
        document: dict[str, Any] = {
            "engine": self.name,
            "mode": self.mode,
            "url": self.url,
            "timeout": self.timeout,
            "token": "set" if self._token else None,
            "ca_file": self._ca_file,
            "revision": self.revision(),
            "evaluations": self.evaluations,
            "failures": self.failures,
            "last_error": self.last_error,
        }
        if self.opa_version:
            document["opa_version"] = self.opa_version
        if self.mode == "push":
            pushed = self._pushed
            document.update(
                policies=str(self.policies),
                pushed_at=pushed.at or None,
                push_error=pushed.error,
                pushes=self.pushes,
                push_failures=self.push_failures,
            )
        return document


def _session(client: Any) -> requests.Session:
    """The requests session inside an OpaClient (for TLS `verify` and non-object data)."""
    session = getattr(client, "_session", None)
    if not isinstance(session, requests.Session):
        raise RuntimeError("this opa-python-client has no requests session (_session)")
    return session
