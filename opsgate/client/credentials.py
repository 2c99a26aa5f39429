"""Credentials `opsgate login` stores: per server URL, in a 0600 file under the user's
config directory ($XDG_CONFIG_HOME/opsgate or ~/.config/opsgate), never in the working
directory."""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests

from opsgate.errors import ConfigError

FILE_NAME = "credentials.json"


def config_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    if not Path(base).is_absolute():
        raise ConfigError("XDG_CONFIG_HOME: must be an absolute path")
    return Path(base) / "opsgate"


def credentials_path(env: Mapping[str, str] | None = None) -> Path:
    return config_dir(env) / FILE_NAME


def _read(path: Path) -> dict[str, Any]:
    try:
        info = path.stat()
    except FileNotFoundError:
        return {}
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        # As ssh does with a private key: a credential others can read is not used.
        raise ConfigError(f"{path} is readable by others; chmod 600 it or log in again")
    if info.st_uid != os.getuid():
        raise ConfigError(f"{path} belongs to another user")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); log in again") from None
    return document if isinstance(document, dict) else {}


def save(server: str, entry: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Path:
    path = credentials_path(env)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    document = _read(path)
    servers = document.get("servers") if isinstance(document.get("servers"), dict) else {}
    servers = dict(servers or {})
    servers[server] = dict(entry)
    text = json.dumps({"servers": servers}, indent=2, sort_keys=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def load(server: str, env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    servers = _read(credentials_path(env)).get("servers")
    entry = servers.get(server) if isinstance(servers, dict) else None
    return entry if isinstance(entry, dict) else None


def access_token(server: str, env: Mapping[str, str] | None = None) -> str | None:
    """The stored access token for this server, refreshed when it is about to expire."""
    entry = load(server, env)
    if entry is None:
        return None
    token = entry.get("access_token")
    expires_at = float(entry.get("expires_at") or 0)
    if isinstance(token, str) and time.time() < expires_at - 30:
        return token
    refresh = entry.get("refresh_token")
    endpoint = entry.get("token_endpoint")
    if not isinstance(refresh, str) or not isinstance(endpoint, str):
        raise ConfigError("your opsgate login has expired; run `opsgate login` again")
    try:
        response = requests.post(
            endpoint,
            data={
                "grant_type": "refresh_token",
                "refresh_token": refresh,
                "client_id": entry.get("client_id", ""),
            },
            timeout=10,
        )
        answer = response.json()
    except (requests.RequestException, ValueError):
        raise ConfigError("cannot refresh your opsgate login; run `opsgate login` again") from None
    if response.status_code != 200 or not isinstance(answer.get("access_token"), str):
        raise ConfigError("your opsgate login has expired; run `opsgate login` again")
    save(server, token_entry(answer, entry), env)
    return str(answer["access_token"])


def token_entry(answer: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    return {
        **base,
        "access_token": answer["access_token"],
        "refresh_token": answer.get("refresh_token", base.get("refresh_token")),
        "expires_at": time.time() + float(answer.get("expires_in") or 300),
    }
