"""A real Prometheus for integration tests: start, wait, stop, restart.

    server = PrometheusServer(["127.0.0.1:8123"], workdir)
    server.start()          # waits for /-/ready and for a successful scrape of every target
    server.url              # http://127.0.0.1:<port>
    server.stop()           # SIGTERM, then SIGKILL after a timeout
    server.start()          # same port, same TSDB: the earlier samples are still there

It scrapes every second (`scrape_interval` and `evaluation_interval` 1s), listens on
127.0.0.1 only and logs to `<workdir>/prometheus.log`.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opsgate.demo.processes import free_port
from opsgate.demo.prometheus import DEFAULT_BINARY as DEMO_DEFAULT_BINARY
from opsgate.demo.prometheus import find_prometheus, scrape_config, server_argv

# The launcher's pieces are the demo's own (opsgate.demo.prometheus); this harness adds
# what tests need: a fixed port across restarts and raw API access.
prometheus_binary = find_prometheus
DEFAULT_BINARY = DEMO_DEFAULT_BINARY


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET `url`: (status, body). Raises OSError when nothing answers."""
    if not url.startswith("http://"):
        raise ValueError("http only")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


class PrometheusServer:
    def __init__(
        self,
        targets: Sequence[str],
        workdir: Path,
        *,
        job: str = "fault",
        port: int | None = None,
        binary: str | None = None,
    ) -> None:
        self.targets = list(targets)
        self.workdir = Path(workdir)
        self.job = job
        self.port = port or free_port()
        self.binary = binary or prometheus_binary() or DEFAULT_BINARY
        self.data_dir = self.workdir / "data"
        self.config_file = self.workdir / "prometheus.yml"
        self.log_file = self.workdir / "prometheus.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._started_wall = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _write_config(self) -> None:
        self.config_file.write_text(scrape_config(self.targets, self.job))

    def start(self, *, timeout: float = 30.0, wait_for_scrape: bool = True) -> PrometheusServer:
        """Start (or restart) and wait until ready and every target was scraped."""
        if self.running:
            raise RuntimeError("prometheus is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        self._write_config()
        argv = server_argv(self.binary, self.config_file, self.data_dir, self.port)
        self._started_wall = time.time()
        with open(self.log_file, "ab") as log:
            self._process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        try:
            deadline = time.monotonic() + timeout
            self._wait_ready(deadline)
            if wait_for_scrape:
                self._wait_for_scrape(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Safe to call twice."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout)

    def restart(self, *, timeout: float = 30.0) -> PrometheusServer:
        self.stop()
        return self.start(timeout=timeout)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def _wait_ready(self, deadline: float) -> None:
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited with {self._process.returncode}:\n{self._log_tail()}"
                )
            try:
                status, _ = http_get(f"{self.url}/-/ready", timeout=1.0)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready at {self.url}:\n{self._log_tail()}")
            time.sleep(0.05)

    def _wait_for_scrape(self, deadline: float) -> None:
        """Until `up` is 1 for every target of the job."""
        wanted = set(self.targets)
        while True:
            # timestamp(): the sample's own time, so samples kept from before a restart
            # do not count.
            up_selector = f'up{{job="{self.job}"}}'
            data = self.api_query(f"timestamp({up_selector}) and ({up_selector} == 1)")
            if data.get("status") == "success":
                up = {
                    s["metric"].get("instance")
                    for s in data["data"]["result"]
                    if float(s["value"][1]) >= self._started_wall
                }
                if wanted <= up:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus never scraped {sorted(wanted)}: {data}")
            time.sleep(0.1)

    def api_query(self, query: str) -> dict[str, Any]:
        """The raw JSON of `/api/v1/query` (for test assertions, not through opsgate)."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
        try:
            _, body = http_get(url)
        except OSError as exc:
            return {"status": "unreachable", "error": str(exc)}
        result: dict[str, Any] = json.loads(body)
        return result

    def self_metric(self, name: str, **labels: str) -> float:
        """Sum of a metric of Prometheus's own `/metrics` (read directly, not scraped)."""
        _, body = http_get(f"{self.url}/metrics")
        total = 0.0
        for line in body.decode().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            series, _, value = line.rpartition(" ")
            if all(f'{key}="{val}"' in series for key, val in labels.items()):
                total += float(value)
        return total
