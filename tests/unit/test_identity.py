"""Who acts is never self-asserted: no LOGNAME, no config file in the working directory,
no OPSGATE_USER on a shared store or through a server."""

from __future__ import annotations

from pathlib import Path

import pytest

from opsgate.cli import main
from opsgate.cli.context import CliConfig
from opsgate.config import Settings
from opsgate.errors import ConfigError
from opsgate.identity import identity_provider
from opsgate.testing import MemoryStore

ROOT = Path(__file__).resolve().parents[2]


class _PgUrlStore(MemoryStore):
    """The identity check looks only at the store's URL; no server needed for that."""

    url = "postgresql+psycopg://opsgate@db.internal/opsgate"


def test_env_identity_is_refused_on_postgresql() -> None:
    settings = Settings(identity="env", user="bob")
    with pytest.raises(ConfigError, match="OPSGATE_IDENTITY=env is refused on a PostgreSQL"):
        identity_provider(settings, _PgUrlStore()).current()
    # Local single-user mode keeps it (the demo, a laptop).
    assert identity_provider(settings, MemoryStore()).current().id == "bob"


def test_env_identity_is_refused_with_a_server_url() -> None:
    settings = Settings(identity="env", user="bob")
    config = CliConfig(settings, env={"OPSGATE_URL": "http://127.0.0.1:9", "OPSGATE_TOKEN": "x"})
    with pytest.raises(ConfigError, match="refused when OPSGATE_URL is set"):
        config.identity()


def test_no_config_file_is_read_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "opsgate.toml").write_text(
        'db = "sqlite:////tmp/elsewhere.db"\npolicies = "/tmp/permissive"\n'
    )
    settings = Settings.load(env={})
    assert settings.db == Settings().db and settings.policies == Settings().policies


@pytest.mark.parametrize("key", ["identity", "user", "user_kind"])
def test_identity_settings_are_never_read_from_a_file(tmp_path: Path, key: str) -> None:
    path = tmp_path / "opsgate.toml"
    path.write_text(f'{key} = "env"\n')
    with pytest.raises(ConfigError, match="identity setting"):
        Settings.load(env={"OPSGATE_CONFIG": str(path)})
    path.write_text(f'[opsgate]\n{key} = "carol"\n')
    with pytest.raises(ConfigError, match="identity setting"):
        Settings.load(env={"OPSGATE_CONFIG": str(path)})


def test_a_named_config_file_still_sets_other_settings(tmp_path: Path) -> None:
    path = tmp_path / "team.toml"
    path.write_text('approval_ttl = "2h"\n')
    assert Settings.load(env={"OPSGATE_CONFIG": str(path)}).approval_ttl == 7200


def test_a_cwd_config_cannot_approve_as_someone_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The attack from the issue: `identity="env"`, `user="carol"` in ./opsgate.toml."""
    for name in ("OPSGATE_IDENTITY", "OPSGATE_USER", "OPSGATE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPSGATE_DB", f"sqlite:///{tmp_path / 'o.db'}")
    monkeypatch.setenv("OPSGATE_CATALOG", str(ROOT / "catalog"))
    monkeypatch.setenv("OPSGATE_POLICIES", str(ROOT / "policies"))
    monkeypatch.setenv("LOGNAME", "carol")
    monkeypatch.setenv("USER", "carol")
    (tmp_path / "opsgate.toml").write_text('identity = "env"\nuser = "carol"\n')
    assert main(["whoami", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"id": "carol"' not in out and '"method": "local (os)"' in out


def test_local_mcp_on_a_shared_store_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On PostgreSQL the agent's name would come from OPSGATE_AGENT_ID, which any caller
    sets: only `opsgate server` with an agent token may say who the agent is."""
    from opsgate.cli import main

    monkeypatch.delenv("OPSGATE_URL", raising=False)
    monkeypatch.setenv("OPSGATE_DB", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("OPSGATE_AGENT_ID", "someone-elses-agent")
    assert main(["mcp"]) == 2
    err = capsys.readouterr().err
    assert "opsgate mcp on a PostgreSQL store is refused" in err and "OPSGATE_URL" in err
