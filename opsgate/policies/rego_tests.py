"""Run a policy bundle's Rego unit tests (`test_*` rules) in the embedded engine (regopy).

Every `.rego` file of the bundle (tests included) is loaded as a module and every JSON
file as data, the way the engine loads them (`data.json` at the root merges at the root
of `data`, `a/b/data.json` under `data.a.b`). Test rules are found with a regex over the
sources (`test_*` at the start of a line, in the file's `package`), and each one is
queried as `data.<package>.<rule>`. A test passes only if the query succeeds and the
value is exactly `true`.

The interpreter runs with strict built-in errors, as the engine does, so a builtin that
errors in this engine makes its test fail instead of silently making a rule undefined.

The run happens in a child process (`--results-json`), because rego-cpp can abort the
process or never return. Within it, regopy 1.5.2 can crash when an errored output is
read, so the run only calls `ok()` on an errored output; the error message is then
fetched from a grandchild (`--explain`), where a crash costs nothing but the message.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regopy

from opsgate.policies.engine import load_bundle_data

TEST_RULE_RE = re.compile(r"^(test_[A-Za-z0-9_]+)", re.MULTILINE)
PACKAGE_RE = re.compile(
    r"^package[ \t]+([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)", re.M
)
NO_SAFE_MESSAGE = "evaluation error (regopy gives no safe message)"
# Errored tests beyond this many are reported without a child process each.
MAX_EXPLAINED_ERRORS = 10
EXPLAIN_TIMEOUT_SECONDS = 60.0
RUN_TIMEOUT_SECONDS = 300.0

# regopy NodeKind values for error nodes (regopy.rego_shared.NodeKind).
_ERROR_MESSAGE = 1801
_ERROR_AST = 1802
_ERROR_CODE = 1803


@dataclass(frozen=True)
class RegoTestResult:
    """One `test_*` rule: passed only if it evaluated to exactly `true`."""

    package: str
    name: str
    file: str
    passed: bool
    error: str | None = None

    @property
    def status(self) -> str:
        """`pass`, `fail` (false or undefined) or `error` (anything else)."""
        if self.passed:
            return "pass"
        return "fail" if self.error is None else "error"

    @property
    def rule(self) -> str:
        """The rule's full path, as queried: `data.<package>.<name>`."""
        return f"data.{self.package}.{self.name}"


@dataclass(frozen=True)
class _TestRule:
    package: str
    name: str
    file: str


class BundleLoadError(Exception):
    """The bundle's modules or data could not be loaded into the interpreter."""


def rego_files(bundle_dir: Path) -> list[Path]:
    """Every `.rego` file of the bundle, tests included, in a stable order."""
    files = [p for p in bundle_dir.rglob("*.rego") if p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(bundle_dir).as_posix())


def discover_tests(bundle_dir: Path) -> list[_TestRule]:
    """`test_*` rules by regex over the sources; a rule defined twice is listed once."""
    seen: set[tuple[str, str]] = set()
    tests: list[_TestRule] = []
    for path in rego_files(bundle_dir):
        source = path.read_text(encoding="utf-8")
        package = PACKAGE_RE.search(source)
        if package is None:
            continue
        relative = path.relative_to(bundle_dir).as_posix()
        for match in TEST_RULE_RE.finditer(source):
            key = (package.group(1), match.group(1))
            if key not in seen:
                seen.add(key)
                tests.append(_TestRule(key[0], key[1], relative))
    return tests


def _describe_load_error(exc: BaseException, source: str, name: str) -> str:
    """rego-cpp errors are s-expressions with byte offsets: one line, file:line:col."""
    from opsgate.policies.fidelity import readable_rego_error

    return readable_rego_error(str(exc), {name: source})


def new_interpreter(bundle_dir: Path) -> Any:
    """An interpreter with every module (tests included) and the bundle's data."""
    interp = regopy.Interpreter()
    interp.strict_built_in_errors = True
    # rego-cpp prints compile errors on stdout; they are reported in the results instead.
    interp.log_level = regopy.LogLevel.NONE
    try:
        data = load_bundle_data(bundle_dir)
    except (OSError, ValueError) as exc:
        raise BundleLoadError(f"cannot load the bundle's data: {exc}") from exc
    try:
        interp.add_data(data)
    except regopy.RegoError as exc:
        raise BundleLoadError(f"cannot add the bundle's data: {exc}") from exc
    for path in rego_files(bundle_dir):
        name = path.relative_to(bundle_dir).as_posix()
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BundleLoadError(f"cannot read {name}: {exc}") from exc
        try:
            interp.add_module(name, source)
        except regopy.RegoError as exc:
            raise BundleLoadError(_describe_load_error(exc, source, name)) from exc
    # Without an input every query fails in regopy 1.5.2; tests replace its fields.
    interp.set_input({})
    return interp


def entrypoint(package: str, name: str) -> str:
    """The bundle entrypoint of `data.<package>.<name>`."""
    return "/".join([*package.split("."), name])


