"""The web console and notifications with real parts: a real `opsgate server`, the real
OpenID provider (oidc-provider under Node), headless Chromium, a real Prometheus for the
live chart, and a local webhook receiver that checks signatures and at-least-once
delivery across a server restart."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from opsgate.demo.processes import free_port
from opsgate.notify.delivery import verify_signature
from opsgate.store.sql import SqlStore
from tests.integration.api_server import ROOT, ApiServer
from tests.integration.fault_service import FaultService
from tests.integration.oidc import AUDIENCE, OidcProvider, _form, node_ready
from tests.integration.prom import PrometheusServer
from tests.integration.test_execution import action_type, set_fault, wait_for_rate
from tests.integration.test_server import SCALE, Rig
from tests.integration.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.integration

_missing = node_ready()
if _missing is not None:
    if os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}:
        raise RuntimeError(f"the console tests need the OpenID provider under CI: {_missing}")
    pytestmark = [pytestmark, pytest.mark.skip(reason=_missing)]  # type: ignore[assignment]

WEBHOOK_SECRET = "webhook-secret-for-the-console-tests"
HOSTILE = "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script>"
SCREENSHOT = ROOT / "docs" / "console.png"
DRAWN_CHARTS = (  # report charts whose plotly SVG exists
    "return Array.from(document.querySelectorAll('[data-chart]'))"
    ".filter(b => b.querySelector('svg.main-svg')).length"
)


def critical(target: str, reason: str = SCALE["reason"]) -> dict[str, Any]:
    """A prod proposal that needs two approvals (critical tier)."""
    return {
        **SCALE,
        "target": target,
        "params": {"deployment": target, "replicas": 4},
        "reason": reason,
        "incident": {**SCALE["incident"], "tier": "critical"},
    }


def console_env(provider: OidcProvider, receiver: WebhookReceiver) -> dict[str, str]:
    return {
        "OPSGATE_OIDC_ISSUER": provider.issuer,
        "OPSGATE_OIDC_AUDIENCE": AUDIENCE,
        "OPSGATE_CONSOLE_CLIENT_ID": "opsgate-console",
        "OPSGATE_SESSION_SECRET": "a-session-secret-of-at-least-32-characters",
        "OPSGATE_WEBHOOK_URL": receiver.url,
        "OPSGATE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "OPSGATE_SLACK_WEBHOOK_URL": receiver.url.replace("/hook", "/slack"),
    }


@pytest.fixture(scope="module")
def provider() -> Iterator[OidcProvider]:
    provider = OidcProvider("k1")
    provider.start()
    try:
        yield provider
    finally:
        provider.stop()


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def rig(
    tmp_path_factory: pytest.TempPathFactory, provider: OidcProvider, receiver: WebhookReceiver
) -> Iterator[Rig]:
    rig = Rig(tmp_path_factory.mktemp("console"))
    rig.server.env.update(console_env(provider, receiver))
    rig.tokens = {
        "agent": rig.token("sre-agent", "--kind", "agent"),
        "alice": rig.token("alice", "--kind", "human", "--group", "sre"),
    }
    rig.server.start()
    try:
        yield rig
    finally:
        rig.server.stop()
        rig.store.close()


def propose(rig: Rig, who: str, document: dict[str, Any]) -> str:
    status, body = rig.call("POST", "/actions", rig.tokens[who], document)
    assert status == 201, body
    return str(body["action"]["id"])


class Browser(requests.Session):
    """A person's console session without a browser: the same redirects and forms."""

    csrf = ""


def login(rig: Rig, who: str) -> Browser:
    browser = Browser()
    page = browser.get(rig.server.url + "/console", timeout=10)
    for extra in ({"login": who, "password": "any"}, {}):  # sign in, then consent
        action, fields = _form(page)
        page = browser.post(action, data={**fields, **extra}, timeout=10)
    assert page.status_code == 200 and page.url.startswith(rig.server.url + "/console"), page.url
    match = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert match, page.text[:500]
    browser.csrf = match.group(1)
    return browser


# --- sessions, login and CSRF ------------------------------------------------------------


