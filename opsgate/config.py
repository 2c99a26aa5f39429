"""Settings from OPSGATE_* environment variables and an optional TOML file (OPSGATE_CONFIG).

No file is read unless OPSGATE_CONFIG names it: a file someone left in the working
directory must not choose the store, the bundle or who acts. Identity settings are read
from the environment only, never from any file.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from opsgate.errors import ConfigError

DEFAULT_DB = "sqlite:///opsgate.db"
# Who is believed about identity: from the environment only, never from a file.
IDENTITY_SETTINGS = frozenset(
    {"identity", "user", "user_kind", "trusted_proxy", "proxy_user_header", "proxy_groups_header"}
)


# A TTL of weeks is a standing approval; one of a second, a typo. The same for leases.
MAX_SETTING_DURATION = 30 * 86400.0
_DURATION_BOUNDS = {
    "approval_ttl": (1.0, MAX_SETTING_DURATION),
    "lease": (1.0, 86400.0),
    "decision_deadline": (0.1, 300.0),
    # The track record's window: a day at least, ten years at most.
    "track_record_window": (86400.0, 3650 * 86400.0),
}


@dataclass(frozen=True)
class Settings:
    """One config object for every command (rq's pass_cli_config habit)."""

    db: str = DEFAULT_DB
    catalog: Path = Path("catalog")
    policies: Path = Path("policies")
    identity: str = "os"  # os | postgres | env
    user: str | None = None  # only read when identity == "env"
    user_kind: str = "human"  # only read when identity == "env"
    approval_ttl: float = 3600.0
    policy_engine: str = "embedded"  # embedded | opa-embedded | opa
    opa_url: str | None = None
    opa_mode: str = "push"  # push: opsgate uploads the bundle; external: OPA has its own
    opa_token: str | None = None
    opa_ca_file: str | None = None
    opa_timeout: float = 2.0
    policy_timeout: float = 0.5  # the embedded engine's budget per decision
    shadow_policies: Path | None = None  # a second bundle, evaluated but never enforced
    prometheus_url: str | None = None
    prometheus_token: str | None = None
    prometheus_user: str | None = None
    prometheus_password: str | None = None
    prometheus_ca_file: str | None = None
    prometheus_timeout: float = 5.0
    # The scrape term of the post-change evidence floor; None asks Prometheus.
    prometheus_scrape_interval: float | None = None
    # Refuse (instead of warn about) a catalog whose verification cannot be met as written.
    catalog_strict: bool = False
    lease: float = 30.0  # a worker's claim lapses this long after its last heartbeat
    worker_concurrency: int = 4  # runner steps (capture/run/undo) at once per worker
    # `opsgate server`: OIDC bearer JWTs beside API tokens (both unset: tokens only)
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    oidc_user_claim: str = "sub"
    oidc_groups_claim: str = "groups"
    oidc_leeway: float = 30.0  # clock skew allowed on exp/iat/nbf
    oidc_client_id: str | None = None  # the public client `opsgate login` uses
    oidc_scopes: str = "openid profile offline_access"
    # `opsgate server`: the proxies (IPs, CIDRs) whose identity header is believed, and
    # that header's name; unset: identity headers are ignored from everyone.
    trusted_proxy: str | None = None
    proxy_user_header: str | None = None
    proxy_groups_header: str | None = None
    # `opsgate server`: failed authentications a peer address may make per window
    auth_failure_limit: int = 30
    auth_failure_window: float = 60.0
    # The Ed25519 private key (PEM) that signs audit checkpoints: workers and the server
    # hold it, people and agents never do.
    audit_key: Path | None = None
    # Preconditions, then the policy, must answer within this; past it: a deny.
    decision_deadline: float = 5.0
    # Notifications from `opsgate server` (docs: README "Notifications")
    webhook_url: str | None = None
    webhook_secret: str | None = None  # HMAC-SHA256 key of X-Opsgate-Signature
    slack_webhook_url: str | None = None
    public_url: str | None = None  # where people reach the console, for links
    # The web console: OIDC login with this (public, PKCE) client; sessions signed with
    # the secret; cookies `Secure` when auto and public_url is https, or when true.
    console_client_id: str | None = None
    session_secret: str | None = None
    cookie_secure: str = "auto"  # auto | true | false
    # How far back a proposer's track record (policy input, trust ladder) looks.
    track_record_window: float = 90 * 86400.0

    @classmethod
    def load(
        cls,
        env: Mapping[str, str] | None = None,
        toml_path: Path | None = None,
        *,
        context: str | None = None,
        use_contexts: bool = True,
    ) -> Settings:
        """Defaults, then opsgate.toml, then the user's context (`--context`,
        OPSGATE_CONTEXT or the config file's current-context), then OPSGATE_* variables."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        named = env.get("OPSGATE_CONFIG") or None
        path = toml_path or (Path(named) if named else None)
        if path is not None and path.is_file():
            try:
                document = tomllib.loads(path.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{path}: {exc}") from exc
            from_file = document.get("opsgate", document)
            if not isinstance(from_file, dict):
                raise ConfigError(f"{path}: expected a table of settings")
            refused = sorted(IDENTITY_SETTINGS & set(from_file))
            if refused:
                raise ConfigError(
                    f"{path}: {refused[0]!r} is an identity setting; it is read from the "
                    "environment only, never from a file"
                )
            values.update(from_file)
        if use_contexts:
            from opsgate.contexts import selected

            values.update(selected(env, context))
        names = {f.name for f in fields(cls)}
        for name in names:
            key = f"OPSGATE_{name.upper()}"
            if key in env:
                values[name] = env[key]
        unknown = set(values) - names
        if unknown:
            raise ConfigError(f"unknown setting {sorted(unknown)[0]!r} in {path}")
        return cls().with_overrides(values)

    def with_overrides(self, values: Mapping[str, Any]) -> Settings:
        converted: dict[str, Any] = {}
        for name, value in values.items():
            if name in {"catalog", "policies", "shadow_policies", "audit_key"}:
                converted[name] = Path(str(value))
            elif name == "policy_engine":
                if value not in {"embedded", "opa-embedded", "opa"}:
                    raise ConfigError(
                        "OPSGATE_POLICY_ENGINE: expected embedded, opa-embedded or opa"
                    )
                converted[name] = value
            elif name == "opa_mode":
                if value not in {"push", "external"}:
                    raise ConfigError("OPSGATE_OPA_MODE: expected push or external")
                converted[name] = value
            elif name == "catalog_strict":
                text = str(value).strip().lower()
                if text not in {"1", "0", "true", "false", "yes", "no"}:
                    raise ConfigError("OPSGATE_CATALOG_STRICT: expected true or false")
                converted[name] = text in {"1", "true", "yes"}
            elif name in {
                "approval_ttl",
                "prometheus_timeout",
                "prometheus_scrape_interval",
                "lease",
                "opa_timeout",
                "decision_deadline",
                "policy_timeout",
                "auth_failure_window",
                "track_record_window",
            }:
                try:
                    from opsgate.models import parse_duration  # pydantic: only when needed

                    converted[name] = parse_duration(value)
                except ValueError as exc:
                    raise ConfigError(f"OPSGATE_{name.upper()}: {exc}") from exc
                if converted[name] <= 0:
                    raise ConfigError(f"OPSGATE_{name.upper()}: must be positive")
                low, high = _DURATION_BOUNDS.get(name, (0.0, MAX_SETTING_DURATION))
                if not low <= converted[name] <= high:
                    raise ConfigError(
                        f"OPSGATE_{name.upper()}: expected {low:g}s to {high / 86400:g}d"
                    )
            elif name == "oidc_leeway":
                from opsgate.models import parse_duration

                try:
                    converted[name] = parse_duration(value)
                except ValueError as exc:
                    raise ConfigError(f"OPSGATE_OIDC_LEEWAY: {exc}") from exc
                if converted[name] > 300:
                    raise ConfigError("OPSGATE_OIDC_LEEWAY: at most 5m")
            elif name == "worker_concurrency":
                try:
                    converted[name] = int(value)
                except (TypeError, ValueError):
                    raise ConfigError("OPSGATE_WORKER_CONCURRENCY: expected a number") from None
                if not 1 <= converted[name] <= 256:
                    raise ConfigError("OPSGATE_WORKER_CONCURRENCY: expected 1 to 256")
            elif name == "auth_failure_limit":
                try:
                    converted[name] = int(value)
                except (TypeError, ValueError):
                    raise ConfigError("OPSGATE_AUTH_FAILURE_LIMIT: expected a number") from None
                if not 1 <= converted[name] <= 1_000_000:
                    raise ConfigError("OPSGATE_AUTH_FAILURE_LIMIT: expected 1 to 1000000")
            elif name == "identity":
                if value not in {"os", "postgres", "env"}:
                    raise ConfigError("OPSGATE_IDENTITY: expected os, postgres or env")
                converted[name] = value
            elif name == "cookie_secure":
                if str(value) not in {"auto", "true", "false"}:
                    raise ConfigError("OPSGATE_COOKIE_SECURE: expected auto, true or false")
                converted[name] = str(value)
            elif name == "user_kind":
                if value not in {"human", "agent"}:
                    raise ConfigError("OPSGATE_USER_KIND: expected human or agent")
                converted[name] = value
            else:
                converted[name] = str(value)
        return replace(self, **converted)
