"""Start-up: commands load only what they use (the timings are in bench/startup.py), and a
reading command never creates a database or directories."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("sqlalchemy", "pydantic", "rich", "regopy", "plotly", "alembic", "requests", "yaml")
PROBE = """
import sys
from opsgate.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("LOADED", ",".join(heavy), file=sys.stderr)
sys.exit(code)
"""


def run_probe(tmp_path: Path, *args: str) -> tuple[int, set[str], str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OPSGATE_")},
        "PYTHONPATH": str(ROOT),
        "OPSGATE_DB": f"sqlite:///{tmp_path / 'opsgate.db'}",
        "OPSGATE_CATALOG": str(ROOT / "catalog"),
        "OPSGATE_POLICIES": str(ROOT / "policies"),
        "OPSGATE_IDENTITY": "env",
        "OPSGATE_USER": "alice",
    }
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    line = next(x for x in result.stderr.splitlines() if x.startswith("LOADED"))
    loaded = set(filter(None, line.removeprefix("LOADED").strip().split(",")))
    return result.returncode, loaded, result.stdout


def test_version_and_help_load_no_dependency(tmp_path: Path) -> None:
    code, loaded, out = run_probe(tmp_path, "--version")
    assert code == 0 and "opsgate, version" in out
    assert loaded == set()
    assert not (tmp_path / "opsgate.db").exists()


def test_queue_loads_the_store_and_nothing_it_does_not_use(tmp_path: Path) -> None:
    code, _, _ = run_probe(tmp_path, "init")
    assert code == 0
    code, loaded, out = run_probe(tmp_path, "queue")
    assert code == 0 and "nothing waits for approval" in out
    # No policy engine, catalog YAML, HTTP client, charts or migrations for a read.
    assert loaded <= {"sqlalchemy", "pydantic", "rich"}, loaded


@pytest.mark.parametrize(
    "args",
    [
        ["list"],
        ["queue"],
        ["show", "01KAAAAAAA"],
        ["audit", "verify"],
        ["audit", "export"],
        ["report"],
        ["workers"],
        ["watch", "01KAAAAAAA"],
    ],
)
def test_reads_never_create_a_database_or_directories(tmp_path: Path, args: list[str]) -> None:
    for url in ("sqlite:///relative.db", "sqlite:///sub/dir/opsgate.db"):
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("OPSGATE_")},
            "PYTHONPATH": str(ROOT),
            "OPSGATE_DB": url,
            "OPSGATE_IDENTITY": "env",
            "OPSGATE_USER": "alice",
        }
        result = subprocess.run(
            [sys.executable, "-m", "opsgate", *args, "--json"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 1, result.stderr
        assert "there is no store at" in result.stderr
        assert list(tmp_path.iterdir()) == [], result.stderr
