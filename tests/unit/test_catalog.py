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


def test_published_schemas_are_standard_json_schema(tmp_path: Path) -> None:
    """A secret param is published as `writeOnly` (a JSON-Schema annotation), never with
    the catalog's own `secret` keyword, by `catalog show` and to agents over MCP."""
    import json

    import jsonschema
    from click.testing import CliRunner

    from opsgate.catalog import action_type_json, load_catalog, param_json_schema
    from opsgate.cli import cli

    (tmp_path / "rotate_key.yaml").write_text(
        "name: rotate_key\nrisk: low\n"
        "params:\n"
        "  service: {type: string, pattern: '^[a-z]{1,20}$'}\n"
        "  token: {type: string, secret: true, required: false}\n"
        "run: {argv: [echo, '{service}']}\n"
        "verification:\n"
        "  signals: [{name: ok, query: 'up', pass: {min: 1}}]\n"
    )
    catalog = load_catalog(tmp_path)
    spec = catalog.get("rotate_key")
    token = param_json_schema(spec.params["token"])
    assert token["writeOnly"] is True and "secret" not in token
    shown = CliRunner().invoke(
        cli, ["--catalog", str(tmp_path), "catalog", "show", "rotate_key", "--json"]
    )
    assert shown.exit_code == 0, shown.output
    published = json.loads(shown.stdout)["params"]
    over_mcp = action_type_json(spec)["params"]
    for schema in (published["token"], over_mcp["properties"]["token"]):
        assert schema.get("writeOnly") is True and "secret" not in schema
    # Every published schema is valid JSON Schema and validates as it should.
    jsonschema.Draft202012Validator.check_schema(over_mcp)
    validator = jsonschema.Draft202012Validator(over_mcp)
    assert validator.is_valid({"service": "web", "token": "x"})
    assert not validator.is_valid({"service": "Web!"})
    for schema in published.values():
        jsonschema.Draft202012Validator.check_schema(schema)
