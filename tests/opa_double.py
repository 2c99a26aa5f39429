"""A test double of OPA's REST wire protocol, and the fixture helper that picks a real OPA.

`OpaDouble` is NOT Open Policy Agent. It is a small threaded HTTP server on 127.0.0.1 that
speaks the subset of OPA's v1 REST API the OPA engine uses. It evaluates with OPA's own
Go evaluator (`github.com/open-policy-agent/opa/v1/rego`, embedded in process by
opa-golib-python-bindings), so answers are OPA's, not regopy's:

    PUT/GET/DELETE /v1/policies/<id>    GET /v1/policies
    PUT/GET/DELETE /v1/data[/<path>]     POST /v1/data/<path>   (query with input)
    GET /health

Queries answer `{"result": ...}` or `{}` when undefined, add `provenance` on
`?provenance`, and honour `?strict-builtin-errors` (an erroring built-in is a 500, as in
OPA). The bindings always evaluate with strict built-in errors, so a query WITHOUT the
flag (which opsgate never sends) falls back to regopy in lax mode, where an erroring
built-in is undefined as in OPA. A policy PUT is compiled with every other module held,
as OPA does. Known gaps: no PATCH, no path conflict checks between data and rules.

Switches for fail-closed tests: `stop()`/`start()` (down, same port), `slow` (seconds to
sleep before answering a query), `fail_status` (every /v1 request answers this status),
`undefined` (queries answer `{}`), `force_result` (queries answer this result),
`healthy`, `bundles_activated`, `token` (require `Authorization: Bearer <token>`),
`bundles` / `legacy_revision` (what provenance reports, as for an OPA fed by bundles).

`opa_target()` yields a real OPA when one is available (OPSGATE_TEST_OPA_URL, or an `opa`
binary on PATH started on a free port) and this double otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import regopy
from opa_bindings import OpaEngine as GoOpa
from opa_bindings import OpaError, OpaUndefinedError

from opsgate.demo.processes import free_port

_UNSET: Any = object()
_PACKAGE = re.compile(r"^\s*package\s+([A-Za-z_][\w.]*)", re.MULTILINE)


def _interpreter(strict: bool) -> Any:
    interp = regopy.Interpreter()
    interp.strict_built_in_errors = strict
    interp.log_level = regopy.LogLevel.NONE  # rego-cpp would print errors to stdout
    return interp


def _flag(query: dict[str, list[str]], name: str) -> bool:
    """OPA's getBoolParam: present without a value, or any value equal to "true"."""
    values = query.get(name)
    if values is None:
        return False
    if values == [""]:
        return True
    return any(v.lower() == "true" for v in values)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    double: OpaDouble

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and hung up is expected here (the slow switch): stay quiet.
        return


