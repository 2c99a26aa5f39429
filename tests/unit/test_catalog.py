"""The catalog: a broken file is one clear error naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from opsgate.catalog import load_catalog
from opsgate.errors import InvalidInput

ROOT = Path(__file__).resolve().parents[2]
GOOD = """name: restart_service
params:
  deployment: {type: string, pattern: "^[a-z-]+$"}
run: {argv: [kubectl, rollout, restart, "deployment/{deployment}"]}
"""


def test_default_catalog_loads_with_verification() -> None:
    catalog = load_catalog(ROOT / "catalog")
    assert {
        "restart_service",
        "scale_deployment",
        "rollback_deploy",
        "toggle_feature_flag",
        "drain_node",
    } <= set(catalog.types)
    assert not catalog.get("drain_node").reversible
    for action_type in catalog:
        assert action_type.verification.defined, action_type.name


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("name: [unclosed", "line 1"),
        (GOOD + "colour: blue\n", "colour: unknown field"),
        (
            GOOD.replace(
                'run: {argv: [kubectl, rollout, restart, "deployment/{deployment}"]}',
                'run: {argv: "kubectl rollout restart"}',
            ),
            "run.argv",
        ),
        (
            GOOD.replace("deployment/{deployment}", "deployment/{deploy}"),
            "unknown placeholder {deploy}",
        ),
        (GOOD.replace("type: string", "type: text"), "params.deployment.type"),
        (GOOD.replace("^[a-z-]+$", "^[a-z"), "params.deployment.pattern"),
        ("- just a list\n", "expected a mapping"),
    ],
)
def test_broken_file_names_file_and_field(tmp_path: Path, content: str, expected: str) -> None:
    (tmp_path / "broken.yaml").write_text(content)
    with pytest.raises(InvalidInput) as excinfo:
        load_catalog(tmp_path)
    message = str(excinfo.value)
    assert "broken.yaml" in message and expected in message and "\n" not in message


def test_duplicate_names_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text(GOOD)
    with pytest.raises(InvalidInput, match="defined twice"):
        load_catalog(tmp_path)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="OPSGATE_CATALOG"):
        load_catalog(tmp_path / "nope")