def test_every_page_needs_a_session(rig: Rig) -> None:
    action_id = propose(rig, "agent", critical("svc-nosession"))
    url = rig.server.url + "/console"
    for path in ("", "/audit", "/report", f"/actions/{action_id}"):
        response = requests.get(url + path, allow_redirects=False, timeout=10)
        assert response.status_code == 303
        assert response.headers["location"].startswith("/console/login?next=")
    live = requests.get(f"{url}/actions/{action_id}/live.json", timeout=10)
    assert live.status_code == 401
    before = rig.rows()
    posted = requests.post(f"{url}/actions/{action_id}/approve", data={"csrf": "x"}, timeout=10)
    assert posted.status_code == 401
    assert rig.rows() == before


def test_forged_and_spoofed_sessions_are_refused(rig: Rig) -> None:
    alice = login(rig, "alice")
    cookie = alice.cookies.get("opsgate_session", path="/console")
    assert cookie is not None
    payload, mac = cookie.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload))
    data["id"] = "carol"
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).decode() + "." + mac
    for value in (forged, "garbage", cookie + "0", "x" * 5000):
        response = requests.get(
            rig.server.url + "/console",
            cookies={"opsgate_session": value},
            allow_redirects=False,
            timeout=10,
        )
        assert response.status_code == 303, value[:40]
    # A proxy header never names the viewer.
    page = alice.get(rig.server.url + "/console", headers={"X-Forwarded-User": "carol"}, timeout=10)
    assert '<span id="viewer">alice</span>' in page.text


def test_the_session_cookie_is_httponly_and_samesite(rig: Rig) -> None:
    browser = Browser()
    page = browser.get(rig.server.url + "/console", timeout=10)
    action, fields = _form(page)
    page = browser.post(action, data={**fields, "login": "alice", "password": "x"}, timeout=10)
    action, fields = _form(page)
    answer = browser.post(action, data=fields, allow_redirects=False, timeout=10)
    while "/console/callback" not in answer.headers.get("location", ""):
        answer = browser.get(answer.headers["location"], allow_redirects=False, timeout=10)
    callback = browser.get(answer.headers["location"], allow_redirects=False, timeout=10)
    set_cookie = callback.headers["set-cookie"]
    assert "opsgate_session=" in set_cookie
    lowered = set_cookie.lower()
    assert "httponly" in lowered and "samesite=lax" in lowered and "path=/console" in lowered
    assert "secure" not in lowered.replace("opsgate_session", "")  # plain http on loopback


def test_a_login_the_browser_did_not_start_is_refused(rig: Rig) -> None:
    url = rig.server.url + "/console/callback"
    for query in ("?code=abc&state=xyz", "", "?state=" + "a" * 5000):
        response = requests.get(url + query, allow_redirects=False, timeout=10)
        assert response.status_code == 400
        assert "opsgate_session" not in response.headers.get("set-cookie", "")


def test_login_never_redirects_off_the_console(rig: Rig, provider: OidcProvider) -> None:
    for target in ("https://evil.example/", "//evil.example", "/console/../api/v1/x"):
        response = requests.get(
            rig.server.url + "/console/login",
            params={"next": target},
            allow_redirects=False,
            timeout=10,
        )
        assert response.status_code == 303
        cookie = response.cookies.get("opsgate_login")
        assert cookie is not None
        started = json.loads(base64.urlsafe_b64decode(cookie.split(".")[0]))
        assert started["next"] == "/console"
        location = response.headers["location"]
        assert location.startswith(provider.issuer + "/")
        assert "code_challenge=" in location and "code_challenge_method=S256" in location


