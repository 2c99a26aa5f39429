"""The /api/v1 ASGI app: authenticate, then call the same Gate the CLI calls.

Identity comes only from the bearer credential. Headers a proxy might set
(X-Forwarded-User, X-Remote-User, ...) are never read.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from opsgate import __version__
from opsgate.auth.oidc import OidcSettings, OidcVerifier, looks_like_jwt
from opsgate.auth.principal import Principal, Unauthenticated
from opsgate.auth.tokens import authenticate_token
from opsgate.catalog import Catalog, action_type_json
from opsgate.cli.context import CliConfig
from opsgate.cli.render import action_json, approval_json, decision_json, details_json
from opsgate.config import Settings
from opsgate.errors import (
    ConfigError,
    InvalidInput,
    NotFound,
    OpsgateError,
    Refused,
    StateConflict,
)
from opsgate.models import ActionState
from opsgate.notify.delivery import Notifier, NotifyMetrics, NotifySettings
from opsgate.server.execution import ServerExecutor
from opsgate.server.openapi import openapi_document
from opsgate.store.base import StoreError

log = logging.getLogger("opsgate.server")

API = "/api/v1"
MAX_BODY_BYTES = 1_000_000
MAX_AUTHORIZATION_BYTES = 8192

# HTTP status per error class; the client maps them back to the same exceptions, so a
# command exits with the same code whether it ran locally or through the API.
STATUS: list[tuple[type[OpsgateError], int, str]] = [
    (Unauthenticated, 401, "unauthenticated"),
    (InvalidInput, 400, "invalid_input"),
    (Refused, 403, "refused"),
    (NotFound, 404, "not_found"),
    (StateConflict, 409, "conflict"),
    (ConfigError, 500, "server_config"),
]


class Metrics:
    """What the server counts; failed authentications are the one to alert on."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.auth_failures = Counter(
            "opsgate_api_auth_failures",
            "Requests refused for missing or invalid credentials.",
            ["reason"],
            registry=self.registry,
        )
        self.requests = Counter(
            "opsgate_api_requests",
            "API requests by operation and HTTP status.",
            ["operation", "status"],
            registry=self.registry,
        )


def error_body(exc: OpsgateError) -> tuple[int, dict[str, Any]]:
    for cls, status, kind in STATUS:
        if isinstance(exc, cls):
            body: dict[str, Any] = {"type": kind, "message": str(exc)}
            if isinstance(exc, InvalidInput):
                body["field"] = exc.field
            if isinstance(exc, Refused):
                body["codes"] = exc.codes
            return status, {"error": body}
    return 500, {"error": {"type": "error", "message": str(exc)}}


def bearer(request: Request) -> str:
    """The bearer token of the Authorization header, or Unauthenticated."""
    header = request.headers.get("authorization")
    if header is None:
        raise Unauthenticated("missing credentials: send Authorization: Bearer TOKEN")
    if len(header) > MAX_AUTHORIZATION_BYTES:
        raise Unauthenticated("invalid or expired credentials")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthenticated("invalid or expired credentials")
    return value.strip()