class OpaDouble:
    """A test double of OPA's REST wire protocol (see the module docstring); not OPA."""

    def __init__(self, *, port: int = 0, tls: tuple[Path, Path] | None = None) -> None:
        self.port = port
        self.tls = tls
        self.policies: dict[str, str] = {}
        self.data: dict[str, Any] = {}
        self.requests: list[tuple[str, str]] = []
        # Switches.
        self.slow = 0.0
        self.fail_status: int | None = None
        self.undefined = False
        self.force_result: Any = _UNSET
        self.healthy = True
        self.bundles_activated = True
        self.token: str | None = None
        self.bundles: dict[str, str] | None = None
        self.legacy_revision: str | None = None
        self._lock = threading.Lock()
        self._version = 0
        self._bundles_cache: dict[tuple[int, str], Any] = {}
        self._go: tuple[int, GoOpa] | None = None
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> OpaDouble:
        """Listen on 127.0.0.1 (the same port again after `stop()`)."""
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.double = self
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self.tls[0]), str(self.tls[1]))
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._stopping.clear()
        self._server = server
        # A short poll interval: stop() (OPA down) takes effect without a half-second wait.
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening: OPA is down (connection refused). State is kept."""
        self._stopping.set()  # wakes handlers sleeping on the slow switch
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def reset(self) -> None:
        """Forget every policy and document, as a restarted OPA would."""
        with self._lock:
            self.policies.clear()
            self.data.clear()
            self._version += 1
            self._bundles_cache.clear()

    def __enter__(self) -> OpaDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def count(self, method: str, prefix: str) -> int:
        """How many requests with this method had a path starting with `prefix`."""
        return sum(1 for m, p in list(self.requests) if m == method and p.startswith(prefix))

    # --- the store -----------------------------------------------------------------------

    def put_policy(self, policy_id: str, source: str) -> tuple[int, Any]:
        with self._lock:
            modules = {**self.policies, policy_id: source}
            try:
                with GoOpa() as compiler:
                    for module_id, module in sorted(modules.items()):
                        compiler.add_policy(module_id, module)
                    compiler.eval_query("true")  # compiles every module, as OPA's PUT does
            except OpaError as exc:
                code = "rego_parse_error" if exc.code == "parse_error" else "rego_compile_error"
                return 400, {
                    "code": "invalid_parameter",
                    "message": "error(s) occurred while compiling module(s)",
                    "errors": [{"code": code, "message": exc.message[:500]}],
                }
            self.policies[policy_id] = source
            self._changed()
        return 200, {}

    def write_data(self, path: list[str], value: Any) -> tuple[int, Any]:
        with self._lock:
            if not path:
                if not isinstance(value, dict):
                    return 400, {"code": "invalid_parameter", "message": "root must be an object"}
                self.data = value
            else:
                node = self.data
                for part in path[:-1]:
                    child = node.setdefault(part, {})
                    if not isinstance(child, dict):
                        return 400, {"code": "invalid_parameter", "message": "path conflict"}
                    node = child
                node[path[-1]] = value
            self._changed()
        return 204, None

    def delete_data(self, path: list[str]) -> tuple[int, Any]:
        with self._lock:
            node: Any = self.data
            for part in path[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            if not path or not isinstance(node, dict) or path[-1] not in node:
                return 404, {
                    "code": "resource_not_found",
                    "message": f"storage_not_found_error: /{'/'.join(path)}: document missing",
                }
            del node[path[-1]]
            self._changed()
        return 204, None

    def _changed(self) -> None:
        self._version += 1
        self._bundles_cache.clear()

    def evaluate(self, path: list[str], input: Any, *, strict: bool) -> tuple[int, Any]:
        """(status, result-or-_UNSET): evaluates data.<path> like OPA's Data API."""
        if not strict:
            return self._evaluate_lax(path, input)
        with self._lock:
            if self._go is None or self._go[0] != self._version:
                if self._go is not None:
                    self._go[1].close()
                engine = GoOpa()
                engine.print_handler = lambda message, location: None
                try:
                    engine.add_data(self.data)
                    for policy_id, source in sorted(self.policies.items()):
                        engine.add_policy(policy_id, source)
                except OpaError as exc:
                    engine.close()
                    return 500, {"code": "internal_error", "message": exc.message[:500]}
                self._go = (self._version, engine)
            go = self._go[1]
            try:
                value = go.eval_document(".".join(path), None if input is _UNSET else input)
            except OpaUndefinedError:
                return 200, _UNSET
            except OpaError as exc:
                return 500, {"code": "internal_error", "message": exc.message[:500]}
        return 200, value

    def _evaluate_lax(self, path: list[str], input: Any) -> tuple[int, Any]:
        """Without strict built-in errors (regopy): an erroring built-in is undefined."""
        strict = False
        entrypoint = "/".join(path)
        with self._lock:
            key = (self._version, entrypoint)
            bundle = self._bundles_cache.get(key)
            if bundle is None:
                builder = _interpreter(True)
                try:
                    builder.add_data(self.data)
                    for policy_id, source in sorted(self.policies.items()):
                        builder.add_module(policy_id, source)
                    bundle = builder.build(None, [entrypoint])
                except (regopy.RegoError, RuntimeError) as exc:
                    return 500, {"code": "internal_error", "message": str(exc)[:500]}
                self._bundles_cache[key] = bundle
        interp = _interpreter(strict)
        if input is not _UNSET:
            interp.set_input(input)
        try:
            output = interp.query_bundle_entrypoint(bundle, entrypoint)
        except (regopy.RegoError, RuntimeError, ValueError) as exc:
            # rego-cpp can emit output that is not JSON (see the policy's header): an error.
            return 500, {"code": "internal_error", "message": f"evaluation failed: {exc}"}
        if not output.ok():
            return 500, {"code": "internal_error", "message": "eval_builtin_error or conflict"}
        text = str(output)
        if text.strip() == "undefined":
            return 200, _UNSET
        expressions = json.loads(text).get("expressions")
        if not isinstance(expressions, list) or len(expressions) != 1:
            return 200, _UNSET
        return 200, expressions[0]

    def provenance(self) -> dict[str, Any]:
        document: dict[str, Any] = {"version": "0.0.0-opa-double", "build_commit": "double"}
        if self.legacy_revision is not None:
            document["revision"] = self.legacy_revision
        elif self.bundles is not None:
            document["bundles"] = {name: {"revision": rev} for name, rev in self.bundles.items()}
        return document


