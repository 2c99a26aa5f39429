"""A real Prometheus for the demo: scrape every second, loopback only, own session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from opsgate.demo.processes import LOOPBACK, free_port, http_json, stop_process

DEFAULT_BINARY = "/usr/bin/prometheus"
INSTALL_HINT = (
    "opsgate demo needs a Prometheus binary: on Debian/Ubuntu `sudo apt-get install "
    "prometheus`; elsewhere download one from https://prometheus.io/download/ and put it "
    "on PATH or set OPSGATE_PROMETHEUS_BIN=/path/to/prometheus"
)


def scrape_config(targets: Sequence[str], job: str) -> str:
    """A Prometheus config scraping `targets` every second (rules evaluated as often)."""
    quoted = ", ".join(json.dumps(t) for t in targets)
    return (
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        f"  - job_name: {json.dumps(job)}\n"
        "    static_configs:\n"
        f"      - targets: [{quoted}]\n"
    )


def server_argv(binary: str, config_file: Path, data_dir: Path, port: int) -> list[str]:
    """How to run Prometheus on loopback only, with a short-lived TSDB in `data_dir`."""
    return [
        binary,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={data_dir}",
        f"--web.listen-address={LOOPBACK}:{port}",
        "--storage.tsdb.retention.time=1d",
        "--log.level=warn",
    ]


class PrometheusError(RuntimeError):
    """Prometheus could not be started or did not scrape in time."""


def find_prometheus() -> str | None:
    """`$OPSGATE_PROMETHEUS_BIN`, /usr/bin/prometheus, or `prometheus` on PATH."""
    configured = os.environ.get("OPSGATE_PROMETHEUS_BIN")
    if configured:
        return configured
    if os.access(DEFAULT_BINARY, os.X_OK):
        return DEFAULT_BINARY
    return shutil.which("prometheus")


class Prometheus:
    """One Prometheus server scraping `targets` every second, logging to a file."""

    def __init__(
        self, binary: str, targets: Sequence[str], workdir: Path, *, job: str = "demo"
    ) -> None:
        self.binary = binary
        self.targets = list(targets)
        self.workdir = workdir
        self.job = job
        self.port = 0
        self.config_file = workdir / "prometheus.yml"
        self.data_dir = workdir / "prometheus-data"
        self.log_file = workdir / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def _write_config(self) -> None:
        self.config_file.write_text(scrape_config(self.targets, self.job))

    def start(self, *, timeout: float = 60.0, attempts: int = 3) -> Prometheus:
        """Start on a free port (another one if it was taken meanwhile) and wait until
        every target has been scraped."""
        self._write_config()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        for attempt in range(attempts):
            self.port = free_port()
            self._spawn()
            try:
                self._wait_ready(deadline)
                break
            except PrometheusError:
                self.stop()
                # Another process grabbed the port between our probe and the bind: retry.
                if attempt + 1 == attempts or "address already in use" not in self._log_tail():
                    raise
        try:
            self._wait_scraped(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self) -> None:
        argv = server_argv(self.binary, self.config_file, self.data_dir, self.port)
        with self.log_file.open("ab") as log:
            # Own session: a Ctrl-C in the terminal reaches the demo only, which then
            # stops Prometheus itself; with --keep it outlives the demo.
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`. Safe to call twice."""
        process, self.process = self.process, None
        if process is not None:
            stop_process(process, timeout)

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def _wait_ready(self, deadline: float) -> None:
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise PrometheusError(
                    f"prometheus exited with {self.process.returncode}; "
                    f"log {self.log_file}:\n{self._log_tail()}"
                )
            try:
                status, _ = http_json("GET", f"{self.url}/-/ready", timeout=1.0)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise PrometheusError(f"prometheus not ready at {self.url}; log {self.log_file}")
            time.sleep(0.1)

    def _wait_scraped(self, deadline: float) -> None:
        wanted = set(self.targets)
        selector = f'up{{job="{self.job}"}}'
        while True:
            up = {
                labels.get("instance", "")
                for labels, value in self.query_vector(selector)
                if value == 1.0
            }
            if wanted <= up:
                return
            if time.monotonic() > deadline:
                raise PrometheusError(f"prometheus never scraped {sorted(wanted - up)}")
            time.sleep(0.2)

    def query_vector(self, query: str) -> list[tuple[dict[str, str], float]]:
        """An instant query straight to the API (the demo's own narration, not opsgate's
        verification): [(labels, value)], empty when there is no data or no answer."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
        try:
            status, document = http_json("GET", url, timeout=2.0)
        except OSError:
            return []
        if status != 200 or not isinstance(document, dict):
            return []
        result = document.get("data", {}).get("result", [])
        return [(item["metric"], float(item["value"][1])) for item in result]

    def query(self, query: str) -> float | None:
        """The value of a single-series instant query; None for no data or NaN."""
        vector = self.query_vector(query)
        if len(vector) != 1 or vector[0][1] != vector[0][1]:
            return None
        return vector[0][1]
