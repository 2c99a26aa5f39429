"""The "checkout" demo service: steady synthetic traffic, Prometheus metrics, releases
and feature flags, on 127.0.0.1 only.

Run it on its own (the demo starts it this way, so `opsgate demo --keep` can leave it up)::

    python -m opsgate.demo.service --port 0 --port-file /tmp/checkout.port

HTTP API (JSON in, JSON out):

- `GET /metrics`: `http_requests_total{service,code}` and the
  `http_request_duration_seconds` histogram, plus the release and flag state.
- `GET /release`: the current version and the history. `POST /release`
  `{"version": "v2.5.0", "bad": true}` deploys a release (a bad one raises the error
  ratio and the latency). `POST /release/rollback` restores the previous good release.
  `PUT /release` `{"version": "v2.5.0"}` re-activates a version from the history.
- `GET /flags`, `GET /flags/<name>`, `PUT /flags/<name>` `{"enabled": true}` (a JSON
  boolean: `"false"` is refused, as a strict flag API would); flag `new-pricing` on
  makes errors spike.
- `GET /deployment`, `PUT /deployment` `{"replicas": 8}`; `POST /nodes/<node>/drain`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import signal
import sys
import threading
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BASE_ERROR_RATIO = 0.002  # a healthy service still fails now and then
GOOD_LATENCY = 0.045  # median seconds of a good release
BAD_LATENCY = 0.35  # median seconds of a bad release
BAD_RELEASE_ERROR_RATIO = 0.25
LATENCY_SPREAD = 0.35  # sigma of the log-normal latency
# What a flag adds to the error ratio when it is on.
FLAG_EFFECTS: dict[str, float] = {"new-pricing": 0.6, "dark-mode": 0.0}
MAX_BODY = 64 * 1024
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_VERSION = re.compile(r"^v?[0-9A-Za-z][0-9A-Za-z._+-]{0,63}$")


class ServiceError(Exception):
    """A request the service refuses; carries the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Release:
    version: str
    bad: bool = False


@dataclass
class _Counters:
    ok: int = 0
    errors: int = 0
    carry: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    duration_sum: float = 0.0

    @property
    def count(self) -> int:
        return self.ok + self.errors


def parse_bool(value: Any, name: str) -> bool:
    """A JSON boolean and nothing else, as a strict flag API reads it: the string "false"
    is refused (a loose API would read it as true)."""
    if isinstance(value, bool):
        return value
    raise ServiceError(400, f"{name}: expected a JSON boolean (true or false)")


def parse_int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise ServiceError(400, f"{name}: expected an integer")
    if isinstance(value, str) and re.fullmatch(r"\d{1,6}", value):
        value = int(value)
    if not isinstance(value, int) or not low <= value <= high:
        raise ServiceError(400, f"{name}: expected an integer from {low} to {high}")
    return value


