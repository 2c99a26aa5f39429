"""The application object: one reload rule for the catalog, one set of parts per process,
and entry points that are siblings (nothing outside opsgate/cli imports the CLI)."""

from __future__ import annotations

import ast
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import opsgate
from opsgate.app import RELOAD_CHECK_SECONDS, App, Reloading
from opsgate.config import Settings
from opsgate.errors import InvalidInput

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(opsgate.__file__).resolve().parent


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def touch(path: Path, text: str) -> None:
    """Write and move the mtime on, so the edit shows even within the clock's resolution."""
    path.write_text(text)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


class Files:
    """A directory of text files whose load counts its calls; `bad` in a file fails it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir()
        self.loads = 0

    def files(self) -> list[Path]:
        return sorted(self.directory.iterdir())

    def load(self) -> str:
        self.loads += 1
        text = "".join(p.read_text() for p in self.files())
        if "bad" in text:
            raise InvalidInput("file", f"cannot parse {text!r}")
        return text


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path / "files")


def test_files_are_looked_at_once_per_interval_and_reloaded_only_when_they_change(
    files: Files,
) -> None:
    clock = Clock()
    touch(files.directory / "a", "one")
    value = Reloading("thing", files.files, files.load, clock=clock)
    assert value() == "one" and files.loads == 1
    touch(files.directory / "a", "two")
    assert value() == "one"  # within the interval: not even a stat
    clock.now += RELOAD_CHECK_SECONDS
    assert value() == "two" and files.loads == 2
    clock.now += RELOAD_CHECK_SECONDS
    assert value() == "two" and files.loads == 2  # unchanged files are not read again
    touch(files.directory / "b", "three")  # a new file is a change
    clock.now += RELOAD_CHECK_SECONDS
    assert value() == "twothree" and files.loads == 3


def test_a_broken_edit_keeps_the_last_good_value_and_is_reported_once(
    files: Files, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    touch(files.directory / "a", "good")
    value = Reloading("thing", files.files, files.load, clock=clock)
    assert value() == "good"
    touch(files.directory / "a", "bad!")
    for _ in range(3):
        clock.now += RELOAD_CHECK_SECONDS
        assert value() == "good"
    assert value.failures == 1 and files.loads == 2  # the same broken edit is tried once
    assert value.error is not None and "bad!" in value.error
    assert [r.levelname for r in caplog.records] == ["ERROR"]
    assert "last good" in caplog.records[0].getMessage()

    touch(files.directory / "a", "bad again")  # another broken edit: reported again
    clock.now += RELOAD_CHECK_SECONDS
    assert value() == "good" and value.failures == 2

    touch(files.directory / "a", "fixed")
    clock.now += RELOAD_CHECK_SECONDS
    assert value() == "fixed" and value.error is None


def test_a_directory_that_goes_away_keeps_the_last_good_value(files: Files) -> None:
    clock = Clock()
    touch(files.directory / "a", "good")

    def load() -> str:
        if not files.directory.is_dir():
            raise InvalidInput("catalog", "not a directory")
        return files.load()

    value = Reloading("thing", files.files, load, clock=clock)
    assert value() == "good"
    shutil.rmtree(files.directory)
    clock.now += RELOAD_CHECK_SECONDS
    assert value() == "good" and value.failures == 1
    clock.now += RELOAD_CHECK_SECONDS
    assert value() == "good" and value.failures == 1


def test_nothing_good_loaded_yet_fails_closed_on_every_call(files: Files) -> None:
    touch(files.directory / "a", "bad")
    value = Reloading("thing", files.files, files.load, clock=Clock())
    for _ in range(2):
        with pytest.raises(InvalidInput, match="cannot parse"):
            value()
    assert files.loads == 2 and value.failures == 0


def test_an_unexpected_error_in_a_reload_keeps_the_last_good_value(files: Files) -> None:
    clock = Clock()
    touch(files.directory / "a", "good")
    answers: list[str | Exception] = ["good", RecursionError("deep yaml")]

    def load() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    value = Reloading("thing", files.files, load, clock=clock)
    assert value() == "good"
    touch(files.directory / "a", "changed")
    clock.now += RELOAD_CHECK_SECONDS
    assert value() == "good" and value.error == "deep yaml"


# --- the app -----------------------------------------------------------------------------


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[App, Path, Clock]]:
    catalog = tmp_path / "catalog"
    shutil.copytree(ROOT / "catalog", catalog)
    clock = Clock()
    app = App(Settings(db="memory://", catalog=catalog, policies=ROOT / "policies"), clock=clock)
    try:
        yield app, catalog, clock
    finally:
        app.close()


def test_the_gate_follows_the_catalog_and_shares_everything_else(
    app: tuple[App, Path, Clock],
) -> None:
    app_, catalog, clock = app
    gate = app_.gate
    assert app_.gate is gate  # nothing changed: the same gate
    assert gate.catalog is app_.catalog() and gate.store is app_.store

    restart = (catalog / "restart_service.yaml").read_text()
    touch(
        catalog / "restart_worker.yaml",
        restart.replace("name: restart_service", "name: restart_worker"),
    )
    clock.now += RELOAD_CHECK_SECONDS
    edited = app_.gate
    assert "restart_worker" in edited.catalog.types
    assert edited.store is gate.store and edited.engine is gate.engine
    assert edited.preconditions is gate.preconditions

    touch(catalog / "restart_worker.yaml", "name: [broken\n")
    clock.now += RELOAD_CHECK_SECONDS
    assert app_.gate is edited and app_.catalogs.failures == 1


# --- the entry points are siblings -------------------------------------------------------


def imported_modules(source: str, package: str) -> set[str]:
    """Every module `source` (a module of `package`) imports, at the top or in a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_nothing_outside_the_cli_imports_the_cli() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "cli" or relative == Path("__main__.py"):
            continue  # the CLI itself, and `python -m opsgate`, which runs it
        package = ".".join(("opsgate", *relative.parent.parts))
        for module in imported_modules(path.read_text(encoding="utf-8"), package):
            if module == "opsgate.cli" or module.startswith("opsgate.cli."):
                offenders.append(f"{relative}: {module}")
    assert offenders == []


def test_the_import_scan_sees_every_form_of_import() -> None:
    # The scan above passes on an empty answer: it must see each way of writing an import.
    source = (
        "import opsgate.cli.render\n"
        "from opsgate.cli import main\n"
        "def later():\n"
        "    from ..cli.context import CliConfig\n"
        "    from . import cli\n"
    )
    found = imported_modules(source, "opsgate.server")
    assert {"opsgate.cli.render", "opsgate.cli", "opsgate.cli.context"} <= found
    assert "opsgate.server.cli" in found
    assert imported_modules("from .cli import render\n", "opsgate") >= {"opsgate.cli"}