def _value_of(output: Any) -> tuple[bool, Any]:
    """(True, value) on success (None when undefined), (False, None) on an error."""
    # Anything but ok() on an errored output may crash the process in regopy 1.5.2.
    if not output.ok():
        return False, None
    text = str(output).strip()
    if text == "undefined":
        return True, None
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return False, None
    expressions = document.get("expressions") if isinstance(document, dict) else None
    if not isinstance(expressions, list) or len(expressions) != 1:
        return True, None
    return True, expressions[0]


def _sources(bundle_dir: Path) -> dict[str, str]:
    return {
        p.relative_to(bundle_dir).as_posix(): p.read_text(encoding="utf-8", errors="replace")
        for p in rego_files(bundle_dir)
    }


def _build(interp: Any, entrypoints: list[str], bundle_dir: Path) -> Any:
    """Compile the modules once for every entrypoint (a plain query recompiles each time)."""
    try:
        bundle = interp.build(None, entrypoints)
    except (regopy.RegoError, ValueError) as exc:
        from opsgate.policies.fidelity import readable_rego_error

        detail = readable_rego_error(str(exc), _sources(bundle_dir))
        raise BundleLoadError(f"compile error: {detail}") from exc
    if not bundle.ok():
        raise BundleLoadError("compile error (regopy gives no message)")
    return bundle


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Point fd 1 at stderr meanwhile: rego-cpp writes Rego print() output to the process's
    stdout, which must stay clean for `--json`."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def bundle_problems(bundle_dir: Path) -> list[str]:
    """Why the embedded engine would refuse this bundle (its policy files, tests excluded)."""
    from opsgate.policies.engine import bundle_files
    from opsgate.policies.fidelity import opa_compile_error, scan

    try:
        modules = [
            (p.relative_to(bundle_dir).as_posix(), p.read_text(encoding="utf-8"))
            for p in bundle_files(bundle_dir)
            if p.suffix == ".rego"
        ]
    except (OSError, UnicodeDecodeError) as exc:
        return [f"cannot read the bundle: {exc}"]
    problems = [str(r) for r in scan(modules)]
    rejected = opa_compile_error(modules) if modules else None
    if rejected is not None:
        problems.append(rejected)
    return problems


def run_rego_tests(
    bundle_dir: Path, *, timeout: float = RUN_TIMEOUT_SECONDS
) -> list[RegoTestResult]:
    """Run every `test_*` rule of the bundle in a child process; see the module docstring.

    A bundle that does not load is one failed result, `(bundle)`, with the error once;
    a bundle the embedded engine refuses adds one such result per reason. rego-cpp can
    abort the process (an internal assertion on some `with` expressions) or never return
    (`replace(s, "", r)`): in the child that costs the run, reported as one `(bundle)`
    error, instead of the caller.
    """
    bundle_dir = Path(bundle_dir)
    command = [sys.executable, "-m", "opsgate.policies.rego_tests", "--results-json"]
    try:
        proc = subprocess.run(
            [*command, str(bundle_dir)],
            capture_output=True,
            timeout=timeout,
            env=_child_env(),
            check=False,
        )
    except subprocess.TimeoutExpired:
        return [_bundle_error(bundle_dir, f"the tests did not finish within {timeout:g}s")]
    except OSError as exc:
        return [_bundle_error(bundle_dir, f"cannot run the tests: {exc}")]
    lines = proc.stdout.decode("utf-8", "replace").strip().splitlines()
    try:
        rows = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    except json.JSONDecodeError:
        rows = None
    if not isinstance(rows, list):
        stderr = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        why = f"exit {proc.returncode}" if proc.returncode >= 0 else f"signal {-proc.returncode}"
        last = f": {stderr[-1].strip()[:200]}" if stderr else ""
        return [_bundle_error(bundle_dir, f"regopy crashed running the tests ({why}){last}")]
    return [RegoTestResult(**row) for row in rows if isinstance(row, dict)]


def _bundle_error(bundle_dir: Path, message: str) -> RegoTestResult:
    return RegoTestResult("", "(bundle)", str(bundle_dir), False, message)


def _child_env() -> dict[str, str]:
    package_root = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(package_root), env.get("PYTHONPATH", "")) if p
    )
    return env


def run_in_process(bundle_dir: Path) -> list[RegoTestResult]:
    """The run itself, in this process (the child's side of run_rego_tests)."""
    with stdout_to_stderr():
        return _run(Path(bundle_dir))


def _run(bundle_dir: Path) -> list[RegoTestResult]:
    tests = discover_tests(bundle_dir)
    try:
        interp = new_interpreter(bundle_dir)
        bundle = (
            _build(interp, [entrypoint(t.package, t.name) for t in tests], bundle_dir)
            if tests
            else None
        )
    except BundleLoadError as exc:
        error = f"cannot load the bundle: {exc}"
        return [RegoTestResult("", "(bundle)", str(bundle_dir), False, error)]
    refused = [
        RegoTestResult("", "(bundle)", str(bundle_dir), False, problem)
        for problem in bundle_problems(bundle_dir)
    ]

    results: list[RegoTestResult] = []
    explained = 0
    for test in tests:
        try:
            output = interp.query_bundle_entrypoint(bundle, entrypoint(test.package, test.name))
            ok, value = _value_of(output)
        except (regopy.RegoError, ValueError):
            ok, value = False, None
        if ok and value is True:
            results.append(RegoTestResult(test.package, test.name, test.file, True))
        elif ok and (value is None or value is False):
            results.append(RegoTestResult(test.package, test.name, test.file, False))
        elif ok:
            shown = json.dumps(value)[:200]
            message = f"evaluated to {shown}, not true"
            results.append(RegoTestResult(test.package, test.name, test.file, False, message))
        else:
            if explained < MAX_EXPLAINED_ERRORS:
                explained += 1
                message = explain_error(bundle_dir, test.package, test.name)
            else:
                message = NO_SAFE_MESSAGE + " (not explained: too many errors)"
            results.append(RegoTestResult(test.package, test.name, test.file, False, message))
    return refused + results