class CheckoutService:
    """The demo service's state and traffic; every method is thread-safe."""

    def __init__(
        self,
        name: str = "checkout",
        *,
        requests_per_second: int = 200,
        tick: float = 0.1,
        seed: int = 7,
        version: str = "v2.4.1",
    ) -> None:
        if not _NAME.match(name):
            raise ValueError(f"invalid service name {name!r}")
        self.name = name
        self.tick = tick
        self.requests_per_tick = max(1, round(requests_per_second * tick))
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._history: list[Release] = [Release(version)]
        self._current = 0
        self._flags: dict[str, bool] = dict.fromkeys(FLAG_EFFECTS, False)
        self._replicas = 6
        self._drained: list[str] = []
        self._counters = _Counters()
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []

    # --- lifecycle -----------------------------------------------------------------------

    def start(self, port: int = 0) -> CheckoutService:
        server = ThreadingHTTPServer((HOST, port), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        self._stop.clear()
        self._threads = [
            threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="demo-http"
            ),
            threading.Thread(target=self._traffic, name="demo-traffic"),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop traffic and serving; joins the threads and closes the socket."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []

    def __enter__(self) -> CheckoutService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the service is not running")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    # --- behaviour -----------------------------------------------------------------------

    def _error_ratio(self) -> float:
        ratio = BASE_ERROR_RATIO
        if self._history[self._current].bad:
            ratio += BAD_RELEASE_ERROR_RATIO
        ratio += sum(FLAG_EFFECTS.get(name, 0.0) for name, on in self._flags.items() if on)
        return min(1.0, ratio)

    def _traffic(self) -> None:
        while not self._stop.wait(self.tick):
            self.serve_requests(self.requests_per_tick)

    def serve_requests(self, n: int) -> None:
        """Account for `n` synthetic requests under the current release and flags."""
        with self._lock:
            c = self._counters
            # Fractions carry over, so the long-run error ratio is exact, not noisy.
            wanted = n * self._error_ratio() + c.carry
            errors = min(n, int(wanted))
            c.carry = wanted - errors
            c.errors += errors
            c.ok += n - errors
            median = BAD_LATENCY if self._history[self._current].bad else GOOD_LATENCY
            mu = math.log(median)
            for _ in range(n):
                seconds = self._random.lognormvariate(mu, LATENCY_SPREAD)
                c.duration_sum += seconds
                for i, bound in enumerate(BUCKETS):
                    if seconds <= bound:
                        c.buckets[i] += 1

    def release(self) -> dict[str, Any]:
        with self._lock:
            return self._release_locked()

    def _release_locked(self) -> dict[str, Any]:
        return {
            "service": self.name,
            "version": self._history[self._current].version,
            "history": [r.version for r in self._history],
        }

    def deploy(self, version: str, *, bad: bool = False) -> dict[str, Any]:
        """Ship a new release; it becomes current at once."""
        if not _VERSION.match(version):
            raise ServiceError(400, f"invalid version {version!r}")
        with self._lock:
            if any(r.version == version for r in self._history):
                raise ServiceError(409, f"{version} was already deployed; PUT /release to use it")
            self._history.append(Release(version, bad))
            self._current = len(self._history) - 1
            return self._release_locked()

    def rollback(self) -> dict[str, Any]:
        """Go back to the newest good release older than the current one."""
        with self._lock:
            for index in range(self._current - 1, -1, -1):
                if not self._history[index].bad:
                    previous = self._history[self._current].version
                    self._current = index
                    return {**self._release_locked(), "rolled_back_from": previous}
            raise ServiceError(409, "there is no earlier good release to roll back to")

    def activate(self, version: str) -> dict[str, Any]:
        """Make a version from the history current again (what an undo does)."""
        with self._lock:
            for index, release in enumerate(self._history):
                if release.version == version:
                    self._current = index
                    return self._release_locked()
            raise ServiceError(404, f"no release {version!r} in the history")

    def flags(self) -> dict[str, bool]:
        with self._lock:
            return dict(self._flags)

    def flag(self, name: str) -> dict[str, Any]:
        with self._lock:
            if name not in self._flags:
                raise ServiceError(404, f"no flag {name!r}")
            return {"name": name, "enabled": self._flags[name]}

    def set_flag(self, name: str, enabled: bool) -> dict[str, Any]:
        if not _NAME.match(name):
            raise ServiceError(400, f"invalid flag name {name!r}")
        with self._lock:
            self._flags[name] = enabled
            return {"name": name, "enabled": enabled}

    def deployment(self) -> dict[str, Any]:
        with self._lock:
            return {"name": self.name, "replicas": self._replicas}

    def scale(self, replicas: int) -> dict[str, Any]:
        with self._lock:
            self._replicas = replicas
            return {"name": self.name, "replicas": replicas}

    def drain(self, node: str) -> dict[str, Any]:
        if not _NAME.match(node):
            raise ServiceError(400, f"invalid node name {node!r}")
        with self._lock:
            if node not in self._drained:
                self._drained.append(node)
            return {"node": node, "drained": True}

    def render_metrics(self) -> str:
        """The Prometheus text exposition of everything above."""
        name = self.name
        with self._lock:
            c = self._counters
            buckets = list(c.buckets)
            ok, errors, total, duration = c.ok, c.errors, c.count, c.duration_sum
            version = self._history[self._current].version
            flags = dict(self._flags)
            replicas = self._replicas
        lines = [
            "# HELP http_requests_total Requests handled, by service and status code.",
            "# TYPE http_requests_total counter",
            f'http_requests_total{{service="{name}",code="200"}} {ok}',
            f'http_requests_total{{service="{name}",code="500"}} {errors}',
            "# HELP http_request_duration_seconds Request latency.",
            "# TYPE http_request_duration_seconds histogram",
        ]
        for bound, count in zip(BUCKETS, buckets, strict=True):
            lines.append(
                f'http_request_duration_seconds_bucket{{service="{name}",le="{bound}"}} {count}'
            )
        lines += [
            f'http_request_duration_seconds_bucket{{service="{name}",le="+Inf"}} {total}',
            f'http_request_duration_seconds_sum{{service="{name}"}} {duration:.6f}',
            f'http_request_duration_seconds_count{{service="{name}"}} {total}',
            "# HELP demo_release_info The release serving traffic.",
            "# TYPE demo_release_info gauge",
            f'demo_release_info{{service="{name}",version="{version}"}} 1',
            "# HELP demo_feature_flag_enabled 1 while a feature flag is on.",
            "# TYPE demo_feature_flag_enabled gauge",
        ]
        for flag, on in sorted(flags.items()):
            lines.append(f'demo_feature_flag_enabled{{service="{name}",flag="{flag}"}} {int(on)}')
        lines += [
            "# HELP demo_replicas Replicas of the deployment.",
            "# TYPE demo_replicas gauge",
            f'demo_replicas{{service="{name}"}} {replicas}',
        ]
        return "\n".join(lines) + "\n"

    # --- routing -------------------------------------------------------------------------

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        """Route one request: (status, JSON document). Raises ServiceError to refuse."""
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/") if p]
        document = body if isinstance(body, dict) else {}
        match method, parts:
            case "GET", ["healthz"]:
                return 200, {"ok": True}
            case "GET", ["release"]:
                return 200, self.release()
            case "POST", ["release"]:
                version = document.get("version")
                if not isinstance(version, str):
                    raise ServiceError(400, "version: expected a string")
                bad = parse_bool(document.get("bad", False), "bad")
                return 201, self.deploy(version, bad=bad)
            case "PUT", ["release"]:
                version = document.get("version")
                if not isinstance(version, str):
                    raise ServiceError(400, "version: expected a string")
                return 200, self.activate(version)
            case "POST", ["release", "rollback"]:
                return 200, self.rollback()
            case "GET", ["flags"]:
                return 200, self.flags()
            case "GET", ["flags", name]:
                return 200, self.flag(name)
            case "PUT", ["flags", name]:
                return 200, self.set_flag(name, parse_bool(document.get("enabled"), "enabled"))
            case "GET", ["deployment"]:
                return 200, self.deployment()
            case "PUT", ["deployment"]:
                return 200, self.scale(parse_int(document.get("replicas"), "replicas", 0, 10_000))
            case "POST", ["nodes", node, "drain"]:
                return 200, self.drain(node)
        raise ServiceError(404 if method in {"GET", "POST", "PUT"} else 405, "not found")


def _handler_for(service: CheckoutService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "opsgate-demo"

        def log_message(self, format: str, *args: object) -> None:
            # One line per change, none per scrape: the log shows what opsgate did.
            if self.command != "GET":
                sys.stderr.write(f"{self.log_date_time_string()} {format % args}\n")

        def _send(self, status: int, text: str, content_type: str) -> None:
            data = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _dispatch(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            if self.command == "GET" and path == "/metrics":
                self._send(200, service.render_metrics(), "text/plain; version=0.0.4")
                return
            try:
                status, document = service.handle(self.command, path, self._body())
            except ServiceError as exc:
                status, document = exc.status, {"error": str(exc)}
            self._send(status, json.dumps(document) + "\n", "application/json")

        def _body(self) -> Any:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise ServiceError(400, "bad Content-Length") from None
            if length <= 0:
                return None
            if length > MAX_BODY:
                raise ServiceError(413, f"body larger than {MAX_BODY} bytes")
            try:
                return json.loads(self.rfile.read(length))
            except ValueError as exc:
                raise ServiceError(400, f"body is not JSON: {exc}") from None

        def _guarded(self) -> None:
            try:
                self._dispatch()
            except ServiceError as exc:
                self._send(exc.status, json.dumps({"error": str(exc)}) + "\n", "application/json")

        do_GET = do_POST = do_PUT = do_DELETE = _guarded

    return Handler


def write_port_file(path: Path, port: int) -> None:
    """Written atomically, so a reader never sees a half-written port."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(f"{port}\n")
    os.replace(partial, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opsgate.demo.service", description="The opsgate demo service."
    )
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--port-file", type=Path, help="write the bound port here")
    parser.add_argument("--service", default="checkout")
    parser.add_argument("--rate", type=int, default=200, help="synthetic requests per second")
    args = parser.parse_args(argv)

    stop = threading.Event()
    # SIGTERM (the demo's cleanup, `kill`) and Ctrl-C both end the service cleanly.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    service = CheckoutService(args.service, requests_per_second=args.rate).start(args.port)
    try:
        if args.port_file is not None:
            write_port_file(args.port_file, service.port)
        print(f"{args.service} demo service on {service.url} (pid {os.getpid()})", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
