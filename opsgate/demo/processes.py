"""Small process and HTTP helpers for the demo: loopback only, no shell."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A port nothing listens on right now (the caller still retries if it is taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int, timeout: float = 0.5) -> bool:
    """True when something accepts connections on 127.0.0.1:port."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


def _loopback_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname != LOOPBACK:
        raise ValueError(f"the demo only talks to http://{LOOPBACK}, not {url}")
    return url


def http_json(method: str, url: str, body: Any = None, *, timeout: float = 5.0) -> tuple[int, Any]:
    """One JSON request to a loopback URL: (status, decoded body or None)."""
    data = None if body is None else json.dumps(body).encode()
    # Loopback http only (checked): no file: or other schemes can sneak in.
    request = urllib.request.Request(_loopback_url(url), data=data, method=method)  # noqa: S310
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> int | None:
    """SIGTERM, wait up to `timeout`, then SIGKILL; the exit status (None if unknown)."""
    if process.poll() is None:
        try:
            process.terminate()
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return None
        except ProcessLookupError:
            pass
    return process.returncode