def test_a_form_post_without_the_csrf_token_is_refused(rig: Rig) -> None:
    action_id = propose(rig, "agent", critical("svc-csrf"))
    alice = login(rig, "alice")
    url = f"{rig.server.url}/console/actions/{action_id}/approve"
    before = rig.rows()
    for form in ({"comment": "no token"}, {"csrf": "", "comment": "x"},
                 {"csrf": alice.csrf[:-2] + "xx", "comment": "x"}):  # fmt: skip
        response = alice.post(url, data=form, allow_redirects=False, timeout=10)
        assert response.status_code == 403
        assert "CSRF" in response.text
    assert rig.rows() == before
    # Oversized and malformed forms: refused, nothing changes.
    big = alice.post(url, data={"csrf": alice.csrf, "comment": "x" * 70_000}, timeout=10)
    assert big.status_code == 413
    junk = alice.post(
        url, data=b"\xff\xfe%%%", headers={"Content-Type": "application/x-www-form-urlencoded"},
        allow_redirects=False, timeout=10,
    )  # fmt: skip
    assert junk.status_code == 403
    assert rig.rows() == before
    done = alice.post(url, data={"csrf": alice.csrf, "comment": "ok"}, allow_redirects=False,
                      timeout=10)  # fmt: skip
    assert done.status_code == 303
    assert rig.rows()["approvals"] == before["approvals"] + 1


def test_signing_out_needs_the_token_and_ends_the_session(rig: Rig) -> None:
    alice = login(rig, "alice")
    url = rig.server.url + "/console/logout"
    refused = alice.post(url, data={}, allow_redirects=False, timeout=10)
    assert refused.status_code == 403  # a cross-site page cannot sign you out either
    done = alice.post(url, data={"csrf": alice.csrf}, allow_redirects=False, timeout=10)
    assert done.status_code == 303 and done.headers["location"] == "/console/signed-out"
    assert "opsgate_session=" in done.headers["set-cookie"]
    again = alice.get(rig.server.url + "/console", allow_redirects=False, timeout=10)
    assert again.status_code == 303 and again.headers["location"].startswith("/console/login")


def test_pages_carry_a_strict_content_security_policy(rig: Rig) -> None:
    alice = login(rig, "alice")
    for path in ("/console", "/console/audit"):
        response = alice.get(rig.server.url + path, timeout=10)
        assert response.status_code == 200
        policy = response.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert response.headers["x-content-type-options"] == "nosniff"
    script = alice.get(rig.server.url + "/console/static/console.js", timeout=10)
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    for name in ("../views.py", "..%2Fviews.py", "nope.js"):
        assert alice.get(rig.server.url + "/console/static/" + name, timeout=10).status_code == 404
    audit = alice.get(rig.server.url + "/console/audit", timeout=10)
    assert 'id="audit-status"' in audit.text and "verified:" in audit.text


def test_an_unknown_action_is_404_and_injection_in_the_path_is_inert(rig: Rig) -> None:
    alice = login(rig, "alice")
    for action_id in ("01NOPE", "x' OR '1'='1", "%3Cscript%3E"):
        response = alice.get(f"{rig.server.url}/console/actions/{action_id}", timeout=10)
        assert response.status_code == 404
        assert "<script>" not in response.text


# --- notifications ------------------------------------------------------------------------


def test_a_pending_approval_is_posted_signed_to_the_webhook_and_slack(
    rig: Rig, receiver: WebhookReceiver
) -> None:
    action_id = propose(rig, "agent", critical("svc-hook", reason="disk <!channel> & full"))
    mine = receiver.wait_for(2, about="svc-hook")
    hook = next(p for p in mine if p.path == "/hook")
    slack = next(p for p in mine if p.path == "/slack")
    assert verify_signature(WEBHOOK_SECRET, hook.body, hook.headers["x-opsgate-signature"])
    document = json.loads(hook.body)
    assert document["event"] == "pending_approval" and document["action"]["id"] == action_id
    assert hook.headers["x-opsgate-delivery"] == document["delivery_id"]
    assert "params" not in document["action"]
    text = json.loads(slack.body)["text"]
    assert "<!channel>" not in text and "&lt;!channel&gt;" in text


