"""Deliver the outbox: a generic signed webhook and a Slack incoming webhook.

At least once: an item is leased before it is posted and settled after, so a server that
dies in between leaves the item to be posted again once the lease lapses. Receivers
deduplicate on X-Opsgate-Delivery (the same id on every retry). A failed post is a
metric and a later retry; it never touches the action it announces.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import random
import socket
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from prometheus_client import CollectorRegistry, Counter

from opsgate.config import Settings
from opsgate.errors import ConfigError
from opsgate.store.base import OutboxItem, Store, StoreError

log = logging.getLogger("opsgate.notify")

SIGNATURE_HEADER = "X-Opsgate-Signature"
DELIVERY_HEADER = "X-Opsgate-Delivery"
EVENT_HEADER = "X-Opsgate-Event"
MAX_BACKOFF = 300.0
MAX_ATTEMPTS = 15  # over half an hour of retries, then the item is given up (and counted)

EVENT_TEXT = {
    "pending_approval": "waits for approval",
    "approved": "was approved",
    "blocked_at_execution": "was blocked at execution",
    "rolled_back": "was rolled back",
    "rollback_failed": "ROLLBACK FAILED",
}


def sign(secret: str, body: bytes) -> str:
    """`sha256=<hex>`: HMAC-SHA256 of the exact bytes sent."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, body: bytes, header: str) -> bool:
    """What a receiver does (constant time); here for tests and receivers in Python."""
    return hmac.compare_digest(sign(secret, body), header)


def backoff(attempts: int) -> float:
    """Seconds before the next try after `attempts` failures: doubling, capped, jittered
    so that many items failing together do not retry in lockstep."""
    base = min(MAX_BACKOFF, 2.0 ** min(attempts, 16))
    return base * (0.75 + random.random() / 2)


def _check_url(name: str, value: str | None) -> str | None:
    if not value:
        return None
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in {"http", "https"} or not parsed.hostname:
        raise ConfigError(f"OPSGATE_{name.upper()}: expected an http(s) URL")
    return value


@dataclass(frozen=True)
class NotifySettings:
    webhook_url: str | None = None
    webhook_secret: str | None = None
    slack_webhook_url: str | None = None
    public_url: str | None = None
    lease: float = 30.0
    poll: float = 1.0
    timeout: float = 5.0

    @classmethod
    def from_settings(cls, settings: Settings) -> NotifySettings:
        webhook = _check_url("webhook_url", settings.webhook_url)
        if webhook and not settings.webhook_secret:
            # An unsigned webhook can be forged by anyone who finds the receiver.
            raise ConfigError("OPSGATE_WEBHOOK_URL needs OPSGATE_WEBHOOK_SECRET to sign with")
        return cls(
            webhook_url=webhook,
            webhook_secret=settings.webhook_secret or None,
            slack_webhook_url=_check_url("slack_webhook_url", settings.slack_webhook_url),
            public_url=_check_url("public_url", settings.public_url),
        )

    @property
    def sinks(self) -> tuple[str, ...]:
        return tuple(
            name
            for name, url in (("webhook", self.webhook_url), ("slack", self.slack_webhook_url))
            if url
        )


def action_link(public_url: str | None, action_id: str | None) -> str | None:
    if not public_url or not action_id:
        return None
    return public_url.rstrip("/") + "/console/actions/" + urllib.parse.quote(action_id, safe="")


def _slack_escape(text: str) -> str:
    # Slack's mrkdwn control characters; without this a reason could forge a link.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_message(payload: Mapping[str, Any], public_url: str | None) -> dict[str, Any]:
    """An incoming-webhook message: one line of what happened, a link to the action."""
    action = payload.get("action") or {}
    what = EVENT_TEXT.get(str(payload.get("event")), str(payload.get("event")))
    title = (
        f"{action.get('type', 'action')} on {action.get('target', '?')} "
        f"({action.get('environment', '?')}) {what}"
    )
    link = action_link(public_url, action.get("id"))
    head = f"<{link}|{_slack_escape(title)}>" if link else _slack_escape(title)
    lines = [f"*opsgate*: {head}"]
    if action.get("reason"):
        lines.append(f"> {_slack_escape(str(action['reason'])[:500])}")
    details = [f"by {_slack_escape(str(payload.get('actor', '')))}"]
    if action.get("incident"):
        details.append(f"incident {_slack_escape(str(action['incident']))}")
    if action.get("risk"):
        details.append(f"risk {_slack_escape(str(action['risk']))}")
    lines.append(", ".join(details))
    return {"text": "\n".join(lines), "unfurl_links": False}


class NotifyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.delivered = Counter(
            "opsgate_notifications_delivered",
            "Notifications a sink accepted (2xx).",
            ["sink"],
            registry=registry,
        )
        self.failures = Counter(
            "opsgate_notification_failures",
            "Failed delivery attempts; the item is retried with backoff.",
            ["sink", "reason"],
            registry=registry,
        )
        self.given_up = Counter(
            "opsgate_notifications_given_up",
            f"Notifications abandoned after {MAX_ATTEMPTS} failed attempts.",
            registry=registry,
        )


Poster = Callable[[str, bytes, Mapping[str, str], float], int]


def post(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> int:
    # No redirects: a receiver cannot send the signed body somewhere else.
    response = requests.post(
        url, data=body, headers=dict(headers), timeout=timeout, allow_redirects=False
    )
    response.close()
    return response.status_code


class Notifier:
    """The server's delivery loop over the store's outbox."""

    def __init__(
        self,
        store: Store,
        settings: NotifySettings,
        metrics: NotifyMetrics,
        *,
        owner: str | None = None,
        poster: Poster = post,
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.owner = owner or f"server:{socket.gethostname()}:{os.getpid()}"
        self.poster = poster
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.settings.sinks or self._thread is not None:
            return  # nowhere to deliver: items wait in the outbox for a configured server
        self._thread = threading.Thread(target=self._loop, name="opsgate-notify", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.timeout * 2 + 5)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once(datetime.now(UTC))
            except StoreError as exc:  # the database is away: try again later
                log.warning("notification outbox unavailable: %s", exc)
                busy = 0
            except Exception:  # the loop must outlive any one bad item
                log.exception("notification delivery failed")
                busy = 0
            if not busy:
                self._stop.wait(self.settings.poll)

    def run_once(self, now: datetime, limit: int = 20) -> int:
        """Lease the due items and try each once; how many were tried."""
        until = now + timedelta(seconds=self.settings.lease)
        items = self.store.claim_outbox(self.owner, now, until, limit)
        for item in items:
            if self._stop.is_set():
                break
            self.deliver(item)
        return len(items)

    def _request(self, sink: str, item: OutboxItem) -> tuple[str, bytes, dict[str, str]]:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "opsgate-notify",
            DELIVERY_HEADER: item.id,
            EVENT_HEADER: item.kind,
        }
        if sink == "webhook":
            assert self.settings.webhook_url and self.settings.webhook_secret
            body = json.dumps(
                {**item.payload, "link": action_link(self.settings.public_url, item.action_id)},
                sort_keys=True,
                separators=(",", ":"),
            ).encode("utf-8")
            headers[SIGNATURE_HEADER] = sign(self.settings.webhook_secret, body)
            return self.settings.webhook_url, body, headers
        assert self.settings.slack_webhook_url
        body = json.dumps(slack_message(item.payload, self.settings.public_url)).encode("utf-8")
        return self.settings.slack_webhook_url, body, headers

    def deliver(self, item: OutboxItem) -> None:
        done = list(item.delivered_to)
        errors: list[str] = []
        for sink in self.settings.sinks:
            if sink in done:
                continue
            url, body, headers = self._request(sink, item)
            try:
                status = self.poster(url, body, headers, self.settings.timeout)
            except requests.RequestException as exc:
                self.metrics.failures.labels(sink, "connection").inc()
                errors.append(f"{sink}: {type(exc).__name__}")
                continue
            if 200 <= status < 300:
                self.metrics.delivered.labels(sink).inc()
                done.append(sink)
            else:
                self.metrics.failures.labels(sink, f"http_{status // 100}xx").inc()
                errors.append(f"{sink}: HTTP {status}")
        now = datetime.now(UTC)
        finished = not errors
        give_up = not finished and item.attempts + 1 >= MAX_ATTEMPTS
        if give_up:
            self.metrics.given_up.inc()
            log.error("notification %s given up: %s", item.id, "; ".join(errors))
        settled = self.store.settle_outbox(
            item.id,
            self.owner,
            delivered_to=done,
            delivered_at=now if finished else None,
            failed_at=now if give_up else None,
            next_attempt_at=now + timedelta(seconds=backoff(item.attempts + 1)),
            error="; ".join(errors) or None,
        )
        if not settled:  # our lease lapsed mid-post: the next owner posts it again
            log.warning("notification %s: lease lost; it will be delivered again", item.id)
