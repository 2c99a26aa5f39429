"""A real `opsgate server` process on 127.0.0.1, for tests that go through the API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests

from opsgate.demo.processes import LOOPBACK, free_port, port_open, stop_process

ROOT = Path(__file__).resolve().parents[2]


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The developer's OPSGATE_* never leak into a test's process."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OPSGATE_")}
    return {**base, **extra}


def run_cli(
    env: Mapping[str, str], *args: str, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "opsgate", *args],
        env=clean_env(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


class ApiServer:
    """`opsgate server --listen 127.0.0.1:PORT` over a store; stopped by `stop()`."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.port = 0
        self.process: subprocess.Popen[str] | None = None
        self.session = requests.Session()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        for _attempt in range(3):  # a free port can be taken before the server binds it
            self.port = free_port()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "opsgate", "server", "--listen", f"{LOOPBACK}:{self.port}"],
                env=clean_env(self.env),
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.process.poll() is None:
                if port_open(self.port, timeout=0.2):
                    return
                time.sleep(0.05)
            stop_process(self.process)
        stderr = self.process.stderr.read() if self.process and self.process.stderr else ""
        raise RuntimeError(f"opsgate server did not start: {stderr}")

    def stop(self) -> None:
        self.session.close()
        if self.process is not None:
            stop_process(self.process)
            if self.process.stderr is not None:
                self.process.stderr.close()

    def call(
        self,
        method: str,
        path: str,
        token: str | None = None,
        body: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
    ) -> tuple[int, Any]:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        response = self.session.request(
            method, self.url + path, headers=sent, data=data, timeout=30
        )
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, response.text