def test_a_notification_survives_a_server_killed_before_delivery(
    tmp_path: Path, provider: OidcProvider
) -> None:
    port = free_port()  # nothing listens here yet: every delivery attempt fails
    rig = Rig(tmp_path)
    hook_url = f"http://127.0.0.1:{port}/hook"
    rig.server.env.update(
        {"OPSGATE_WEBHOOK_URL": hook_url, "OPSGATE_WEBHOOK_SECRET": WEBHOOK_SECRET}
    )
    rig.tokens = {"agent": rig.token("sre-agent", "--kind", "agent")}
    rig.server.start()
    try:
        action_id = propose(rig, "agent", critical("svc-restart"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            items = rig.store.outbox_items(action_id=action_id)
            if items and items[0].attempts >= 1:
                break
            time.sleep(0.1)
        (item,) = rig.store.outbox_items(action_id=action_id)
        assert item.attempts >= 1 and item.delivered_at is None, item
        assert rig.server.process is not None
        rig.server.process.kill()  # no clean shutdown
        rig.server.process.wait(timeout=10)
    finally:
        rig.server.stop()
    with WebhookReceiver(port=port) as receiver:
        rig.server = ApiServer(rig.server.env)
        rig.server.start()
        try:
            posts = receiver.wait_for(1, timeout=60)
        finally:
            rig.server.stop()
    assert verify_signature(WEBHOOK_SECRET, posts[0].body, posts[0].headers["x-opsgate-signature"])
    assert posts[0].headers["x-opsgate-delivery"] == item.id  # the same id: dedup works
    assert json.loads(posts[0].body)["action"]["id"] == action_id
    (delivered,) = rig.store.outbox_items(action_id=action_id)
    assert delivered.delivered_at is not None
    rig.store.close()


# --- the browser ---------------------------------------------------------------------------


def chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture
def driver_factory() -> Iterator[Any]:
    found = chromium()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are missing: run `make system-deps`")
        pytest.skip("chromium and chromedriver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    drivers: list[Any] = []

    def make() -> Any:
        options = webdriver.ChromeOptions()
        options.binary_location = found[0]
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,900"):  # fmt: skip
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
        driver = webdriver.Chrome(service=Service(found[1]), options=options)
        driver.set_page_load_timeout(60)
        drivers.append(driver)
        return driver

    yield make
    for driver in drivers:
        driver.quit()


def browser_login(driver: Any, rig: Rig, who: str, path: str = "/console") -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(rig.server.url + path)
    wait = WebDriverWait(driver, 30)
    wait.until(ec.presence_of_element_located((By.NAME, "login"))).send_keys(who)
    driver.find_element(By.NAME, "password").send_keys("any")
    sign_in = driver.find_element(By.CSS_SELECTOR, "button[type=submit]")
    sign_in.click()
    wait.until(ec.staleness_of(sign_in))  # the consent page replaced the login page
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "button[type=submit]"))).click()
    wait.until(lambda d: d.current_url.startswith(rig.server.url + "/console"))
    if not path.endswith("/report"):  # the report is the standalone HTML report
        wait.until(ec.presence_of_element_located((By.ID, "viewer")))


def requested_urls(driver: Any) -> list[str]:
    entries = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    return [
        e["params"]["request"]["url"]
        for e in entries
        if e.get("method") == "Network.requestWillBeSent"
    ]


