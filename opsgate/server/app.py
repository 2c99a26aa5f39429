"""The /api/v1 ASGI app: authenticate, then call the same Gate the CLI calls.

Identity comes from the bearer credential, or from a proxy's header only when the TCP
peer is a proxy the operator configured (OPSGATE_TRUSTED_PROXY); from anyone else such
headers (X-Forwarded-User, X-Remote-User, ...) are ignored and counted as spoof attempts.
A peer that keeps failing to authenticate is answered 429 for a while.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from opsgate import __version__
from opsgate.app import App
from opsgate.auth.oidc import OidcSettings, OidcVerifier, looks_like_jwt
from opsgate.auth.principal import Principal, Unauthenticated
from opsgate.auth.tokens import authenticate_token
from opsgate.catalog import Catalog
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
from opsgate.server.boundary import (
    FailureLimiter,
    InvalidProxyIdentity,
    RateLimited,
    TrustedProxy,
    asserted_headers,
)
from opsgate.server.execution import ServerExecutor
from opsgate.server.openapi import openapi_document
from opsgate.server.reads import Reads, flag, query_params
from opsgate.store.base import StoreError
from opsgate.views import (
    action_json,
    approval_json,
    catalog_json,
    decision_json,
    details_json,
    trust_reset_json,
)

log = logging.getLogger("opsgate.server")

API = "/api/v1"
MAX_BODY_BYTES = 1_000_000
MAX_AUTHORIZATION_BYTES = 8192

# HTTP status per error class; the client maps them back to the same exceptions, so a
# command exits with the same code whether it ran locally or through the API.
STATUS: list[tuple[type[OpsgateError], int, str]] = [
    (RateLimited, 429, "rate_limited"),
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
        self.rate_limited = Counter(
            "opsgate_api_auth_rate_limited",
            "Requests answered 429: their peer failed to authenticate too often.",
            registry=self.registry,
        )
        self.proxy_spoofs = Counter(
            "opsgate_api_proxy_header_spoofs",
            "Requests with an identity header from a peer that is not a trusted proxy "
            "(the header was ignored).",
            registry=self.registry,
        )
        self.requests = Counter(
            "opsgate_api_requests",
            "API requests by operation and HTTP status.",
            ["operation", "status"],
            registry=self.registry,
        )

    def watch_catalog(self, app: App) -> None:
        self.registry.register(_CatalogReloads(app))


class _CatalogReloads:
    """The app's count of catalog edits that did not load, read at scrape time."""

    def __init__(self, app: App) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "opsgate_catalog_reload_failures",
            "Catalog edits that did not load (the last good catalog is still served).",
            value=self.app.catalogs.failures,
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


RESET_FIELDS = ("proposer", "action_type", "reason")


def reset_body(body: Any) -> dict[str, str]:
    """The three strings of a trust reset. Anything else is refused, naming it: a body
    cannot say who resets (`reset_by`, `actor`), the token does."""
    if not isinstance(body, dict):
        raise InvalidInput("body", "expected a JSON object")
    unknown = sorted(str(name) for name in set(body) - set(RESET_FIELDS))
    if unknown:
        raise InvalidInput(unknown[0][:64], f"unknown field (allowed: {', '.join(RESET_FIELDS)})")
    out: dict[str, str] = {}
    for name in RESET_FIELDS:
        if name not in body:
            raise InvalidInput(name, "required")
        value = body[name]
        if not isinstance(value, str):
            raise InvalidInput(name, "expected a string")
        out[name] = value
    return out


