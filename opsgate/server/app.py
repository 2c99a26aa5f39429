"""The /api/v1 ASGI app: authenticate, then call the same Gate the CLI calls.

Identity comes only from the bearer credential. Headers a proxy might set
(X-Forwarded-User, X-Remote-User, ...) are never read.
"""

from __future__ import annotations

import json
import logging
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
from opsgate.auth.principal import Principal, Unauthenticated
from opsgate.auth.tokens import authenticate_token
from opsgate.catalog import Catalog
from opsgate.cli.context import CliConfig
from opsgate.cli.render import action_json, approval_json, decision_json, details_json
from opsgate.errors import (
    ConfigError,
    InvalidInput,
    NotFound,
    OpsgateError,
    Refused,
    StateConflict,
)
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


async def read_json(request: Request) -> Any:
    """The JSON body, at most MAX_BODY_BYTES; malformed is InvalidInput naming `body`."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise InvalidInput("body", f"larger than {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise InvalidInput("body", f"larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
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


Handler = Callable[[Request, Principal], Awaitable[Any]]


class Api:
    """Endpoints over one CliConfig (store, catalog, engine, gate)."""

    def __init__(self, config: CliConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics

    @property
    def catalog(self) -> Catalog | None:
        try:
            return self.config.catalog
        except InvalidInput:  # history stays readable when today's catalog does not load
            return None

    def authenticate(self, request: Request) -> Principal:
        try:
            return authenticate_token(self.config.store, bearer(request))
        except Unauthenticated as exc:
            reason = "missing" if "missing" in str(exc) else "invalid"
            self.metrics.auth_failures.labels(reason).inc()
            raise

    def route(self, operation: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            status, body = 200, None
            try:
                principal = await run_in_threadpool(self.authenticate, request)
                status, body = await handler(request, principal)
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

    # --- endpoints ------------------------------------------------------------------

    async def whoami(self, request: Request, principal: Principal) -> tuple[int, Any]:
        return 200, principal.as_json()

    async def propose(self, request: Request, principal: Principal) -> tuple[int, Any]:
        document = await read_json(request)
        outcome = await run_in_threadpool(self.config.gate.propose, document, principal)
        return (200 if outcome.existing else 201), {
            "action": action_json(outcome.action, self.catalog),
            "decision": decision_json(outcome.decision),
            "existing": outcome.existing,
        }

    async def queue(self, request: Request, principal: Principal) -> tuple[int, Any]:
        # Only what the bundle's authz lets this principal read (agents: their own).
        actions = await run_in_threadpool(self.config.gate.queue, principal)
        catalog = self.catalog
        return 200, [action_json(a, catalog) for a in actions]

    def _details(self, action_id: str, principal: Principal) -> Any:
        self.config.gate.expire_due()
        return details_json(self.config.gate.details(action_id, principal), self.catalog)

    async def show(self, request: Request, principal: Principal) -> tuple[int, Any]:
        return 200, await run_in_threadpool(
            self._details, request.path_params["action_id"], principal
        )

    async def approve(self, request: Request, principal: Principal) -> tuple[int, Any]:
        comment = text_field(await read_json(request), "comment")
        outcome = await run_in_threadpool(
            self.config.gate.approve, request.path_params["action_id"], principal, comment
        )
        return 200, {
            "action": action_json(outcome.action, self.catalog),
            "approvals": [approval_json(a) for a in outcome.approvals],
            "counted": outcome.counted,
        }

    async def reject(self, request: Request, principal: Principal) -> tuple[int, Any]:
        reason = text_field(await read_json(request), "reason", required=True)
        action = await run_in_threadpool(
            self.config.gate.reject, request.path_params["action_id"], principal, reason
        )
        return 200, action_json(action, self.catalog)

    async def cancel(self, request: Request, principal: Principal) -> tuple[int, Any]:
        reason = text_field(await read_json(request), "reason")
        action = await run_in_threadpool(
            self.config.gate.cancel, request.path_params["action_id"], principal, reason
        )
        return 200, action_json(action, self.catalog)


def create_app(config: CliConfig, metrics: Metrics | None = None) -> Starlette:
    metrics = metrics or Metrics()
    api = Api(config, metrics)
    document = openapi_document(__version__)

    async def openapi(_request: Request) -> Response:
        return JSONResponse(document)

    async def health(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def prometheus(_request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    action = API + "/actions/{action_id:str}"
    routes = [
        Route(API + "/openapi.json", openapi, methods=["GET"]),
        Route("/healthz", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route(API + "/whoami", api.route("whoami", api.whoami), methods=["GET"]),
        Route(API + "/actions", api.route("propose", api.propose), methods=["POST"]),
        Route(API + "/queue", api.route("queue", api.queue), methods=["GET"]),
        Route(action, api.route("show", api.show), methods=["GET"]),
        Route(action + "/approve", api.route("approve", api.approve), methods=["POST"]),
        Route(action + "/reject", api.route("reject", api.reject), methods=["POST"]),
        Route(action + "/cancel", api.route("cancel", api.cancel), methods=["POST"]),
    ]
    return Starlette(routes=routes)
