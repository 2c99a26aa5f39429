"""Named contexts in the user's config file: which store, catalog, bundle and Prometheus
`opsgate` talks to, switched with `opsgate context use NAME` (as kubectl does).

The file lives in the platform's config directory (`$XDG_CONFIG_HOME/opsgate/config.toml`,
`~/.config/opsgate/config.toml`, `~/Library/Application Support/opsgate/config.toml` on
macOS, `%APPDATA%\\opsgate\\config.toml` on Windows), or where `OPSGATE_USER_CONFIG` says:

    current-context = "prod"

    [contexts.prod]
    db = "postgresql://opsgate@db.internal/opsgate"
    prometheus_url = "https://prometheus.internal"

It never carries who acts: identity settings are refused here (they come from the
identity provider), and so is a file that other users may write.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from opsgate.config import IDENTITY_SETTINGS, Settings
from opsgate.errors import ConfigError, InvalidInput, NotFound, did_you_mean

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# Who acts is never configured from a file: the identity provider decides.
IDENTITY_KEYS = frozenset({"identity", "user", "user_kind", "agent_id"}) | IDENTITY_SETTINGS
# Settings a context may hold: every setting but who acts (where things are, how long
# to wait, which engine).
ALLOWED_KEYS = frozenset(f.name for f in fields(Settings)) - IDENTITY_KEYS
SECRET_KEYS = frozenset({"opa_token", "prometheus_token", "prometheus_password"})
MAX_FILE_BYTES = 256 * 1024
MAX_VALUE_LENGTH = 4096


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    explicit = env.get("OPSGATE_USER_CONFIG")
    if explicit:
        return Path(explicit)
    if sys.platform == "win32" and env.get("APPDATA"):
        base = Path(env["APPDATA"])
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "opsgate" / "config.toml"


@dataclass
class UserConfig:
    path: Path
    current: str | None = None
    contexts: dict[str, dict[str, str]] = field(default_factory=dict)

    def get(self, name: str) -> dict[str, str]:
        if name not in self.contexts:
            known = ", ".join(sorted(self.contexts)) or "none"
            raise NotFound(
                f"no context {name!r}{did_you_mean(name, self.contexts)} in {self.path} "
                f"(contexts: {known})"
            )
        return self.contexts[name]


def check_name(name: str, field_name: str = "name") -> str:
    if not NAME.fullmatch(name):
        raise InvalidInput(
            field_name,
            f"{name!r} is not a context name (letters, digits, _ . -; at most 63)",
        )
    return name


def check_entry(key: str, value: Any, where: str) -> str:
    """One setting of a context: a known, non-identity key with a short scalar value."""
    if key in IDENTITY_KEYS:
        raise ConfigError(
            f"{where}: {key!r} is an identity setting; who acts comes from the identity "
            "provider (OPSGATE_IDENTITY), never from a config file"
        )
    if key not in ALLOWED_KEYS:
        raise ConfigError(
            f"{where}: unknown setting {key!r}{did_you_mean(key, ALLOWED_KEYS)} "
            f"(settings: {', '.join(sorted(ALLOWED_KEYS))})"
        )
    if isinstance(value, bool):
        return "true" if value else "false"
    if not isinstance(value, str | int | float):
        raise ConfigError(f"{where}: {key} must be a string, a number or true/false")
    text = str(value)
    if len(text) > MAX_VALUE_LENGTH or not text.isprintable():
        raise ConfigError(f"{where}: {key} is too long or holds control characters")
    return text


def load(path: Path | None = None) -> UserConfig:
    """The user's config file, checked; an absent file is an empty config."""
    path = path or config_path()
    config = UserConfig(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        return config
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    if os.name == "posix" and info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"{path} may be written by other users; it says which store and policy opsgate "
            f"uses, so fix it: chmod go-w {path}"
        )
    if info.st_size > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    unknown = set(document) - {"current-context", "contexts"}
    if unknown:
        raise ConfigError(f"{path}: unknown key {sorted(unknown)[0]!r}")
    current = document.get("current-context")
    if current is not None and (not isinstance(current, str) or not NAME.fullmatch(current)):
        raise ConfigError(f"{path}: current-context must be a context name")
    contexts = document.get("contexts", {})
    if not isinstance(contexts, dict):
        raise ConfigError(f"{path}: contexts must be a table of [contexts.NAME] tables")
    for name, entries in contexts.items():
        if not NAME.fullmatch(name):
            raise ConfigError(f"{path}: {name!r} is not a context name")
        if not isinstance(entries, dict):
            raise ConfigError(f"{path}: [contexts.{name}] must be a table")
        config.contexts[name] = {
            key: check_entry(key, value, f"{path} [contexts.{name}]")
            for key, value in entries.items()
        }
    config.current = current
    return config


def selected(
    env: Mapping[str, str], chosen: str | None, path: Path | None = None
) -> dict[str, str]:
    """The settings of the context in use: --context, else OPSGATE_CONTEXT, else the file's
    current-context; nothing when none is chosen."""
    name = chosen or env.get("OPSGATE_CONTEXT") or None
    config = load(path or config_path(env))
    name = name or config.current
    if name is None:
        return {}
    if name not in config.contexts:
        known = ", ".join(sorted(config.contexts)) or "none"
        raise ConfigError(
            f"context {name!r} is not defined in {config.path}"
            f"{did_you_mean(name, config.contexts)} (contexts: {known}; "
            "`opsgate context use NAME` picks one)"
        )
    return dict(config.contexts[name])


def _toml_string(text: str) -> str:
    # JSON's escapes (\", \\, \n, \uXXXX) are TOML basic-string escapes as well.
    return json.dumps(text, ensure_ascii=True)


def save(config: UserConfig) -> None:
    """Write atomically, readable and writable by the user only."""
    lines = []
    if config.current is not None:
        lines.append(f"current-context = {_toml_string(config.current)}")
    for name in sorted(config.contexts):
        lines += ["", f"[contexts.{_toml_string(name)}]"]
        for key, value in sorted(config.contexts[name].items()):
            lines.append(f"{key} = {_toml_string(value)}")
    text = "\n".join(lines) + "\n"
    directory = config.path.parent
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".config.", suffix=".toml")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(temporary, 0o600)
        os.replace(temporary, config.path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    load(config.path)  # what was written reads back


def masked(values: Mapping[str, str]) -> dict[str, str]:
    """Settings to show: secrets as ***, and a URL's password too."""
    shown = {}
    for key, value in values.items():
        if key in SECRET_KEYS:
            shown[key] = "***"
        elif "://" in value and "@" in value.split("://", 1)[1]:
            scheme, rest = value.split("://", 1)
            userinfo, host = rest.split("@", 1)
            user = userinfo.split(":", 1)[0]
            shown[key] = f"{scheme}://{user}{':***' if ':' in userinfo else ''}@{host}"
        else:
            shown[key] = value
    return shown
