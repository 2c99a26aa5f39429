"""Notifications: enqueued in the transaction of the change they announce, delivered at
least once with a signature, retried with backoff, never blocking the action."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import CollectorRegistry

from opsgate.catalog import load_catalog
from opsgate.config import Settings
from opsgate.errors import ConfigError, Refused
from opsgate.gate import Gate
from opsgate.models import ActionState, Identity
from opsgate.notify.delivery import (
    DELIVERY_HEADER,
    MAX_ATTEMPTS,
    SIGNATURE_HEADER,
    Notifier,
    NotifyMetrics,
    NotifySettings,
    backoff,
    sign,
    slack_message,
    verify_signature,
)
from opsgate.policies.embedded import EmbeddedEngine
from opsgate.store import Store

ROOT = Path(__file__).resolve().parents[2]
ALICE = Identity(id="alice", kind="human")
BOB = Identity(id="bob", kind="human")
AGENT = Identity(id="sre-agent", kind="agent")
SECRET = "s3cret-for-tests"
SETTINGS = NotifySettings(
    webhook_url="http://hooks.invalid/opsgate",
    webhook_secret=SECRET,
    slack_webhook_url="http://slack.invalid/services/T/B/X",
    public_url="https://opsgate.example.com",
)


@pytest.fixture
def gate(store: Store) -> Gate:
    return Gate(
        store=store,
        catalog=load_catalog(ROOT / "catalog"),
        engine=EmbeddedEngine(ROOT / "policies"),
        approval_ttl=3600,
    )


def scale(target: str = "checkout", reason: str = "p99 latency over SLO") -> dict[str, Any]:
    return {
        "action": "scale_deployment",
        "target": target,
        "environment": "prod",
        "params": {"deployment": target, "replicas": 6},
        "reason": reason,
        "incident": {"id": "INC-42", "severity": "sev2", "class": "capacity", "tier": "standard"},
    }


class Receiver:
    """Stands in for the HTTP sinks: records every post, answers with `status`."""

    def __init__(self, status: int | Exception = 200) -> None:
        self.status = status
        self.posts: list[tuple[str, bytes, dict[str, str]]] = []

    def __call__(self, url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> int:
        self.posts.append((url, body, dict(headers)))
        if isinstance(self.status, Exception):
            raise self.status
        return self.status


def notifier(store: Store, receiver: Receiver, owner: str = "server-1") -> Notifier:
    return Notifier(
        store, SETTINGS, NotifyMetrics(CollectorRegistry()), owner=owner, poster=receiver
    )


def later(seconds: float = 0) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def test_a_proposal_and_its_approval_are_enqueued_with_their_change(
    gate: Gate, store: Store
) -> None:
    action = gate.propose(scale(), AGENT).action
    items = store.outbox_items(action_id=action.id)
    assert [i.kind for i in items] == ["pending_approval"]
    payload = items[0].payload
    assert payload["delivery_id"] == items[0].id
    assert payload["action"]["id"] == action.id and payload["actor"] == "sre-agent"
    assert "params" not in payload["action"]  # secrets never leave in a notification
    gate.approve(action.id, ALICE, "ok")
    # The agent is on the trust ladder's probation: one approval more, and none is news.
    assert [i.kind for i in store.outbox_items(action_id=action.id)] == ["pending_approval"]
    gate.approve(action.id, BOB, "ok")
    assert [i.kind for i in store.outbox_items(action_id=action.id)] == [
        "pending_approval",
        "approved",
    ]


def test_a_refused_approval_enqueues_nothing(gate: Gate, store: Store) -> None:
    action = gate.propose(scale(), ALICE).action
    before = store.row_counts()
    with pytest.raises(Refused):
        gate.approve(action.id, ALICE, "self")  # self-approval
    after = store.row_counts()
    assert after["outbox"] == before["outbox"] == 1


def test_a_rolled_back_transaction_leaves_no_notification(gate: Gate, store: Store) -> None:
    action = gate.propose(scale(), AGENT).action
    from opsgate.lifecycle import record_transition

    class Boom(Exception):
        pass

    with pytest.raises(Boom), store.transaction() as tx:
        locked = tx.lock_action(action.id)
        assert locked is not None
        record_transition(tx, locked, ActionState.APPROVED, actor="alice", now=later())
        raise Boom
    assert [i.kind for i in store.outbox_items()] == ["pending_approval"]


def test_delivery_signs_the_raw_body_and_names_the_delivery(gate: Gate, store: Store) -> None:
    action = gate.propose(scale(reason="<script>alert(1)</script> & <!here>"), AGENT).action
    receiver = Receiver()
    assert notifier(store, receiver).run_once(later()) == 1
    (hook_url, body, headers), (slack_url, slack_body, _) = receiver.posts
    assert hook_url == SETTINGS.webhook_url and slack_url == SETTINGS.slack_webhook_url
    assert verify_signature(SECRET, body, headers[SIGNATURE_HEADER])
    assert not verify_signature("another secret", body, headers[SIGNATURE_HEADER])
    document = json.loads(body)
    assert document["event"] == "pending_approval"
    assert headers[DELIVERY_HEADER] == document["delivery_id"]
    assert document["link"] == f"https://opsgate.example.com/console/actions/{action.id}"
    text = json.loads(slack_body)["text"]
    # Slack control characters escaped: no forged link, no @here ping from a reason.
    assert "<script>" not in text and "<!here>" not in text and "&lt;!here&gt;" in text
    assert f"<https://opsgate.example.com/console/actions/{action.id}|" in text
    (item,) = store.outbox_items()
    assert item.delivered_at is not None and set(item.delivered_to) == {"webhook", "slack"}
    assert notifier(store, receiver).run_once(later()) == 0  # delivered: not again


def test_a_failing_sink_is_retried_with_backoff_and_the_other_is_not_repeated(
    gate: Gate, store: Store
) -> None:
    gate.propose(scale(), AGENT)
    posts: list[str] = []

    def poster(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> int:
        posts.append(url)
        return 503 if "hooks" in url else 200

    registry = CollectorRegistry()
    first = Notifier(store, SETTINGS, NotifyMetrics(registry), owner="s1", poster=poster)
    first.run_once(later())
    (item,) = store.outbox_items()
    assert item.delivered_at is None and item.delivered_to == ("slack",)
    assert item.attempts == 1 and item.last_error == "webhook: HTTP 503"
    assert item.next_attempt_at > later(0.5)  # not before its backoff
    assert first.run_once(later()) == 0
    failures = registry.get_sample_value(
        "opsgate_notification_failures_total", {"sink": "webhook", "reason": "http_5xx"}
    )
    assert failures == 1.0
    posts.clear()
    first.run_once(item.next_attempt_at + timedelta(seconds=1))
    assert posts == [SETTINGS.webhook_url]  # Slack already has it


def test_a_connection_error_is_a_metric_not_an_exception(gate: Gate, store: Store) -> None:
    action = gate.propose(scale(), AGENT).action
    registry = CollectorRegistry()
    receiver = Receiver(requests.ConnectionError("refused"))
    Notifier(store, SETTINGS, NotifyMetrics(registry), owner="s1", poster=receiver).run_once(
        later()
    )
    sample = registry.get_sample_value(
        "opsgate_notification_failures_total", {"sink": "webhook", "reason": "connection"}
    )
    assert sample == 1.0
    assert store.get_action(action.id) is not None  # the action is untouched
    assert store.get_action(action.id).state is ActionState.PENDING_APPROVAL  # type: ignore[union-attr]


def test_a_lapsed_lease_is_taken_over_and_the_old_owner_cannot_settle(
    gate: Gate, store: Store
) -> None:
    gate.propose(scale(), AGENT)
    now = later()
    (claimed,) = store.claim_outbox("dead-server", now, now + timedelta(seconds=30), 10)
    assert store.claim_outbox("server-2", now, now + timedelta(seconds=30), 10) == []
    after_lease = now + timedelta(seconds=31)
    (taken,) = store.claim_outbox("server-2", after_lease, after_lease + timedelta(seconds=30), 10)
    assert taken.id == claimed.id  # the same delivery id: receivers deduplicate
    settled = store.settle_outbox(
        claimed.id,
        "dead-server",
        delivered_to=["webhook"],
        delivered_at=after_lease,
        failed_at=None,
        next_attempt_at=after_lease,
        error=None,
    )
    assert settled is False


def test_an_item_is_given_up_after_the_last_attempt(gate: Gate, store: Store) -> None:
    gate.propose(scale(), AGENT)
    registry = CollectorRegistry()
    sender = Notifier(store, SETTINGS, NotifyMetrics(registry), owner="s1", poster=Receiver(500))
    moment = later()
    for _ in range(MAX_ATTEMPTS):
        moment += timedelta(seconds=400)
        sender.run_once(moment)
    (item,) = store.outbox_items()
    assert item.failed_at is not None and item.attempts == MAX_ATTEMPTS
    assert registry.get_sample_value("opsgate_notifications_given_up_total") == 1.0
    assert sender.run_once(moment + timedelta(days=1)) == 0


def test_backoff_doubles_and_is_capped() -> None:
    assert 1.5 <= backoff(1) <= 2.5
    assert 6 <= backoff(3) <= 10
    assert backoff(40) <= 300 * 1.25


def test_signature_is_hmac_sha256_of_the_body() -> None:
    # Known answer (RFC 4231 test case 2 key and data).
    assert sign("Jefe", b"what do ya want for nothing?") == (
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )


def test_slack_message_without_a_public_url_has_no_link() -> None:
    message = slack_message(
        {"event": "rolled_back", "actor": "opsgate", "action": {"type": "restart_service"}},
        None,
    )
    assert "<http" not in message["text"] and "was rolled back" in message["text"]


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"webhook_url": "http://hooks.example/x"}, "OPSGATE_WEBHOOK_URL"),  # no secret
        ({"webhook_url": "file:///etc/passwd", "webhook_secret": "x"}, "OPSGATE_WEBHOOK_URL"),
        ({"slack_webhook_url": "javascript:alert(1)"}, "OPSGATE_SLACK_WEBHOOK_URL"),
        ({"public_url": "ftp://x"}, "OPSGATE_PUBLIC_URL"),
    ],
)
def test_bad_notification_settings_refuse_to_start(values: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        NotifySettings.from_settings(Settings().with_overrides(values))


def test_no_sink_configured_means_no_delivery_thread(store: Store) -> None:
    quiet = Notifier(store, NotifySettings(), NotifyMetrics(CollectorRegistry()))
    quiet.start()
    assert quiet._thread is None
    quiet.stop()


@pytest.mark.parametrize(
    ("path", "announced"),
    [
        ([ActionState.APPROVED, ActionState.BLOCKED_AT_EXECUTION],
         ["approved", "blocked_at_execution"]),
        ([ActionState.APPROVED, ActionState.EXECUTING, ActionState.ROLLING_BACK,
          ActionState.ROLLED_BACK], ["approved", "rolled_back"]),
        ([ActionState.APPROVED, ActionState.EXECUTING, ActionState.ROLLING_BACK,
          ActionState.ROLLBACK_FAILED], ["approved", "rollback_failed"]),
        ([ActionState.REJECTED], []),
        ([ActionState.APPROVED, ActionState.EXECUTING, ActionState.VERIFYING,
          ActionState.SUCCEEDED], ["approved"]),
    ],
)  # fmt: skip
def test_exactly_the_announced_transitions_enqueue(
    gate: Gate, store: Store, path: list[ActionState], announced: list[str]
) -> None:
    from opsgate.lifecycle import record_transition

    action = gate.propose(scale(), AGENT).action
    for state in path:  # as the executor and the gate record them
        with store.transaction() as tx:
            locked = tx.lock_action(action.id)
            assert locked is not None
            record_transition(tx, locked, state, actor="opsgate", now=later())
    kinds = [i.kind for i in store.outbox_items(action_id=action.id)]
    assert kinds == ["pending_approval", *announced]
    # The payload shows the action as the change left it (the row is updated first).
    for item in store.outbox_items(action_id=action.id):
        assert item.payload["action"]["state"] == item.kind