def test_approvers_log_in_see_open_and_approve_in_the_browser(
    rig: Rig, receiver: WebhookReceiver, driver_factory: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    shared = propose(rig, "agent", critical("svc-browser", reason=HOSTILE))
    own = propose(rig, "alice", critical("svc-own"))

    alice = driver_factory()
    browser_login(alice, rig, "alice")
    requested_urls(alice)  # drop the login's requests: they go to the provider by design
    alice.get(rig.server.url + "/console")
    row = alice.find_element(By.CSS_SELECTOR, f"tr[data-action-id='{shared}']")
    # Two for the critical tier, one more: the agent is on the trust ladder's probation.
    assert "yours to approve" in row.text and "0 of 3" in row.text
    first = alice.find_element(By.CSS_SELECTOR, "#queue tbody tr")
    assert "yours to approve" in first.text  # what waits for the viewer comes first
    own_row = alice.find_element(By.CSS_SELECTOR, f"tr[data-action-id='{own}']")
    assert "yours to approve" not in own_row.text
    if os.environ.get("OPSGATE_CONSOLE_SCREENSHOT"):  # the README's picture (make screenshots)
        alice.save_screenshot(str(SCREENSHOT))

    row.find_element(By.CSS_SELECTOR, "a.action-link").click()
    WebDriverWait(alice, 30).until(ec.presence_of_element_located((By.ID, "plan")))
    # The hostile reason is text: no element, no script ran.
    reason = alice.find_element(By.ID, "reason")
    assert reason.text == HOSTILE
    assert reason.find_elements(By.TAG_NAME, "img") == []
    assert alice.title != "pwned"
    assert "run:" in alice.find_element(By.ID, "plan").text
    assert "sha256:" in alice.find_element(By.ID, "decisions").text  # bundle revision
    alice.find_element(By.CSS_SELECTOR, "#approve-form input[name=comment]").send_keys(
        "<b>looks right</b>"
    )
    alice.find_element(By.ID, "approve").click()
    WebDriverWait(alice, 30).until(ec.presence_of_element_located((By.ID, "notice")))
    assert alice.find_element(By.ID, "progress").text.startswith("1 of 3")
    assert "<b>looks right</b>" in alice.find_element(By.ID, "approvals").text

    # Her own proposal: the Gate refuses, and the page says why.
    alice.get(f"{rig.server.url}/console/actions/{own}")
    before = rig.rows()
    alice.find_element(By.ID, "approve").click()
    problem = WebDriverWait(alice, 30).until(ec.presence_of_element_located((By.ID, "problem")))
    assert "self_approval" in problem.text
    assert rig.rows()["approvals"] == before["approvals"]
    urls = requested_urls(alice)
    assert urls and all(u.startswith(rig.server.url + "/") for u in urls), urls
    errors = [e for e in alice.get_log("browser") if "Content Security Policy" in e["message"]]
    assert errors == []

    # The probation's extra approval, through the API: the browser gives the last one.
    carol = rig.token("carol", "--kind", "human", "--group", "sre")
    status, body = rig.call("POST", f"/actions/{shared}/approve", carol, {})
    assert status == 200, body

    bob = driver_factory()
    browser_login(bob, rig, "bob", f"/console/actions/{shared}")
    assert bob.current_url.endswith(f"/console/actions/{shared}")  # back where he started
    bob.find_element(By.ID, "approve").click()
    WebDriverWait(bob, 30).until(ec.presence_of_element_located((By.ID, "notice")))
    assert bob.find_element(By.ID, "state").text == "approved"
    stored = SqlStore(rig.db)
    try:
        action = stored.get_action(shared)
        assert action is not None and action.state.value == "approved"
        approvers = [a.approver.id for a in stored.approvals_for(shared)]
        assert approvers == ["alice", "carol", "bob"]
    finally:
        stored.close()
    announced = receiver.wait_for(2, about=shared)  # the webhook's; Slack's carry no id
    assert sorted(json.loads(p.body)["event"] for p in announced) == [
        "approved",
        "pending_approval",
    ]


def test_the_live_chart_draws_during_a_run(
    tmp_path: Path,
    provider: OidcProvider,
    prometheus: PrometheusServer,
    fault_service: FaultService,
    driver_factory: Any,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    catalog = tmp_path / "catalog"
    catalog.mkdir()
    # The run breaks the service: the stop condition fires and the undo repairs it.
    document = action_type("restart_service", run=set_fault("0.8"), undo=set_fault("0"),
                           hold="20s", timeout="40s", halt_min=0.3)  # fmt: skip
    (catalog / "restart_service.yaml").write_text(json.dumps(document))
    rig = Rig(tmp_path)
    rig.env["OPSGATE_CATALOG"] = str(catalog)
    with WebhookReceiver() as receiver:
        env = {**rig.env, **console_env(provider, receiver),
               "OPSGATE_PROMETHEUS_URL": prometheus.url, "PYTHONPATH": os.getcwd()}  # fmt: skip
        rig.server = ApiServer(env)
        rig.tokens = {
            w: rig.token(w, "--kind", "human", "--group", "sre") for w in ("alice", "bob")
        }
        target = f"console-live-{os.getpid()}"
        fault_service.add_service(target)
        wait_for_rate(prometheus, target)
        rig.server.start()
        try:
            proposal = {
                "action": "restart_service",
                "target": target,
                "environment": "staging",
                "params": {"fault_url": fault_service.url},
                "reason": "live chart",
            }
            action_id = propose(rig, "alice", proposal)
            status, body = rig.call("POST", f"/actions/{action_id}/approve", rig.tokens["bob"], {})
            assert status == 200, body
            driver = driver_factory()
            browser_login(driver, rig, "bob", f"/console/actions/{action_id}")
            status, body = rig.call("POST", f"/actions/{action_id}/run", rig.tokens["bob"], {})
            assert status == 202, body
            driver.refresh()  # the page now knows a run is under way and polls
            seen_running = WebDriverWait(driver, 60).until(
                lambda d: d.execute_script(
                    "const live = document.getElementById('live');"
                    "return live && live.querySelector('svg path.values') &&"
                    " /\\(live\\)/.test(document.getElementById('live-status').textContent);"
                )
            )
            assert seen_running
            WebDriverWait(driver, 90).until(
                lambda d: "rollback took" in d.find_element(By.ID, "live-status").text
            )
            marks = driver.execute_script(
                "return Array.from(document.querySelectorAll('#live text')).map(t => t.textContent)"
            )
            assert any(m.startswith("stop: error_spike") for m in marks), marks
            assert "rolled back" in marks
            series = driver.execute_script(
                "return Array.from(document.querySelectorAll('#live svg'))"
                ".map(s => [s.dataset.series, s.querySelectorAll('circle.point').length])"
            )
            assert dict(series)["error_spike"] > 0 and dict(series)["error_rate"] > 0, series
            # The executor's rollback, enqueued in its own transaction, reached the webhook.
            (rolled,) = receiver.wait_for(1, about='"event":"rolled_back"')
            assert json.loads(rolled.body)["action"]["id"] == action_id
            urls = requested_urls(driver)
            console_urls = [u for u in urls if "/console" in u]
            assert any(u.endswith("/live.json") for u in console_urls)
            assert driver.find_element(By.ID, "state").text == "rolled_back"
            if os.environ.get("OPSGATE_CONSOLE_SCREENSHOT"):
                driver.execute_script("document.getElementById('reason').scrollIntoView()")
                driver.save_screenshot(str(SCREENSHOT.with_name("console-live.png")))
        finally:
            rig.server.stop()
            rig.store.close()


def test_the_governance_report_draws_under_the_console_policy(
    tmp_path: Path, provider: OidcProvider, driver_factory: Any
) -> None:
    """The report inlines plotly: the page allows exactly its scripts by hash, so every
    chart must still draw with nothing blocked and nothing fetched from elsewhere."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from opsgate.store import open_store
    from tests import history

    rig = Rig(tmp_path)
    store = open_store(rig.db)
    now = datetime.now(UTC)
    history.write(store, history.generate(300, seed=11, start=now - timedelta(days=29), end=now))
    store.close()
    with WebhookReceiver() as receiver:
        rig.server.env.update(console_env(provider, receiver))
        rig.server.start()
        try:
            driver = driver_factory()
            browser_login(driver, rig, "alice", "/console/report")
            WebDriverWait(driver, 60).until(lambda d: d.execute_script(DRAWN_CHARTS) == 4)
            marks = driver.execute_script(
                "return Array.from(document.querySelectorAll('[data-chart]')).map(b =>"
                " b.querySelectorAll('g.trace path, g.points path, g.bars path').length)"
            )
            assert all(count > 0 for count in marks), marks
            requested_urls(driver)  # the login's requests went to the provider by design
            driver.refresh()
            WebDriverWait(driver, 60).until(lambda d: d.execute_script(DRAWN_CHARTS) == 4)
            urls = requested_urls(driver)
            assert urls and all(u.startswith(rig.server.url + "/") for u in urls), urls
            logged = driver.get_log("browser")
            assert [e for e in logged if "Content Security Policy" in e["message"]] == []
            driver.get(rig.server.url + "/console/audit")
            assert "verified:" in driver.find_element(By.ID, "audit-status").text
        finally:
            rig.server.stop()
            rig.store.close()
