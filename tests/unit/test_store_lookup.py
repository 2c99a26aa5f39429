"""Store operations behind `opsgate list`, short ids and concurrent_action's holder names,
against memory, SQLite and PostgreSQL (the `store` fixture)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from opsgate.errors import InvalidInput, NotFound
from opsgate.ids import LOG_LENGTH, MIN_SHOWN, log_id, resolve, short_ids, shortest_unique
from opsgate.models import ActionState, Identity
from opsgate.store import Store
from opsgate.store.base import ActionQuery
from opsgate.testing import make_action, make_execution

T0 = datetime(2026, 11, 23, 10, 0, 0, tzinfo=UTC)
S = ActionState


def insert(store: Store, **fields: object) -> str:
    action = make_action(**fields)
    with store.transaction() as tx:
        tx.insert_action(action)
    return action.id


def test_find_actions_filters_and_orders_newest_first(store: Store) -> None:
    a = insert(store, created_at=T0, state=S.APPROVED, target="checkout", environment="prod")
    b = insert(
        store,
        created_at=T0 + timedelta(minutes=1),
        state=S.PENDING_APPROVAL,
        target="cart",
        environment="staging",
        action_type="restart_service",
        proposer=Identity(id="bob", kind="human"),
    )
    c = insert(store, created_at=T0 + timedelta(minutes=2), state=S.SUCCEEDED, target="cart")

    def ids(**query: object) -> list[str]:
        return [x.id for x in store.find_actions(ActionQuery(**query))]  # type: ignore[arg-type]

    assert ids() == [c, b, a]
    assert ids(limit=2) == [c, b]
    assert ids(states=frozenset({S.APPROVED, S.SUCCEEDED})) == [c, a]
    assert ids(environments=frozenset({"staging"})) == [b]
    assert ids(targets=frozenset({"cart"})) == [c, b]
    assert ids(action_types=frozenset({"restart_service"})) == [b]
    assert ids(proposer_id="bob") == [b]
    assert ids(since=T0 + timedelta(seconds=30)) == [c, b]
    assert ids(targets=frozenset({"cart"}), states=frozenset({S.APPROVED})) == []
    # Filter values are data, never SQL or patterns.
    assert ids(targets=frozenset({"' OR 1=1 --", "%"})) == []


def test_prefix_lookup_is_exact_and_takes_no_wildcards(store: Store) -> None:
    first = insert(store, id="01KAAAAAAA0000000000000001")
    second = insert(store, id="01KAAAAAAA0000000000000002")
    other = insert(store, id="01KBBBBBBB0000000000000001")
    assert store.action_ids_with_prefix("01KAAAAAAA", 10) == [first, second]
    assert store.action_ids_with_prefix("01KAAAAAAA", 1) == [first]
    assert store.action_ids_with_prefix(other, 10) == [other]
    assert store.action_ids_with_prefix("01kaaaaaaa", 10) == []  # case as stored
    assert store.action_ids_with_prefix("01K_AAAAAA", 10) == []
    assert store.action_ids_with_prefix("01K%", 10) == []
    assert store.action_ids_with_prefix("ZZZZZZ", 10) == []


def test_neighbours_give_the_shortest_unique_prefix(store: Store) -> None:
    first = insert(store, id="01KAAAAAAA0000000000000001")
    second = insert(store, id="01KAAAAAAA0000000000000002")
    alone = insert(store, id="01KCCCCCCC0000000000000001")
    assert store.neighbour_ids(first) == (None, second)
    assert store.neighbour_ids(second) == (first, alone)
    assert store.neighbour_ids(alone) == (second, None)
    short = short_ids(store, [first, second, alone])
    assert short == {first: first, second: second, alone: alone[:MIN_SHOWN]}
    for full, prefix in short.items():
        assert resolve(store, prefix.lower()) == full


def test_resolve_refuses_short_odd_ambiguous_and_unknown(store: Store) -> None:
    insert(store, id="01KAAAAAAA0000000000000001")
    insert(store, id="01KAAAAAAA0000000000000002")
    with pytest.raises(InvalidInput, match=r"ambiguous.*01KAAAAAAA0000000000000001"):
        resolve(store, "01kaaa")
    with pytest.raises(InvalidInput, match="too short"):
        resolve(store, "01KAA")
    for bad in ("01KAAA%", "01KAAA_", "01KAAA'--", "01KAAA\x1b[2J", ""):
        with pytest.raises(InvalidInput):
            resolve(store, bad)
    with pytest.raises(InvalidInput, match="longer"):
        resolve(store, "01KAAAAAAA0000000000000001" + "0")
    with pytest.raises(NotFound):
        resolve(store, "01KZZZ")


def test_holders_name_what_holds_a_target(store: Store) -> None:
    pending = insert(store, state=S.PENDING_APPROVAL)
    approved = insert(store, state=S.APPROVED, created_at=T0)
    running = insert(store, state=S.EXECUTING, created_at=T0 + timedelta(seconds=1))
    insert(store, state=S.APPROVED, environment="staging")
    with store.transaction() as tx:
        tx.insert_execution(make_execution(running))
        in_tx = tx.holders_on_target("checkout", "prod", running=False)
    assert in_tx == [(running, "executing"), (approved, "approved")]
    assert store.holders_on_target("checkout", "prod", running=False, exclude_id=running) == [
        (approved, "approved")
    ]
    assert store.holders_on_target("checkout", "prod", running=True) == [(running, "executing")]
    assert pending not in {i for i, _ in in_tx}


def test_log_ids_are_prefixes_the_commands_take(store: Store) -> None:
    action_id = insert(store)
    assert len(log_id(action_id)) == LOG_LENGTH
    assert resolve(store, log_id(action_id)) == action_id


def test_shortest_unique_never_goes_below_the_shown_minimum() -> None:
    assert shortest_unique("01KAAAAAAA0000000000000001", [None, None]) == "01KAAAAA"
    assert shortest_unique("01KAAAAAAA0000000000000001", ["01KAAAAAAB"]) == "01KAAAAAAA"
