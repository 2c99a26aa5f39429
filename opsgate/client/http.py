"""A small HTTP client for /api/v1 that turns error answers back into opsgate errors,
so a command exits with the same code through the API as it does locally."""

from __future__ import annotations

import urllib.parse
from typing import Any

import requests

from opsgate import __version__
from opsgate.auth.principal import Unauthenticated
from opsgate.errors import (
    ConfigError,
    InvalidInput,
    NotFound,
    OpsgateError,
    Refused,
    StateConflict,
)

MAX_RESPONSE_BYTES = 50_000_000


def check_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(f"OPSGATE_URL: expected http(s)://host[:port], got {url!r}")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ConfigError(f"OPSGATE_URL: {url!r} has no valid port (1 to 65535)")
    if parts.username is not None or parts.password is not None:
        # requests would turn them into Basic auth and drop the bearer token.
        raise ConfigError("OPSGATE_URL: no user or password in the URL; use OPSGATE_TOKEN")
    if parts.query or parts.fragment:
        raise ConfigError(f"OPSGATE_URL: expected http(s)://host[:port], got {url!r}")
    if parts.scheme == "http" and parts.hostname not in {"127.0.0.1", "::1", "localhost"}:
        # A bearer token in clear text over a network is a credential handed out.
        raise ConfigError("OPSGATE_URL: use https:// for anything but loopback")
    return url.rstrip("/")


class ApiClient:
    def __init__(self, url: str, token: str, *, timeout: float = 30.0) -> None:
        self.url = check_url(url)
        if not token or not token.isprintable() or len(token) > 8192:
            raise ConfigError("OPSGATE_TOKEN: missing or malformed")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.session.headers["User-Agent"] = f"opsgate/{__version__}"
        self.session.trust_env = False  # no proxy from the environment sees the token

    def close(self) -> None:
        self.session.close()

    def call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = self.session.request(
                method, f"{self.url}/api/v1{path}", json=body, timeout=self.timeout
            )
        except requests.RequestException as exc:
            raise OpsgateError(
                f"cannot reach the opsgate server at {self.url}: {type(exc).__name__}"
            ) from None
        if len(response.content) > MAX_RESPONSE_BYTES:
            raise OpsgateError("the server's answer is too large")
        try:
            payload = response.json()
        except ValueError:
            raise OpsgateError(
                f"the server answered {response.status_code} without JSON; is OPSGATE_URL "
                "an opsgate server?"
            ) from None
        if response.status_code < 400:
            return payload
        raise error_from(response.status_code, payload)


def error_from(status: int, payload: Any) -> OpsgateError:
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return OpsgateError(f"the server answered {status}")
    message = str(error.get("message", ""))
    if status == 429:
        return Unauthenticated(message or "too many failed authentications; retry later")
    if status == 401:
        return Unauthenticated(f"{message} (check OPSGATE_TOKEN, or `opsgate login`)")
    if status == 400:
        field = str(error.get("field", ""))
        prefix = f"{field}: "
        return InvalidInput(
            field, message[len(prefix) :] if message.startswith(prefix) else message
        )
    if status == 403:
        codes = error.get("codes")
        return Refused(message, [str(c) for c in codes] if isinstance(codes, list) else [])
    if status == 404:
        return NotFound(message)
    if status == 409:
        return StateConflict(message)
    if error.get("type") == "server_config":
        # Named so nobody sets the variable on the client, where it changes nothing.
        return OpsgateError(f"the server's own settings are incomplete: {message}")
    return OpsgateError(f"server error ({status}): {message}")
