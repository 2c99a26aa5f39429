"""Runners: argv without a shell, timeouts, capped and masked output, HTTP steps."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from opsgate.executor.runners import (
    OUTPUT_CAP,
    RunnerRegistry,
    ShellRunner,
    StepResult,
    render_argv,
    render_url,
)
from opsgate.models import Step

PY = sys.executable


def step(**fields: Any) -> Step:
    return Step.model_validate(fields)


def test_shell_captures_stdout_as_value() -> None:
    result = ShellRunner().run(step(argv=[PY, "-c", "print('  7 ')"]), {})
    assert result.ok and result.exit_code == 0 and result.value == "7"


def test_shell_metacharacters_stay_literal() -> None:
    evil = "x; echo pwned && $(touch /tmp/opsgate-pwned) `id`"
    result = ShellRunner().run(
        step(argv=[PY, "-c", "import sys; print(sys.argv[1])", "{p}"]), {"p": evil}
    )
    assert result.ok and result.value == evil


def test_shell_failure_and_stderr() -> None:
    script = "import sys; sys.stderr.write('boom'); sys.exit(3)"
    result = ShellRunner().run(step(argv=[PY, "-c", script]), {})
    assert not result.ok and result.exit_code == 3
    assert result.error == "exit code 3" and "boom" in result.output


def test_shell_timeout_kills_the_process_group() -> None:
    started = time.monotonic()
    result = ShellRunner().run(
        step(argv=[PY, "-c", "import time; time.sleep(30)"], timeout="0.5s"), {}
    )
    assert not result.ok and result.error == "timed out after 0.5s"
    assert time.monotonic() - started < 10


def test_shell_cancel() -> None:
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    result = ShellRunner().run(
        step(argv=[PY, "-c", "import time; time.sleep(30)"]), {}, cancel=cancel
    )
    assert result.error == "cancelled"


def test_missing_program_is_a_failed_step() -> None:
    result = RunnerRegistry().run(step(argv=["/nonexistent/kubectl", "get"]), {})
    assert not result.ok and "cannot start" in (result.error or "")


def test_secrets_are_masked_and_output_capped() -> None:
    script = "import sys; print('token=' + sys.argv[1]); print('x' * 100000)"
    result = ShellRunner().run(
        step(argv=[PY, "-c", script, "{token}"]), {"token": "s3cr3t"}, secrets=["s3cr3t"]
    )
    assert "s3cr3t" not in result.output and "token=***" in result.output
    assert len(result.output) < OUTPUT_CAP + 200 and "more characters cut" in result.output


def test_option_like_values_are_refused() -> None:
    with pytest.raises(Exception, match="may not start with '-'"):
        render_argv(("kubectl", "get", "{name}"), {"name": "--all"})
    assert render_argv(("kubectl", "--replicas={n}"), {"n": -1}) == ["kubectl", "--replicas=-1"]


def test_urls_encode_values_but_keep_the_base() -> None:
    url = render_url("{base}/flags/{flag}", {"base": "http://127.0.0.1:9", "flag": "a/../b?x=1"})
    assert url == "http://127.0.0.1:9/flags/a%2F..%2Fb%3Fx%3D1"


class FlagHandler(BaseHTTPRequestHandler):
    flags: dict[str, Any] = {}

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        if name not in self.flags:
            self.send_response(404)
            self.end_headers()
            return
        body = json.dumps({"enabled": self.flags[name]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:
        length = int(self.headers["Content-Length"])
        document = json.loads(self.rfile.read(length))
        self.flags[self.path.rsplit("/", 1)[-1]] = document["enabled"]
        self.send_response(204)
        self.end_headers()


@pytest.fixture
def flag_server() -> Iterator[str]:
    FlagHandler.flags = {"new-pricing": False}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlagHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_http_capture_run_and_undo(flag_server: str) -> None:
    registry = RunnerRegistry()
    values = {"flag_service": flag_server, "flag": "new-pricing", "enabled": True}
    capture = registry.run(
        step(http={"method": "GET", "url": "{flag_service}/flags/{flag}", "extract": "enabled"}),
        values,
    )
    assert capture.ok and capture.value == "false"
    run = registry.run(
        step(
            http={
                "method": "PUT",
                "url": "{flag_service}/flags/{flag}",
                "body": {"enabled": "{enabled}"},
            }
        ),
        values,
    )
    assert run.ok and FlagHandler.flags["new-pricing"] is True
    missing = registry.run(
        step(http={"method": "GET", "url": "{flag_service}/flags/nope", "expect_status": [200]}),
        values,
    )
    assert not missing.ok and missing.exit_code == 404


def test_http_unreachable_is_a_failed_step() -> None:
    result = RunnerRegistry().run(
        step(http={"method": "GET", "url": "http://127.0.0.1:9/x"}, timeout="1s"), {}
    )
    assert not result.ok and result.exit_code is None and result.error


def test_third_party_runner_and_its_bugs() -> None:
    class Recorder:
        name = "recorder"

        def __init__(self) -> None:
            self.seen: list[Any] = []

        def run(self, step: Step, values: Any, **_: Any) -> StepResult:
            self.seen.append(dict(values))
            if values.get("explode"):
                raise RuntimeError("bug in plug-in")
            return StepResult(True, 0, "done", value="v")

    recorder = Recorder()
    registry = RunnerRegistry({"recorder": recorder})
    ok = registry.run(step(runner="recorder", argv=["anything"]), {"a": 1})
    assert ok.ok and recorder.seen == [{"a": 1}]
    broken = registry.run(step(runner="recorder", argv=["x"]), {"explode": True})
    assert not broken.ok and "bug in plug-in" in (broken.error or "")
    unknown = registry.run(step(runner="nope", argv=["x"]), {})
    assert not unknown.ok and "no runner named 'nope'" in (unknown.error or "")