def explain_error(bundle_dir: Path, package: str, name: str) -> str:
    """The error message of a failing query, fetched in a child process (crash-safe)."""
    env = _child_env()
    command = [sys.executable, "-m", "opsgate.policies.rego_tests", "--explain"]
    try:
        proc = subprocess.run(
            [*command, str(bundle_dir), f"{package}.{name}"],
            capture_output=True,
            text=True,
            timeout=EXPLAIN_TIMEOUT_SECONDS,
            env=env,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return NO_SAFE_MESSAGE
    if proc.returncode != 0:
        return NO_SAFE_MESSAGE
    # rego-cpp may print diagnostics to stdout too: the answer is the last line.
    lines = proc.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, str) or not answer:
        return NO_SAFE_MESSAGE
    return f"evaluation error: {answer}"


# ---------------------------------------------------------------------------
# Child-process side: read an errored output's error nodes (may crash; that is the point).


def _node_text(node: int) -> str:
    from regopy.rego_shared import rego

    size = rego.regoNodeValueSize(node)
    buffer = ctypes.create_string_buffer(size)
    rego.regoNodeValue(node, buffer, size)
    return str(buffer.value.decode("utf-8", "replace"))


def _leaf_texts(node: int, limit: int = 3) -> list[str]:
    from regopy.rego_shared import rego

    size = rego.regoNodeSize(node)
    if size == 0:
        return [_node_text(node)]
    texts: list[str] = []
    for index in range(size):
        texts.extend(_leaf_texts(rego.regoNodeGet(node, index), limit - len(texts)))
        if len(texts) >= limit:
            break
    return texts[:limit]


def _error_messages(output_impl: int) -> list[str]:
    from regopy.rego_shared import rego

    messages: list[str] = []
    root = rego.regoOutputNode(output_impl)
    if not root:
        return messages
    for index in range(rego.regoNodeSize(root)):
        error = rego.regoNodeGet(root, index)
        parts: dict[int, str] = {}
        for part_index in range(rego.regoNodeSize(error)):
            part = rego.regoNodeGet(error, part_index)
            kind = rego.regoNodeType(part)
            if kind == _ERROR_AST:
                parts[kind] = " ".join(t for t in _leaf_texts(part) if t)
            elif kind in (_ERROR_MESSAGE, _ERROR_CODE):
                parts[kind] = _node_text(part)
        text = parts.get(_ERROR_MESSAGE, "").strip() or "error"
        if parts.get(_ERROR_CODE):
            text += f" [{parts[_ERROR_CODE]}]"
        if parts.get(_ERROR_AST):
            text += f" at {parts[_ERROR_AST][:200]}"
        messages.append(text)
    return messages


def _explain_main(bundle_dir: Path, rule: str) -> int:
    package, _, name = rule.rpartition(".")
    try:
        interp = new_interpreter(bundle_dir)
        bundle = _build(interp, [entrypoint(package, name)], bundle_dir)
    except BundleLoadError as exc:
        print(json.dumps(str(exc)), flush=True)
        return 0
    try:
        output = interp.query_bundle_entrypoint(bundle, entrypoint(package, name))
    except regopy.RegoError as exc:
        print(json.dumps(" ".join(str(exc).split())[:500]), flush=True)
        return 0
    except ValueError as exc:
        print(json.dumps(f"the engine's answer is not valid JSON ({exc})"), flush=True)
        return 0
    if output.ok():
        print(json.dumps("no error when evaluated alone"), flush=True)
    else:
        print(json.dumps("; ".join(_error_messages(output._impl))), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opsgate.policies.rego_tests",
        description="Run a policy bundle's Rego unit tests with regopy.",
    )
    parser.add_argument("bundle", type=Path, help="the policy bundle directory")
    parser.add_argument("rule", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--explain", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--results-json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.explain:
        return _explain_main(args.bundle, args.rule or "")
    if args.results_json:
        rows = [r.__dict__ for r in run_in_process(args.bundle)]
        print(json.dumps(rows), flush=True)
        return 0
    results = run_rego_tests(args.bundle)
    for result in results:
        status = result.status.upper()
        detail = f": {result.error}" if result.error else ""
        print(f"{status:5} {result.rule} ({result.file}){detail}", flush=True)
    failed = sum(1 for r in results if not r.passed)
    print(f"{len(results) - failed}/{len(results)} passed", flush=True)
    return 0 if results and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
