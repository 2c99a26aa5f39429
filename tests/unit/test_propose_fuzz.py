"""Random proposal documents: no traceback, no partial row, ever."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opsgate.catalog import load_catalog
from opsgate.errors import InvalidInput, StateConflict
from opsgate.gate import Gate
from opsgate.models import Identity
from opsgate.policies.embedded import EmbeddedEngine
from opsgate.store import open_store
from opsgate.store.base import Store

ROOT = Path(__file__).resolve().parents[2]
ALICE = Identity(id="alice", kind="human")

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["checkout", "prod", "scale_deployment", "12", "true", "", "\x00", "ü" * 5]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=12), inner, max_size=3)
    ),
    max_leaves=8,
)
field_names = st.sampled_from(
    ["action", "target", "environment", "params", "reason", "incident", "verification",
     "idempotency_key", "extra"]
)  # fmt: skip
param_values = st.dictionaries(
    st.sampled_from(["deployment", "replicas", "namespace", "node", "flag", "enabled", "x"]),
    values,
    max_size=4,
)
documents = st.one_of(
    values,
    st.fixed_dictionaries(
        {
            "action": st.sampled_from(
                [
                    "scale_deployment",
                    "restart_service",
                    "drain_node",
                    "toggle_feature_flag",
                    "rollback_deploy",
                    "nope",
                ]
            ),
            "target": st.one_of(st.sampled_from(["checkout", "cart"]), st.text(max_size=20)),
            "environment": st.sampled_from(["prod", "staging", "dev", "PROD", ""]),
            "params": param_values,
            "reason": st.text(max_size=50),
        },
        optional={
            "incident": st.dictionaries(
                st.sampled_from(["id", "severity", "class", "tier", "other"]), values, max_size=4
            ),
            "verification": st.dictionaries(
                st.sampled_from(["interval", "hold", "timeout", "signals", "failure_limit"]),
                values,
                max_size=3,
            ),
            "idempotency_key": st.text(max_size=10),
        },
    ),
    st.dictionaries(field_names, values, max_size=6),
)


@pytest.fixture(scope="module", params=["memory", "sqlite"])
def fuzz_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Store]:
    if request.param == "memory":
        store = open_store("memory://")
    else:
        store = open_store(f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'fuzz.db'}")
    store.migrate()
    yield store
    store.close()


@pytest.fixture(scope="module")
def fuzz_gate(fuzz_store: Store) -> Gate:
    return Gate(
        store=fuzz_store,
        catalog=load_catalog(ROOT / "catalog"),
        engine=EmbeddedEngine(ROOT / "policies"),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=documents)
def test_random_documents_never_crash_or_leave_partial_rows(fuzz_gate: Gate, document: Any) -> None:
    store = fuzz_gate.store
    before = store.row_counts()
    try:
        outcome = fuzz_gate.propose(document, ALICE)
    except (InvalidInput, StateConflict) as exc:
        assert str(exc) and "\n" not in str(exc)
        assert store.row_counts() == before
        return
    after = store.row_counts()
    if outcome.existing:
        assert after == before
    else:
        assert after["actions"] == before["actions"] + 1
        assert after["decisions"] == before["decisions"] + 1
        assert after["audit_events"] == before["audit_events"] + 1
        assert store.get_action(outcome.action.id) == outcome.action
