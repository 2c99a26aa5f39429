"""A tiny fake service fleet that Prometheus scrapes: steady traffic, switchable faults.

In a test, run it in-process::

    with FaultService(["checkout"]) as faults:
        faults.set_error_ratio("checkout", 0.5)

`/metrics` exposes, per service, `http_requests_total{service=...,code="200"|"500"}`
counters and an `http_request_duration_seconds` histogram. A background thread adds
`requests_per_tick` requests per service every `tick` seconds (default 20 per 100 ms,
i.e. 200 req/s); `error_ratio` of them are 500s (fractions carry over between ticks, so
the long-run ratio is exact) and every request takes the service's `latency`.

Flip a fault from another process (e.g. a shell runner step)::

    python -m tests.integration.fault_service set --url http://127.0.0.1:PORT \
        --service checkout --ratio 0.5 [--latency 0.3]

which sends `POST /fault?service=checkout&ratio=0.5`. `GET /fault` returns the state as
JSON. `python -m tests.integration.fault_service serve --port 0 --service checkout`
runs one standalone until interrupted. It only ever listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SERVICE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
HOST = "127.0.0.1"


@dataclass
class _Service:
    error_ratio: float = 0.0
    latency: float = 0.02
    ok: int = 0
    errors: int = 0
    carry: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    duration_sum: float = 0.0

    @property
    def count(self) -> int:
        return self.ok + self.errors


def _check_name(service: str) -> str:
    if not SERVICE_NAME.match(service):
        raise ValueError(f"invalid service name {service!r}")
    return service


def _check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError("ratio must be between 0 and 1")
    return ratio


def _check_latency(latency: float) -> float:
    latency = float(latency)
    if not 0.0 <= latency <= 60.0:
        raise ValueError("latency must be between 0 and 60 seconds")
    return latency


class FaultService:
    """Serves `/metrics` for a set of fake services on 127.0.0.1; see the module doc."""

    def __init__(
        self,
        services: Iterable[str] = ("checkout",),
        *,
        requests_per_tick: int = 20,
        tick: float = 0.1,
        port: int = 0,
    ) -> None:
        self.requests_per_tick = requests_per_tick
        self.tick = tick
        self._port = port
        self._lock = threading.Lock()
        self._services: dict[str, _Service] = {}
        for name in services:
            self.add_service(name)
        self._server: ThreadingHTTPServer | None = None
        self._serve_thread: threading.Thread | None = None
        self._tick_thread: threading.Thread | None = None
        self._stop = threading.Event()

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> FaultService:
        if self._server is not None:
            raise RuntimeError("fault service already started")
        server = ThreadingHTTPServer((HOST, self._port), _make_handler(self))
        server.daemon_threads = True
        self._server = server
        self._port = server.server_address[1]
        self._stop.clear()
        self._serve_thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fault-http"
        )
        self._tick_thread = threading.Thread(target=self._run_ticks, name="fault-ticker")
        self._serve_thread.start()
        self._tick_thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and ticking; joins both threads and closes the socket."""
        self._stop.set()
        if self._tick_thread is not None:
            self._tick_thread.join(timeout=5)
            self._tick_thread = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._serve_thread is not None:
            self._serve_thread.join(timeout=5)
            self._serve_thread = None

    def __enter__(self) -> FaultService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        """`host:port`, the scrape target."""
        return f"{HOST}:{self._port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    # --- faults --------------------------------------------------------------------------

    def add_service(self, service: str, *, error_ratio: float = 0.0, latency: float = 0.02) -> None:
        _check_name(service)
        with self._lock:
            if service not in self._services:
                self._services[service] = _Service(
                    error_ratio=_check_ratio(error_ratio), latency=_check_latency(latency)
                )

    def set_error_ratio(self, service: str, ratio: float) -> None:
        """0 = healthy, 1 = every request fails. Creates the service if it is new."""
        ratio = _check_ratio(ratio)
        self.add_service(service)
        with self._lock:
            self._services[service].error_ratio = ratio

    def set_latency(self, service: str, seconds: float) -> None:
        seconds = _check_latency(seconds)
        self.add_service(service)
        with self._lock:
            self._services[service].latency = seconds

    def state(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {
                name: {
                    "error_ratio": s.error_ratio,
                    "latency": s.latency,
                    "requests": s.count,
                    "errors": s.errors,
                }
                for name, s in self._services.items()
            }

    # --- traffic and exposition ----------------------------------------------------------

    def _run_ticks(self) -> None:
        while not self._stop.wait(self.tick):
            self.advance()

    def advance(self, ticks: int = 1) -> None:
        """Serve `ticks` ticks' worth of fake requests now."""
        with self._lock:
            for s in self._services.values():
                n = self.requests_per_tick * ticks
                wanted = n * s.error_ratio + s.carry
                errors = min(n, int(wanted))
                s.carry = wanted - errors
                s.errors += errors
                s.ok += n - errors
                s.duration_sum += n * s.latency
                for i, bound in enumerate(BUCKETS):
                    if s.latency <= bound:
                        s.buckets[i] += n

    def render_metrics(self) -> str:
        lines = [
            "# HELP http_requests_total Requests handled, by service and status code.",
            "# TYPE http_requests_total counter",
        ]
        with self._lock:
            services = sorted(self._services.items())
            for name, s in services:
                lines.append(f'http_requests_total{{service="{name}",code="200"}} {s.ok}')
                lines.append(f'http_requests_total{{service="{name}",code="500"}} {s.errors}')
            lines += [
                "# HELP http_request_duration_seconds Request latency.",
                "# TYPE http_request_duration_seconds histogram",
            ]
            for name, s in services:
                for bound, count in zip(BUCKETS, s.buckets, strict=True):
                    lines.append(
                        f'http_request_duration_seconds_bucket{{service="{name}",le="{bound}"}}'
                        f" {count}"
                    )
                lines.append(
                    f'http_request_duration_seconds_bucket{{service="{name}",le="+Inf"}} {s.count}'
                )
                lines.append(
                    f'http_request_duration_seconds_sum{{service="{name}"}} {s.duration_sum}'
                )
                lines.append(f'http_request_duration_seconds_count{{service="{name}"}} {s.count}')
        return "\n".join(lines) + "\n"


def _make_handler(service: FaultService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _send(self, status: int, body: str, content_type: str) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _json(self, status: int, payload: object) -> None:
            self._send(status, json.dumps(payload) + "\n", "application/json")

        def do_GET(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            if path == "/metrics":
                self._send(200, service.render_metrics(), "text/plain; version=0.0.4")
            elif path == "/fault":
                self._json(200, service.state())
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self) -> None:
            parts = urllib.parse.urlsplit(self.path)
            if parts.path != "/fault":
                self._json(404, {"error": "not found"})
                return
            query = urllib.parse.parse_qs(parts.query)
            try:
                name = query["service"][0]
                if "ratio" in query:
                    service.set_error_ratio(name, float(query["ratio"][0]))
                if "latency" in query:
                    service.set_latency(name, float(query["latency"][0]))
                service.add_service(name)
            except (KeyError, ValueError) as exc:
                self._json(400, {"error": f"bad request: {exc}"})
                return
            self._json(200, service.state()[name])

    return Handler


def set_fault(
    url: str,
    service: str,
    *,
    ratio: float | None = None,
    latency: float | None = None,
    timeout: float = 5.0,
) -> dict[str, float]:
    """Flip a fault on a running fault service over HTTP."""
    params: dict[str, str] = {"service": service}
    if ratio is not None:
        params["ratio"] = str(ratio)
    if latency is not None:
        params["latency"] = str(latency)
    endpoint = f"{url.rstrip('/')}/fault?{urllib.parse.urlencode(params)}"
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError("url must be http(s)")
    request = urllib.request.Request(endpoint, method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        result: dict[str, float] = json.loads(response.read())
        return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.integration.fault_service")
    sub = parser.add_subparsers(dest="command", required=True)
    set_cmd = sub.add_parser("set", help="set a service's error ratio and/or latency")
    set_cmd.add_argument("--url", required=True)
    set_cmd.add_argument("--service", required=True)
    set_cmd.add_argument("--ratio", type=float)
    set_cmd.add_argument("--latency", type=float)
    serve = sub.add_parser("serve", help="run a fault service until interrupted")
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--service", action="append", default=[])
    args = parser.parse_args(argv)

    if args.command == "set":
        if args.ratio is None and args.latency is None:
            parser.error("give --ratio and/or --latency")
        try:
            state = set_fault(args.url, args.service, ratio=args.ratio, latency=args.latency)
        except urllib.error.HTTPError as exc:
            with exc:
                detail = exc.read().decode(errors="replace").strip()
            print(f"fault service refused: {detail}", file=sys.stderr)
            return 2
        except (OSError, ValueError) as exc:
            print(f"cannot reach fault service at {args.url}: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(state))
        return 0

    faults = FaultService(args.service or ["checkout"], port=args.port)
    faults.start()
    print(f"fault service on {faults.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        faults.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