class _Handler(BaseHTTPRequestHandler):
    """One request; HTTP/1.0, so every connection closes after its answer."""

    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return  # keep test output clean

    @property
    def double(self) -> OpaDouble:
        return self.server.double

    def _send(self, status: int, body: Any = None) -> None:
        payload = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if payload:
            self.wfile.write(payload)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        double = self.double
        parts = urlsplit(self.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        path = parts.path
        double.requests.append((method, self.path))
        if double.token is not None and (
            self.headers.get("Authorization") != f"Bearer {double.token}"
        ):
            self._send(401, {"code": "unauthorized", "message": "missing or invalid token"})
            return
        if path == "/health":
            if method != "GET":
                self._send(405, {"code": "method_not_allowed", "message": method})
            elif not double.healthy:
                self._send(500, {"error": "unable to perform evaluation"})
            elif _flag(query, "bundles") and not double.bundles_activated:
                self._send(500, {"error": "one or more bundles are not activated"})
            else:
                self._send(200, {})
            return
        if not path.startswith("/v1/"):
            self._send(404, {"code": "resource_not_found", "message": f"no route {path}"})
            return
        if double.fail_status is not None:
            self._send(double.fail_status, {"code": "internal_error", "message": "switched"})
            return
        if path == "/v1/policies" or path.startswith("/v1/policies/"):
            self._policies(method, unquote(path[len("/v1/policies/") :]))
        elif path == "/v1/data" or path.startswith("/v1/data/"):
            segments = [unquote(s) for s in path[len("/v1/data") :].split("/") if s]
            self._data(method, segments, query)
        else:
            self._send(404, {"code": "resource_not_found", "message": f"no route {path}"})

    def _policies(self, method: str, policy_id: str) -> None:
        double = self.double
        if method == "GET" and not policy_id:
            listing = [{"id": k, "raw": v} for k, v in sorted(double.policies.items())]
            self._send(200, {"result": listing})
            return
        missing = {
            "code": "resource_not_found",
            "message": f'storage_not_found_error: policy id "{policy_id}"',
        }
        if method == "PUT" and policy_id:
            self._send(*double.put_policy(policy_id, self._body().decode("utf-8")))
        elif method == "GET":
            if policy_id in double.policies:
                raw = double.policies[policy_id]
                self._send(200, {"result": {"id": policy_id, "raw": raw}})
            else:
                self._send(404, missing)
        elif method == "DELETE":
            with double._lock:
                found = double.policies.pop(policy_id, None) is not None
                if found:
                    double._changed()
            self._send(200, {}) if found else self._send(404, missing)
        else:
            self._send(405, {"code": "method_not_allowed", "message": method})

    def _data(self, method: str, segments: list[str], query: dict[str, list[str]]) -> None:
        double = self.double
        if method == "PUT":
            try:
                value = json.loads(self._body() or b"null")
            except ValueError as exc:
                self._send(400, {"code": "invalid_parameter", "message": str(exc)})
                return
            self._send(*double.write_data(segments, value))
        elif method == "DELETE":
            self._send(*double.delete_data(segments))
        elif method in {"GET", "POST"}:
            self._query(method, segments, query)
        else:
            self._send(405, {"code": "method_not_allowed", "message": f"{method} (double)"})

    def _query(self, method: str, segments: list[str], query: dict[str, list[str]]) -> None:
        double = self.double
        input: Any = _UNSET
        if method == "POST":
            try:
                request = json.loads(self._body() or b"{}")
            except ValueError as exc:
                self._send(400, {"code": "invalid_parameter", "message": str(exc)})
                return
            if isinstance(request, dict) and "input" in request:
                input = request["input"]
        if not segments:
            self._send(400, {"code": "invalid_parameter", "message": "the double needs a path"})
            return
        if double.slow > 0 and double._stopping.wait(double.slow):
            return  # stopped while sleeping
        if double.force_result is not _UNSET:
            status, result = 200, double.force_result
        elif double.undefined:
            status, result = 200, _UNSET
        else:
            status, result = double.evaluate(
                segments, input, strict=_flag(query, "strict-builtin-errors")
            )
        if status != 200:
            self._send(status, result)
            return
        body: dict[str, Any] = {}
        if result is not _UNSET:
            body["result"] = result
        if _flag(query, "provenance"):
            body["provenance"] = double.provenance()
        self._send(200, body)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")


# --- picking the OPA the tests run against ----------------------------------------------


@dataclass
class OpaTarget:
    """The OPA a test talks to; `double` is set only when it is the test double."""

    url: str
    kind: str  # "env" (OPSGATE_TEST_OPA_URL), "binary" (opa on PATH) or "double"
    double: OpaDouble | None = None


def _wait_healthy(url: str, deadline: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"opa at {url} did not become healthy")
        time.sleep(0.05)


@contextmanager
def opa_target() -> Iterator[OpaTarget]:
    """A real OPA if one is available (env URL, then `opa` on PATH), else the test double."""
    url = os.environ.get("OPSGATE_TEST_OPA_URL", "").strip()
    if url:
        yield OpaTarget(url.rstrip("/"), "env")
        return
    binary = shutil.which("opa")
    if binary:
        port = free_port()
        with tempfile.TemporaryFile() as log:
            process = subprocess.Popen(
                [binary, "run", "--server", "--addr", f"127.0.0.1:{port}", "--log-level", "error"],
                stdout=log,
                stderr=log,
            )
            try:
                address = f"http://127.0.0.1:{port}"
                _wait_healthy(address, time.monotonic() + 15)
                yield OpaTarget(address, "binary")
            finally:
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        return
    with OpaDouble() as double:
        yield OpaTarget(double.url, "double", double)