def precise(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds")


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
    """Endpoints over the App (store, catalog, engine, gate): the same ones the CLI uses."""

    def __init__(
        self,
        app: App,
        metrics: Metrics,
        oidc: OidcVerifier | None = None,
        *,
        proxy: TrustedProxy | None = None,
        limiter: FailureLimiter | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.oidc = oidc
        self.proxy = proxy
        settings = app.settings
        self.limiter = limiter or FailureLimiter(
            settings.auth_failure_limit, settings.auth_failure_window
        )
        self.executor = ServerExecutor(app)
        self.reads = Reads(app)

    @property
    def catalog(self) -> Catalog | None:
        try:
            return self.app.catalog()
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
            return authenticate_token(self.app.store, token)
        except Unauthenticated:
            self.metrics.auth_failures.labels("invalid").inc()
            raise

    def asserted(self, request: Request, peer: str) -> Principal | None:
        """The principal a trusted proxy asserts for this request, if any. The same
        headers from any other peer are ignored, and counted."""
        if asserted_headers(request.headers, self.proxy):
            if self.proxy is not None and self.proxy.trusts(peer):
                return self.proxy.principal(peer, request.headers)
            self.metrics.proxy_spoofs.inc()
            log.warning("identity header from %s, not a trusted proxy: ignored", peer)
        return None

    def route(self, operation: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        def authenticated(
            asserted: Principal | None, token: str | None, params: dict[str, str], raw: bytes | None
        ) -> Any:
            # One trip to the thread pool per request: authenticate, then the gate.
            principal = asserted if asserted is not None else self.authenticate_token(token or "")
            return handler(principal, params, raw)

        async def endpoint(request: Request) -> Response:
            status, body = 200, None
            headers: dict[str, str] | None = None
            # The TCP peer: uvicorn runs without proxy_headers, so no header moves it.
            peer = request.client.host if request.client is not None else ""
            try:
                wait = self.limiter.retry_after(peer)
                if wait is not None:
                    self.metrics.rate_limited.inc()
                    raise RateLimited(wait)
                asserted = self.asserted(request, peer)
                # no credentials: 401 before reading a byte
                token = None if asserted is not None else self.bearer(request)
                raw = await read_body(request) if request.method == "POST" else b""
                params = {**request.path_params, "?": request.url.query}
                status, body = await run_in_threadpool(authenticated, asserted, token, params, raw)
            except OpsgateError as exc:
                if isinstance(exc, InvalidProxyIdentity):
                    self.metrics.auth_failures.labels("proxy").inc()
                elif isinstance(exc, Unauthenticated):
                    self.limiter.failure(peer)
                if isinstance(exc, RateLimited):
                    headers = {"Retry-After": str(exc.retry_after)}
                status, body = error_body(exc)
            except StoreError as exc:
                log.error("store error in %s: %s", operation, exc)
                status, body = 503, {"error": {"type": "store", "message": "store unavailable"}}
            except Exception:  # never a traceback or internal detail to the caller
                log.exception("unexpected error in %s", operation)
                status, body = 500, {"error": {"type": "error", "message": "internal error"}}
            self.metrics.requests.labels(operation, str(status)).inc()
            if status == 401:
                headers = {"WWW-Authenticate": 'Bearer realm="opsgate"'}
            return JSONResponse(body, status_code=status, headers=headers)

        return endpoint

    # --- endpoints (in a worker thread) -------------------------------------------

    def whoami(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        return 200, principal.as_json()

    def propose(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        outcome = self.app.gate.propose(parse_json(raw), principal)
        return (200 if outcome.existing else 201), {
            "action": action_json(outcome.action, self.catalog),
            "decision": decision_json(outcome.decision),
            "existing": outcome.existing,
        }

    def queue(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        # Only what the bundle's authz lets this principal read (agents: their own).
        catalog = self.catalog
        if flag(query_params(params.get("?", "")), "mine_to_approve"):
            found = self.reads.mine_to_approve(principal)
        else:
            found = self.app.gate.queue(principal)
        return 200, [action_json(a, catalog) for a in found]

    def report(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        return 200, self.reads.report(principal, params["kind"], params.get("?", ""))

    def audit_verify(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        return 200, self.reads.audit_verify(principal, parse_json(raw))

    def audit_decisions(
        self, principal: Principal, params: dict[str, str], raw: bytes | None
    ) -> Any:
        return 200, self.reads.audit_decisions(principal, params.get("?", ""))

    def workers(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        return 200, self.reads.workers(principal, params.get("?", ""))

    def resolve(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        return 200, self.reads.resolve(principal, params.get("?", ""))

    def show(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        self.app.gate.expire_due()
        details = self.app.gate.details(params["action_id"], principal)
        return 200, details_json(details, self.catalog)

    def approve(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        comment = text_field(parse_json(raw), "comment")
        outcome = self.app.gate.approve(params["action_id"], principal, comment)
        return 200, {
            "action": action_json(outcome.action, self.catalog),
            "approvals": [approval_json(a) for a in outcome.approvals],
            "counted": outcome.counted,
        }

    def reject(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        reason = text_field(parse_json(raw), "reason", required=True)
        action = self.app.gate.reject(params["action_id"], principal, reason)
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
        return 200, catalog_json(self.app.catalog())

    def policy(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        engine = self.app.engine
        return 200, {"bundle_revision": engine.revision(), "engine": engine.name}

    def my_actions(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        query = params.get("?", "")
        states = _states_param(query)
        limit = _limit_param(query)
        self.app.gate.expire_due()
        found = self.app.store.list_actions(states=states, proposer_id=principal.id, limit=limit)
        return 200, [action_json(a, self.catalog) for a in found]

    def cancel(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        reason = text_field(parse_json(raw), "reason")
        action = self.app.gate.cancel(params["action_id"], principal, reason)
        return 200, action_json(action, self.catalog)

    def trust_reset(self, principal: Principal, params: dict[str, str], raw: bytes | None) -> Any:
        """`opsgate trust reset`: who resets is the authenticated principal, never a field."""
        from opsgate.trust import reset

        body = reset_body(parse_json(raw))
        record = reset(
            self.app.gate, body["proposer"], body["action_type"], body["reason"], principal
        )
        return 201, {**trust_reset_json(record), "at_precise": precise(record.at)}


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


def create_app(app: App, metrics: Metrics | None = None) -> Starlette:
    metrics = metrics or Metrics()
    metrics.watch_catalog(app)
    settings = app.settings
    oidc = oidc_settings(settings)
    proxy = TrustedProxy.from_settings(
        settings.trusted_proxy, settings.proxy_user_header, settings.proxy_groups_header
    )
    api = Api(app, metrics, OidcVerifier(oidc) if oidc is not None else None, proxy=proxy)
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
        Route(API + "/reports/{kind:str}", api.route("report", api.report), methods=["GET"]),
        Route(API + "/audit/verify", api.route("audit_verify", api.audit_verify), methods=["POST"]),
        Route(
            API + "/audit/decisions",
            api.route("audit_decisions", api.audit_decisions),
            methods=["GET"],
        ),
        Route(API + "/workers", api.route("workers", api.workers), methods=["GET"]),
        Route(API + "/trust/reset", api.route("trust_reset", api.trust_reset), methods=["POST"]),
        Route(API + "/resolve", api.route("resolve", api.resolve), methods=["GET"]),
    ]
    routes += console_routes(app, oidc, api.oidc)
    notifier = Notifier(
        app.store, NotifySettings.from_settings(app.settings), NotifyMetrics(metrics.registry)
    )
    asgi = Starlette(routes=routes)
    asgi.state.start = notifier.start  # `opsgate server` calls it once it serves

    def close() -> None:  # `opsgate server` calls it when it stops
        notifier.stop()
        api.executor.close()

    asgi.state.close = close
    return asgi


def console_routes(
    app: App, oidc: OidcSettings | None, verifier: OidcVerifier | None
) -> list[Route]:
    from opsgate.server.console.views import Console, ConsoleSettings

    settings = app.settings
    secret = settings.session_secret.encode("utf-8") if settings.session_secret else None
    if secret is not None and len(secret) < 32:
        raise ConfigError("OPSGATE_SESSION_SECRET: at least 32 characters")
    console = Console(
        app,
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
