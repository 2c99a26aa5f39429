"""Console pages: the queue, an action (approve / reject through the same Gate calls as the
API), its live measurements, the governance report and the audit chain's status.

Every page needs a session from an OIDC login (authorization code + PKCE); every form post
needs the session's CSRF token. Templates are autoescaped: whatever a proposer wrote
renders as text.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from opsgate.app import App
from opsgate.audit import verify_chain
from opsgate.auth.oidc import OidcSettings, OidcVerifier, discover
from opsgate.auth.principal import Principal, Unauthenticated
from opsgate.catalog import Catalog
from opsgate.errors import InvalidInput, NotFound, OpsgateError, Refused, StateConflict
from opsgate.models import Action, ActionState, Approval
from opsgate.server.console.session import (
    LOGIN_COOKIE,
    LOGIN_TTL,
    SESSION_COOKIE,
    SESSION_TTL,
    CookieSigner,
    Session,
    csrf_ok,
    new_session,
    pkce_pair,
    session_from,
)
from opsgate.store.base import StoreError
from opsgate.views import masked, ts

log = logging.getLogger("opsgate.console")

HERE = Path(__file__).parent
PREFIX = "/console"
MAX_FORM_BYTES = 64 * 1024
RUNNING = {ActionState.EXECUTING, ActionState.VERIFYING, ActionState.ROLLING_BACK}
# default-src 'self' covers scripts, styles, images, fonts and fetches: nothing from
# another origin, no inline script, and no framing of the console by another site.
CSP = (
    "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; "
    "object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}
STATIC = {"console.js": "text/javascript", "console.css": "text/css"}
# Where a login may return to: console paths only, no dot segments (no way out of /console).
SAFE_NEXT = re.compile(r"^/console(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*/?$")


@dataclass(frozen=True)
class ConsoleSettings:
    oidc: OidcSettings | None
    client_id: str | None
    public_url: str | None
    cookie_secure: str  # auto | true | false


class Console:
    def __init__(
        self,
        app: App,
        settings: ConsoleSettings,
        verifier: OidcVerifier | None,
        secret: bytes | None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.verifier = verifier
        if secret is None:
            # Sessions then end with the process: safe, only less convenient.
            log.warning("OPSGATE_SESSION_SECRET is not set: console sessions end at restart")
            secret = secrets.token_bytes(32)
        self.signer = CookieSigner(secret)
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )
        self.templates.filters["ts"] = ts

    @property
    def enabled(self) -> bool:
        return self.verifier is not None and bool(self.settings.client_id)

    @property
    def catalog(self) -> Catalog | None:
        try:
            return self.app.catalog()
        except InvalidInput:
            return None

    # --- plumbing ------------------------------------------------------------------

    def _secure(self, request: Request) -> bool:
        if self.settings.cookie_secure != "auto":
            return self.settings.cookie_secure == "true"
        base = self.settings.public_url or str(request.base_url)
        return base.startswith("https://")

    def _base(self, request: Request) -> str:
        return (self.settings.public_url or str(request.base_url)).rstrip("/")

    def page(
        self, name: str, status: int = 200, session: Session | None = None, **context: Any
    ) -> HTMLResponse:
        body = self.templates.get_template(name).render(
            viewer=session.principal if session else None,
            csrf=session.csrf if session else "",
            prefix=PREFIX,
            **context,
        )
        return HTMLResponse(body, status_code=status, headers=SECURITY_HEADERS)

    def session(self, request: Request) -> Session | None:
        return session_from(self.signer.load(SESSION_COOKIE, request.cookies.get(SESSION_COOKIE)))

    def _login_redirect(self, request: Request) -> Response:
        target = request.url.path if SAFE_NEXT.match(request.url.path) else PREFIX
        query = urllib.parse.urlencode({"next": target})
        return RedirectResponse(f"{PREFIX}/login?{query}", 303, headers=SECURITY_HEADERS)

    def view(
        self, handler: Callable[[Request, Session, dict[str, str]], Response], *, post: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        """Session (and CSRF on posts) first; the handler runs in a worker thread."""

        async def endpoint(request: Request) -> Response:
            if not self.enabled:
                return self.page("disabled.html", 503)
            session = self.session(request)
            if session is None:
                if post or request.url.path.endswith(".json"):
                    return self.page("error.html", 401, message="not signed in")
                return self._login_redirect(request)
            form: dict[str, str] = {}
            if post:
                parsed = await read_form(request)
                if parsed is None:
                    return self.page("error.html", 413, session, message="form too large")
                form = parsed
                if not csrf_ok(session, form.get("csrf")):
                    # A cross-site post carries the cookie but cannot know the token.
                    return self.page(
                        "error.html", 403, session, message="missing or wrong CSRF token"
                    )
            try:
                result: Response = await run_in_threadpool(handler, request, session, form)
                return result
            except NotFound as exc:
                return self.page("error.html", 404, session, message=str(exc))
            except Unauthenticated:
                return self._login_redirect(request)
            except StoreError as exc:
                log.error("store error in the console: %s", exc)
                return self.page("error.html", 503, session, message="store unavailable")
            except OpsgateError as exc:
                return self.page("error.html", 400, session, message=str(exc))
            except Exception:  # never a traceback to the browser
                log.exception("console error")
                return self.page("error.html", 500, session, message="internal error")

        return endpoint

    # --- login ---------------------------------------------------------------------

    def _endpoints(self) -> dict[str, Any]:
        assert self.settings.oidc is not None
        return discover(self.settings.oidc.issuer, self.settings.oidc.timeout)

    async def login(self, request: Request) -> Response:
        if not self.enabled:
            return self.page("disabled.html", 503)
        wanted = request.query_params.get("next", PREFIX)
        next_path = wanted if SAFE_NEXT.match(wanted) else PREFIX  # no open redirect
        try:
            document = await run_in_threadpool(self._endpoints)
        except Unauthenticated as exc:
            return self.page("error.html", 502, message=str(exc))
        authorize = document.get("authorization_endpoint")
        if not isinstance(authorize, str) or not authorize.startswith(("https://", "http://")):
            return self.page("error.html", 502, message="the OpenID provider has no login page")
        assert self.settings.oidc is not None and self.settings.client_id
        verifier, challenge = pkce_pair()
        state = secrets.token_urlsafe(24)
        query = urllib.parse.urlencode(
            {
                "response_type": "code",
                "client_id": self.settings.client_id,
                "redirect_uri": self._base(request) + PREFIX + "/callback",
                "scope": "openid profile groups",
                "state": state,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
                "resource": self.settings.oidc.audience,
            }
        )
        response = RedirectResponse(f"{authorize}?{query}", 303, headers=SECURITY_HEADERS)
        cookie = self.signer.dump(
            LOGIN_COOKIE, {"state": state, "verifier": verifier, "next": next_path}, LOGIN_TTL
        )
        response.set_cookie(
            LOGIN_COOKIE,
            cookie,
            max_age=int(LOGIN_TTL),
            path=PREFIX,
            httponly=True,
            samesite="lax",
            secure=self._secure(request),
        )
        return response

    def _exchange(self, request: Request, code: str, verifier: str) -> Principal:
        assert self.verifier is not None and self.settings.oidc is not None
        token_url = self._endpoints().get("token_endpoint")
        if not isinstance(token_url, str):
            raise Unauthenticated("the OpenID provider has no token endpoint")
        try:
            answer = requests.post(
                token_url,
                data={
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": self._base(request) + PREFIX + "/callback",
                    "client_id": self.settings.client_id,
                    "code_verifier": verifier,
                    "resource": self.settings.oidc.audience,
                },
                timeout=self.settings.oidc.timeout,
            )
            token = answer.json().get("access_token") if answer.ok else None
        except (requests.RequestException, ValueError, AttributeError):
            token = None
        if not isinstance(token, str):
            raise Unauthenticated("the OpenID provider refused the login")
        principal = self.verifier.verify(token)  # the same checks as an API bearer token
        if principal.kind != "human":
            raise Unauthenticated("the console is for people; machines use the API")
        return principal

    async def callback(self, request: Request) -> Response:
        if not self.enabled:
            return self.page("disabled.html", 503)
        started = self.signer.load(LOGIN_COOKIE, request.cookies.get(LOGIN_COOKIE))
        state = request.query_params.get("state", "")
        code = request.query_params.get("code", "")
        if (
            started is None
            or not isinstance(started.get("state"), str)
            or not secrets.compare_digest(started["state"].encode(), state.encode())
            or not code
            or len(code) > 2048
        ):
            # Unsolicited or replayed: a login this browser did not start.
            return self.page("error.html", 400, message="login state mismatch; sign in again")
        try:
            principal = await run_in_threadpool(
                self._exchange, request, code, str(started.get("verifier", ""))
            )
        except Unauthenticated as exc:
            return self.page("error.html", 401, message=str(exc))
        next_path = str(started.get("next", PREFIX))
        response = RedirectResponse(
            next_path if SAFE_NEXT.match(next_path) else PREFIX, 303, headers=SECURITY_HEADERS
        )
        response.set_cookie(
            SESSION_COOKIE,
            self.signer.dump(SESSION_COOKIE, new_session(principal), SESSION_TTL),
            max_age=int(SESSION_TTL),
            path=PREFIX,
            httponly=True,
            samesite="lax",
            secure=self._secure(request),
        )
        response.delete_cookie(LOGIN_COOKIE, path=PREFIX)
        return response

    def logout(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        response = RedirectResponse(PREFIX + "/signed-out", 303, headers=SECURITY_HEADERS)
        response.delete_cookie(SESSION_COOKIE, path=PREFIX)
        return response

    async def signed_out(self, request: Request) -> Response:
        return self.page("signed_out.html")

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return Response("not found", 404)
        return FileResponse(
            HERE / "static" / name,
            media_type=STATIC[name],
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
        )

    # --- pages ---------------------------------------------------------------------

    def _may_approve(self, principal: Principal, action: Action, approvals: list[Approval]) -> bool:
        if action.proposer.id == principal.id:
            return False
        if any(a.approver.id == principal.id for a in approvals):
            return False
        return bool(self.app.gate.authz(principal, "approve", action=action).result.allow)

    def queue(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        now = datetime.now(UTC)
        rows: list[dict[str, Any]] = []
        for action in self.app.gate.queue(session.principal):
            approvals = self.app.store.approvals_for(action.id)
            left = (action.expires_at - now).total_seconds() if action.expires_at else None
            rows.append(
                {
                    "action": action,
                    "approvals": len(approvals),
                    "yours": self._may_approve(session.principal, action, approvals),
                    "left": _duration(left),
                }
            )
        # What waits for this viewer first, then oldest first.
        rows.sort(key=lambda r: (not r["yours"], r["action"].created_at))
        return self.page("queue.html", session=session, rows=rows)

    def _action_page(
        self,
        session: Session,
        action_id: str,
        *,
        status: int = 200,
        notice: str | None = None,
        problem: str | None = None,
    ) -> Response:
        from opsgate.executor.plan import plan_lines
        from opsgate.views import plan_of

        details = self.app.gate.details(action_id, session.principal)
        action = details.action
        plan = plan_of(details, self.catalog)
        return self.page(
            "action.html",
            status,
            session,
            action=action,
            params=masked(action, self.catalog, details.events),
            decisions=details.decisions,
            approvals=details.approvals,
            plan=plan,
            plan_lines=plan_lines(plan),
            execution=details.execution,
            may_approve=action.state is ActionState.PENDING_APPROVAL
            and self._may_approve(session.principal, action, details.approvals),
            pending=action.state is ActionState.PENDING_APPROVAL,
            running=action.state in RUNNING,
            has_measurements=bool(details.measurements) or action.state in RUNNING,
            notice=notice,
            problem=problem,
        )

    def action(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        notice = {"approved": "approval recorded", "rejected": "action rejected"}.get(
            request.query_params.get("done", "")
        )
        return self._action_page(session, request.path_params["action_id"], notice=notice)

    def _decide(
        self, request: Request, session: Session, call: Callable[[], object], done: str
    ) -> Response:
        action_id = request.path_params["action_id"]
        try:
            call()
        except Refused as exc:
            codes = f" ({', '.join(exc.codes)})" if exc.codes else ""
            return self._action_page(session, action_id, status=403, problem=f"{exc}{codes}")
        except (StateConflict, InvalidInput) as exc:
            status = 409 if isinstance(exc, StateConflict) else 400
            return self._action_page(session, action_id, status=status, problem=str(exc))
        target = f"{PREFIX}/actions/{urllib.parse.quote(action_id, safe='')}?done={done}"
        return RedirectResponse(target, 303, headers=SECURITY_HEADERS)

    def approve(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        action_id = request.path_params["action_id"]
        comment = form.get("comment", "")
        return self._decide(
            request,
            session,
            lambda: self.app.gate.approve(action_id, session.principal, comment),
            "approved",
        )

    def reject(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        action_id = request.path_params["action_id"]
        reason = form.get("reason", "")
        return self._decide(
            request,
            session,
            lambda: self.app.gate.reject(action_id, session.principal, reason),
            "rejected",
        )

    def live(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        details = self.app.gate.details(request.path_params["action_id"], session.principal)
        return JSONResponse(live_document(details), headers=SECURITY_HEADERS)

    def report(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        from opsgate.reports.build import summary_report
        from opsgate.reports.queries import ReportQueries, Window
        from opsgate.reports.render import render
        from opsgate.store.sql import SqlStore

        store = self.app.store
        if not isinstance(store, SqlStore):
            return self.page("error.html", 501, session, message="reports need a SQL store")
        end = datetime.now(UTC)
        built = summary_report(ReportQueries(store), Window(end - timedelta(days=30), end), {})
        text = render(built, "html")
        # The report inlines plotly.js and its figures: allow exactly those scripts by
        # hash, nothing else, and still nothing from another origin.
        hashes = " ".join(
            "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
            for s in re.findall(r"<script[^>]*>(.*?)</script>", text, flags=re.S)
        )
        policy = (
            f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
            "img-src data: blob:; font-src data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'"
        )
        return HTMLResponse(text, headers={**SECURITY_HEADERS, "Content-Security-Policy": policy})

    def audit(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        store = self.app.store
        head = store.audit_head()
        chain = verify_chain(store.audit_events(), head)
        return self.page("audit.html", session=session, chain=chain, head=head)

    def routes(self) -> list[Route]:
        action = PREFIX + "/actions/{action_id:str}"
        return [
            Route(PREFIX, self.view(self.queue), methods=["GET"]),
            Route(PREFIX + "/", self.view(self.queue), methods=["GET"]),
            Route(PREFIX + "/login", self.login, methods=["GET"]),
            Route(PREFIX + "/callback", self.callback, methods=["GET"]),
            Route(PREFIX + "/logout", self.view(self.logout, post=True), methods=["POST"]),
            Route(PREFIX + "/signed-out", self.signed_out, methods=["GET"]),
            Route(PREFIX + "/static/{name:str}", self.static, methods=["GET"]),
            Route(PREFIX + "/report", self.view(self.report), methods=["GET"]),
            Route(PREFIX + "/audit", self.view(self.audit), methods=["GET"]),
            Route(action, self.view(self.action), methods=["GET"]),
            Route(action + "/live.json", self.view(self.live), methods=["GET"]),
            Route(action + "/approve", self.view(self.approve, post=True), methods=["POST"]),
            Route(action + "/reject", self.view(self.reject, post=True), methods=["POST"]),
        ]


async def read_form(request: Request) -> dict[str, str] | None:
    """An urlencoded form, at most MAX_FORM_BYTES; the last value of each field wins."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            return None
        chunks.append(chunk)
    try:
        pairs = urllib.parse.parse_qsl(
            b"".join(chunks).decode("utf-8"), keep_blank_values=True, max_num_fields=32
        )
    except (UnicodeDecodeError, ValueError):
        return {}
    return dict(pairs)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds <= 0:
        return "expired"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def _ms(at: datetime | None) -> int | None:
    return int(at.timestamp() * 1000) if at is not None else None


