"""History stays readable and secrets stay masked whatever happens to today's catalog:
a broken file must not break `show`, and which params are secret is decided from the
proposal-time snapshot, not from the catalog as edited since."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.unit.test_cli import ROOT, SCALE, Cli

TOKEN = "S3CRET-tok-en"


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Cli:
    catalog = tmp_path / "catalog"
    shutil.copytree(ROOT / "catalog", catalog)
    scale = catalog / "scale_deployment.yaml"
    scale.write_text(
        scale.read_text().replace(
            "params:\n",
            "params:\n  token: {type: string, secret: true, required: false}\n",
            1,
        )
    )
    runner = Cli(monkeypatch, capsys, tmp_path / "opsgate.db")
    monkeypatch.setenv("OPSGATE_CATALOG", str(catalog))
    runner.catalog = catalog  # type: ignore[attr-defined]
    assert runner("init")[0] == 0
    return runner


def proposed(cli: Cli) -> str:
    document = cli.json(*SCALE, "--param", f"token={TOKEN}")
    assert document["action"]["params"]["token"] == "***"
    return str(document["action"]["id"])


def test_a_broken_catalog_file_does_not_break_show(cli: Cli) -> None:
    action_id = proposed(cli)
    (cli.catalog / "zz_broken.yaml").write_text("name: [unclosed\n")  # type: ignore[attr-defined]
    code, out, err = cli("show", action_id)
    assert code == 0, err
    assert action_id in out and "pending_approval" in out
    assert TOKEN not in out and "token=***" in out
    shown = cli.json("show", action_id)
    assert shown["action"]["params"]["token"] == "***"
    assert shown["action"]["params"]["replicas"] == 12
    # commands that need the catalog still say what is wrong, on one line
    code, _, err = cli("catalog", "list")
    assert code == 2 and "zz_broken.yaml" in err


def test_masking_follows_the_proposal_time_snapshot_not_todays_catalog(cli: Cli) -> None:
    action_id = proposed(cli)
    scale = cli.catalog / "scale_deployment.yaml"  # type: ignore[attr-defined]
    scale.write_text(scale.read_text().replace("secret: true", "secret: false"))
    code, out, _ = cli("show", action_id)
    assert code == 0 and TOKEN not in out
    assert cli.json("show", action_id)["action"]["params"]["token"] == "***"


def test_without_a_snapshot_or_a_catalog_entry_every_value_is_masked(cli: Cli) -> None:
    from opsgate.cli.render import masked
    from opsgate.store.sql import SqlStore

    action_id = proposed(cli)
    store = SqlStore(f"sqlite:///{cli.db}")
    try:
        action = store.get_action(action_id)
        assert action is not None
        # an action from before snapshots, whose type is gone from the catalog
        assert masked(action, None) == {k: "***" for k in action.params}
        events = list(store.audit_events(action_id=action_id))
        assert masked(action, None, events)["replicas"] == 12
        assert masked(action, None, events)["token"] == "***"
    finally:
        store.close()


def test_mcp_get_action_masks_by_snapshot_and_survives_a_broken_catalog(cli: Cli) -> None:
    from opsgate.cli.context import CliConfig
    from opsgate.config import Settings
    from opsgate.mcp_server import AgentTools
    from opsgate.models import Identity

    config = CliConfig(
        Settings(db=f"sqlite:///{cli.db}", catalog=cli.catalog, policies=ROOT / "policies")  # type: ignore[attr-defined]
    )
    tools = AgentTools(config.app, Identity(id="sre-agent", kind="agent"))
    try:
        tools.open()
        action_id = proposed(cli)
        scale = cli.catalog / "scale_deployment.yaml"  # type: ignore[attr-defined]
        scale.write_text(scale.read_text().replace("secret: true", "secret: false"))
        (cli.catalog / "zz_broken.yaml").write_text("name: [\n")  # type: ignore[attr-defined]
        got = tools.get_action({"action_id": action_id})
        assert got["action"]["params"]["token"] == "***"
        assert TOKEN not in str(got)
    finally:
        config.close()