async def read_body(request: Request) -> bytes | None:
    """The raw body, or None when it is over MAX_BODY_BYTES (refused after authentication,
    so a caller without credentials always gets 401)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes | None) -> Any:
    """The JSON body; oversized or malformed is InvalidInput naming `body`."""
    if raw is None:
        raise InvalidInput("body", f"larger than {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidInput("body", f"not valid JSON: {str(exc)[:200]}") from None


def text_field(body: Any, name: str, *, required: bool = False) -> str:
    if not isinstance(body, dict):
        raise InvalidInput("body", "expected a JSON object")
    value = body.get(name, "")
    if not isinstance(value, str):
        raise InvalidInput(name, "expected a string")
    if required and not value.strip():
        raise InvalidInput(name, "required")
    return value


# A handler runs in a worker thread (the gate and the store are synchronous), once the
# caller is authenticated, with the path parameters and the raw body.
# The query string travels as params["?"].
Handler = Callable[[Principal, dict[str, str], bytes | None], tuple[int, Any]]

MAX_LIST = 5000


def _query(query: str) -> dict[str, list[str]]:
    if len(query) > 4096:
        raise InvalidInput("query", "longer than 4096 characters")
    try:
        return urllib.parse.parse_qs(query, strict_parsing=False, max_num_fields=64)
    except ValueError as exc:
        raise InvalidInput("query", str(exc)) from None


def _states_param(query: str) -> list[ActionState] | None:
    values = _query(query).get("state")
    if not values:
        return None
    try:
        return [ActionState(v) for v in values]
    except ValueError:
        raise InvalidInput(
            "state", f"expected one of {', '.join(s.value for s in ActionState)}"
        ) from None


def _limit_param(query: str) -> int:
    values = _query(query).get("limit")
    if not values:
        return 100
    if not values[-1].isdigit() or not 1 <= int(values[-1]) <= MAX_LIST:
        raise InvalidInput("limit", f"expected 1 to {MAX_LIST}")
    return int(values[-1])


class Api:
    """Endpoints over one CliConfig (store, catalog, engine, gate)."""

    def __init__(
        self, config: CliConfig, metrics: Metrics, oidc: OidcVerifier | None = None
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.oidc = oidc
        self.executor = ServerExecutor(config)

    @property
    def catalog(self) -> Catalog | None:
        try:
            return self.config.catalog
        except InvalidInput:  # history stays readable when today's catalog does not load
            return None

    def bearer(self, request: Request) -> str:
        try:
            return bearer(request)
        except Unauthenticated as exc:
            reason = "missing" if "missing" in str(exc) else "invalid"
            self.metrics.auth_failures.labels(reason).inc()
            raise

    def authenticate_token(self, token: str) -> Principal:
        try:
            if self.oidc is not None and looks_like_jwt(token):
                return self.oidc.verify(token)
            return authenticate_token(self.config.store, token)
        except Unauthenticated:
            self.metrics.auth_failures.labels("invalid").inc()
            raise

    def route(self, operation: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        def authenticated(token: str, params: dict[str, str], raw: bytes | None) -> Any:
            # One trip to the thread pool per request: authenticate, then the gate.
            return handler(self.authenticate_token(token), params, raw)

        async def endpoint(request: Request) -> Response:
            status, body = 200, None
            try:
                token = self.bearer(request)  # no credentials: 401 before reading a byte
                raw = await read_body(request) if request.method == "POST" else b""
                params = {**request.path_params, "?": request.url.query}
                status, body = await run_in_threadpool(authenticated, token, params, raw)
            except OpsgateError as exc:
                status, body = error_body(exc)
            except StoreError as exc:
                log.error("store error in %s: %s", operation, exc)
                status, body = 503, {"error": {"type": "store", "message": "store unavailable"}}
            except Exception:  # never a traceback or internal detail to the caller
                log.exception("unexpected error in %s", operation)
                status, body = 500, {"error": {"type": "error", "message": "internal error"}}
            self.metrics.requests.labels(operation, str(status)).inc()
            headers = {"WWW-Authenticate": 'Bearer realm="opsgate"'} if status == 401 else None
            return JSONResponse(body, status_code=status, headers=headers)

        return endpoint

    # --- endpoints (in a worker thread) -------------------------------------------

    def whoami(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        return 200, principal.as_json()

    def propose(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        outcome = self.config.gate.propose(parse_json(raw), principal)
        return (200 if outcome.existing else 201), {
            "action": action_json(outcome.action, self.catalog),
            "decision": decision_json(outcome.decision),
            "existing": outcome.existing,
        }

    def queue(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        # Only what the bundle's authz lets this principal read (agents: their own).
        catalog = self.catalog
        return 200, [action_json(a, catalog) for a in self.config.gate.queue(principal)]

    def show(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        self.config.gate.expire_due()
        details = self.config.gate.details(params["action_id"], principal)
        return 200, details_json(details, self.catalog)

    def approve(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        comment = text_field(parse_json(raw), "comment")
        outcome = self.config.gate.approve(params["action_id"], principal, comment)
        return 200, {
            "action": action_json(outcome.action, self.catalog),
            "approvals": [approval_json(a) for a in outcome.approvals],
            "counted": outcome.counted,
        }

    def reject(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        reason = text_field(parse_json(raw), "reason", required=True)
        action = self.config.gate.reject(params["action_id"], principal, reason)
        return 200, action_json(action, self.catalog)

    def run(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        action = self.executor.run(principal, params["action_id"])
        return 202, action_json(action, self.catalog)

    def rollback(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        reason = text_field(parse_json(raw), "reason", required=True)
        action = self.executor.rollback(principal, params["action_id"], reason)
        return 202, action_json(action, self.catalog)

    def catalog_document(
        self, principal: Principal, params: dict[str, str], raw: bytes | None
    ) -> Any:
        catalog = self.config.catalog
        return 200, {
            "catalog_revision": catalog.revision,
            "action_types": [action_type_json(t) for t in catalog],
        }

    def policy(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        engine = self.config.engine
        return 200, {"bundle_revision": engine.revision(), "engine": engine.name}

    def my_actions(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        query = params.get("?", "")
        states = _states_param(query)
        limit = _limit_param(query)
        self.config.gate.expire_due()
        found = self.config.store.list_actions(states=states, proposer_id=principal.id, limit=limit)
        return 200, [action_json(a, self.catalog) for a in found]

    def cancel(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        reason = text_field(parse_json(raw), "reason")
        action = self.config.gate.cancel(params["action_id"], principal, reason)
        return 200, action_json(action, self.catalog)


def oidc_settings(settings: Settings) -> OidcSettings | None:
    if settings.oidc_issuer is None and settings.oidc_audience is None:
        return None
    if not settings.oidc_issuer or not settings.oidc_audience:
        raise ConfigError("OIDC needs both OPSGATE_OIDC_ISSUER and OPSGATE_OIDC_AUDIENCE")
    return OidcSettings(
        issuer=settings.oidc_issuer,
        audience=settings.oidc_audience,
        user_claim=settings.oidc_user_claim,
        groups_claim=settings.oidc_groups_claim,
        leeway=settings.oidc_leeway,
        client_id=settings.oidc_client_id,
        scopes=settings.oidc_scopes,
    )


def create_app(config: CliConfig, metrics: Metrics | None = None) -> Starlette:
    metrics = metrics or Metrics()
    oidc = oidc_settings(config.settings)
    api = Api(config, metrics, OidcVerifier(oidc) if oidc is not None else None)
    document = openapi_document(__version__)

    async def openapi(_request: Request) -> Response:
        return JSONResponse(document)

    async def auth_config(_request: Request) -> Response:
        # Public: how to get a credential (`opsgate login`); no secret in it.
        return JSONResponse({"oidc": oidc.public() if oidc is not None else None})

    async def health(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def prometheus(_request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    action = API + "/actions/{action_id:str}"
    routes = [
        Route(API + "/openapi.json", openapi, methods=["GET"]),
        Route("/healthz", health, methods=["GET"]),
        Route(API + "/auth", auth_config, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route(API + "/whoami", api.route("whoami", api.whoami), methods=["GET"]),
        Route(API + "/actions", api.route("propose", api.propose), methods=["POST"]),
        Route(API + "/queue", api.route("queue", api.queue), methods=["GET"]),
        Route(action, api.route("show", api.show), methods=["GET"]),
        Route(action + "/approve", api.route("approve", api.approve), methods=["POST"]),
        Route(action + "/reject", api.route("reject", api.reject), methods=["POST"]),
        Route(action + "/cancel", api.route("cancel", api.cancel), methods=["POST"]),
        Route(action + "/run", api.route("run", api.run), methods=["POST"]),
        Route(action + "/rollback", api.route("rollback", api.rollback), methods=["POST"]),
        Route(API + "/catalog", api.route("catalog", api.catalog_document), methods=["GET"]),
        Route(API + "/policy", api.route("policy", api.policy), methods=["GET"]),
        Route(API + "/my-actions", api.route("my_actions", api.my_actions), methods=["GET"]),
    ]
    routes += console_routes(config, oidc, api.oidc)
    notifier = Notifier(
        config.store, NotifySettings.from_settings(config.settings), NotifyMetrics(metrics.registry)
    )
    app = Starlette(routes=routes)
    app.state.start = notifier.start  # `opsgate server` calls it once it serves

    def close() -> None:  # `opsgate server` calls it when it stops
        notifier.stop()
        api.executor.close()

    app.state.close = close
    return app


def console_routes(
    config: CliConfig, oidc: OidcSettings | None, verifier: OidcVerifier | None
) -> list[Route]:
    from opsgate.server.console.views import Console, ConsoleSettings

    settings = config.settings
    secret = settings.session_secret.encode("utf-8") if settings.session_secret else None
    if secret is not None and len(secret) < 32:
        raise ConfigError("OPSGATE_SESSION_SECRET: at least 32 characters")
    console = Console(
        config,
        ConsoleSettings(
            oidc=oidc,
            client_id=settings.console_client_id,
            public_url=settings.public_url,
            cookie_secure=settings.cookie_secure,
        ),
        verifier,
        secret,
    )
    return console.routes()