def live_document(details: Any) -> dict[str, Any]:
    """What the chart draws: each signal's and stop condition's values against its range,
    the moment a stop condition fired, and the rollback's start and end."""
    action: Action = details.action
    spec = action.verification
    series: dict[str, dict[str, Any]] = {}
    for signal in spec.signals:
        series[signal.name] = {
            "name": signal.name,
            "kind": "signal",
            "min": signal.pass_.min,
            "max": signal.pass_.max,
            "points": [],
        }
    for stop in spec.stop_conditions:
        series[stop.name] = {
            "name": stop.name,
            "kind": "stop_condition",
            "min": stop.halt.min,
            "max": stop.halt.max,
            "points": [],
        }
    for m in details.measurements:
        entry = series.get(m.name)
        if entry is None or m.value is None or m.value != m.value:  # skip NaN and unknown
            continue
        entry["points"].append([_ms(m.at), m.value, m.outcome, m.phase])
    execution = details.execution
    marks: dict[str, Any] = {}
    if execution is not None:
        marks = {
            "run_started": _ms(execution.run_started_at),
            "stopped": _ms(execution.rollback_decided_at)
            if execution.trigger_kind == "stop_condition"
            else None,
            "trigger": execution.trigger_name,
            "rollback_decided": _ms(execution.rollback_decided_at),
            "rollback_verified": _ms(execution.rollback_verified_at),
            "rollback_time": execution.rollback_time,
            "outcome": execution.outcome,
        }
    return {
        "id": action.id,
        "state": action.state.value,
        "running": action.state in RUNNING,
        "series": list(series.values()),
        "marks": marks,
    }
