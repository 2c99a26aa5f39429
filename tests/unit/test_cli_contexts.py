"""The user config file with named contexts, and shell completion: through the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_cli import ROOT, SCALE, Cli


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "home" / "opsgate" / "config.toml"
    monkeypatch.setenv("OPSGATE_USER_CONFIG", str(path))
    monkeypatch.delenv("OPSGATE_CONTEXT", raising=False)
    return path


@pytest.fixture
def cli(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    config_file: Path,
) -> Cli:
    runner = Cli(monkeypatch, capsys, tmp_path / "prod.db")  # rows() counts prod's
    for name in ("prod", "staging"):
        monkeypatch.setenv("OPSGATE_DB", f"sqlite:///{tmp_path / name}.db")
        assert runner("init")[0] == 0
    # From here the store comes from the context, not the environment.
    monkeypatch.delenv("OPSGATE_DB")
    return runner


def test_contexts_round_trip_and_choose_the_store(
    cli: Cli, tmp_path: Path, config_file: Path
) -> None:
    prod, staging = f"sqlite:///{tmp_path / 'prod'}.db", f"sqlite:///{tmp_path / 'staging'}.db"
    assert cli("context", "set", "prod", f"db={prod}", "prometheus_password=s3cret")[0] == 0
    assert cli("context", "set", "staging", f"db={staging}", "lease=45s")[0] == 0
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    code, _, err = cli("context", "current")
    assert code == 4 and "no current context" in err
    assert cli("context", "use", "prod")[0] == 0
    assert cli("context", "current")[1].strip() == "prod"
    assert cli.json("context", "current") == {"current": "prod", "file": str(config_file)}
    assert cli.json("context", "path") == {"file": str(config_file)}
    listed = cli.json("context", "list")
    assert listed["current"] == "prod"
    assert [c["name"] for c in listed["contexts"]] == ["prod", "staging"]
    assert listed["contexts"][0]["settings"]["prometheus_password"] == "***"
    code, out, _ = cli("context", "show")
    assert code == 0 and "s3cret" not in out and f"db = {prod}" in out

    proposed = cli.json(*SCALE)["action"]["id"]  # stored in prod's database
    assert [a["id"] for a in cli.json("list")] == [proposed]
    assert cli.json("--context", "staging", "list") == []
    cli.monkeypatch.setenv("OPSGATE_CONTEXT", "staging")
    assert cli.json("list") == []
    cli.monkeypatch.setenv("OPSGATE_DB", prod)  # variables win over the context
    assert [a["id"] for a in cli.json("list")] == [proposed]
    cli.monkeypatch.delenv("OPSGATE_DB")
    cli.monkeypatch.delenv("OPSGATE_CONTEXT")

    assert cli("context", "set", "prod", "prometheus_password=")[0] == 0  # KEY= removes
    assert "prometheus_password" not in cli.json("context", "show", "prod")["settings"]
    assert cli("context", "delete", "prod")[0] == 0
    assert cli.json("context", "list")["current"] is None


def test_identity_never_comes_from_the_config_file(cli: Cli, config_file: Path) -> None:
    for key in ("identity=env", "user=carol", "user_kind=human", "agent_id=x"):
        code, _, err = cli("context", "set", "prod", "db=sqlite:///x.db", key)
        assert code == 2 and "identity setting" in err
    assert not config_file.exists()
    # A hand-written file naming who acts is refused by every command, not half-used.
    config_file.parent.mkdir(parents=True)
    config_file.write_text('current-context = "prod"\n[contexts.prod]\nuser = "carol"\n')
    config_file.chmod(0o600)
    before = cli.rows()
    code, _, err = cli(*SCALE)
    assert code == 2 and "identity setting" in err
    assert cli.rows() == before


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("current-context = \n", "config.toml"),
        ('current-context = "nope"\n', "context 'nope' is not defined"),
        ('[contexts.prod]\ndb = "x"\nlaese = "3s"\n', "did you mean 'lease'"),
        ('[contexts.prod]\ndb = ["a", "b"]\n', "must be a string, a number or true/false"),
        ('[contexts.prod]\ndb = "a\\u001b[2Jb"\n', "control characters"),
        ('[contexts."../../etc"]\ndb = "x"\n', "is not a context name"),
        ("extra = 1\n", "unknown key 'extra'"),
    ],
)
def test_a_bad_config_file_is_exit_2_naming_it(
    cli: Cli, config_file: Path, text: str, problem: str
) -> None:
    config_file.parent.mkdir(parents=True)
    config_file.write_text(text)
    config_file.chmod(0o600)
    code, out, err = cli("list")
    assert code == 2 and out == "" and problem in err and err.count("\n") == 1


def test_a_config_file_others_may_write_is_refused(cli: Cli, config_file: Path) -> None:
    assert cli("context", "set", "prod", "db=sqlite:///x.db")[0] == 0
    assert cli("context", "use", "prod")[0] == 0
    config_file.chmod(0o666)
    code, _, err = cli("list")
    assert code == 2 and "may be written by other users" in err


def test_context_commands_refuse_bad_input(cli: Cli, config_file: Path) -> None:
    for args, field in (
        (["context", "use", "nope"], None),
        (["context", "set", "a b", "db=x"], "name"),
        (["context", "set", "x" * 64, "db=x"], "name"),
        (["context", "set", "prod", "novalue"], "KEY=VALUE"),
        (["context", "set", "prod", "lease=soon"], "prod"),
        (["context", "set", "prod", "dbb=x"], "dbb"),
    ):
        code, _, err = cli(*args)
        if field is None:
            assert code == 4, err
        else:
            assert code == 2 and field in err, (args, err)
    # Quotes and TOML syntax in a value are data, read back exactly.
    tricky = 'sqlite:///a"b]\n'.strip() + "'c = 1"
    assert cli("context", "set", "odd", f"db={tricky}")[0] == 0
    assert cli.json("context", "show", "odd")["settings"]["db"] == tricky
    # A current-context that no longer exists breaks reads, but `context` can repair it.
    config_file.write_text(
        config_file.read_text().replace("[contexts.", 'current-context = "gone"\n[contexts.', 1)
    )
    assert cli("list")[0] == 2
    assert cli("context", "use", "odd")[0] == 0


def completions(env: dict[str, str], words: str, cword: int) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "opsgate"],
        env={**env, "_OPSGATE_COMPLETE": "bash_complete", "COMP_WORDS": words,
             "COMP_CWORD": str(cword)},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return [line.split(",", 1)[1] for line in result.stdout.splitlines() if line]


def test_completion_of_commands_types_environments_and_ids(cli: Cli, tmp_path: Path) -> None:
    cli.monkeypatch.setenv("OPSGATE_DB", f"sqlite:///{tmp_path / 'prod'}.db")
    action_id = cli.json(*SCALE)["action"]["id"]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OPSGATE_")},
        "PYTHONPATH": str(ROOT),
        "OPSGATE_DB": f"sqlite:///{tmp_path / 'prod'}.db",
        "OPSGATE_CATALOG": str(ROOT / "catalog"),
        "OPSGATE_POLICIES": str(ROOT / "policies"),
    }
    assert completions(env, "opsgate li", 1) == ["list"]
    assert set(completions(env, "opsgate ", 1)) >= {"list", "watch", "context", "completion"}
    assert completions(env, "opsgate propose scale", 2) == ["scale_deployment"]
    assert completions(env, "opsgate catalog show dr", 3) == ["drain_node"]
    assert completions(env, "opsgate list --env ", 3) == ["dev", "prod", "staging"]
    assert completions(env, f"opsgate approve {action_id[:8].lower()}", 2) == [action_id]
    assert completions(env, "opsgate show ZZZZZZ", 2) == []
    assert completions(env, "opsgate lsit x", 2) == []  # a typo completes nothing, quietly
    # No store: nothing offered, nothing created, no traceback in the shell.
    missing = {**env, "OPSGATE_DB": f"sqlite:///{tmp_path / 'none' / 'x.db'}"}
    assert completions(missing, "opsgate show 0", 2) == []
    assert not (tmp_path / "none").exists()


def test_completion_scripts_and_a_real_bash(cli: Cli, tmp_path: Path) -> None:
    for shell, marker in (("bash", "complete -o"), ("zsh", "compdef"), ("fish", "complete")):
        code, out, _ = cli("completion", shell)
        assert code == 0 and "_OPSGATE_COMPLETE" in out and marker in out
    code, _, err = cli("completion", "tcsh")
    assert code == 2 and "tcsh" in err
    bash = shutil.which("bash")
    script = shutil.which("opsgate", path=str(Path(sys.executable).parent))
    if bash is None or script is None:
        pytest.fail("bash and the opsgate console script are needed for this test")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OPSGATE_")},
        "PATH": f"{Path(script).parent}:{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "OPSGATE_DB": f"sqlite:///{tmp_path / 'prod'}.db",
        "OPSGATE_CATALOG": str(ROOT / "catalog"),
        "OPSGATE_POLICIES": str(ROOT / "policies"),
    }
    program = (
        'eval "$(opsgate completion bash)"; COMP_WORDS=(opsgate propose res); COMP_CWORD=2; '
        '_opsgate_completion opsgate; echo "${COMPREPLY[@]}"'
    )
    result = subprocess.run(
        [bash, "--norc", "-c", program], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["restart_service"]
    assert json.dumps(result.stdout)  # plain text, nothing else


def test_oversized_config_and_values_are_refused(cli: Cli, config_file: Path) -> None:
    code, _, err = cli("context", "set", "prod", "db=" + "x" * 5000)
    assert code == 2 and "too long" in err
    config_file.parent.mkdir(parents=True)
    config_file.write_text("# filler\n" * 40_000)
    config_file.chmod(0o600)
    code, _, err = cli("list")
    assert code == 2 and "larger than" in err
