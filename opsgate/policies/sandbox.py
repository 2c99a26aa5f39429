"""Policy evaluations in worker processes, each under a deadline.

regopy (rego-cpp) has no way to interrupt an evaluation: `replace(s, "", r)` spins
forever, and an errored output can abort the process. So the embedded engine never
evaluates in its own process. It hands each evaluation to a worker process
(`python -m opsgate.policies.sandbox`) over a pipe and waits at most the deadline; past
it the worker is killed (SIGKILL, then reaped) and a fresh one takes its place on the
next evaluation. Killing the process is what makes abandoning the evaluation safe: no
thread and no memory of it survives.

Protocol: one JSON document per line each way, on the worker's stdin and on a duplicate
of its original stdout. The worker points its own stdout (fd 1) at its stderr first, so
anything rego-cpp or a Rego `print()` writes can neither corrupt the protocol nor reach
the stdout of a `--json` command.

    {"op": "load", "evaluator": "regopy" | "opa", "revision": r,
     "modules": [[name, source], ...], "data": {...}, "entrypoints": [...]}
        -> {"ok": true} | {"ok": false, "error": "..."}
    {"op": "eval", "rule": "opsgate/decision", "input": {...}}
        -> {"ok": true, "value": v} | {"ok": true, "undefined": true}
         | {"ok": false, "error": "..."}

Evaluators: "regopy" (rego-cpp) and "opa" (OPA's Go evaluator, opa-golib-python-bindings).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opsgate.policies.engine import DEADLINE_EXCEEDED

# A fresh worker must start and compile the bundle within this many seconds. Separate
# from the per-decision deadline: a cold start is bounded, but it is not the policy's fault.
START_TIMEOUT_SECONDS = 20.0
# The longest line a worker may answer with; a longer one is a broken worker.
MAX_ANSWER_BYTES = 16 * 1024 * 1024
# A worker above this resident memory is killed mid-evaluation (regopy reaches ~1 GiB in a
# second on some built-ins); how often a busy worker's memory is read.
DEFAULT_MAX_MEMORY_BYTES = 512 * 1024 * 1024
MEMORY_CHECK_SECONDS = 0.02
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class SandboxError(Exception):
    """The worker did not answer in time, died, or answered nonsense (it has been killed)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


@dataclass(frozen=True)
class Payload:
    """What a worker compiles: exactly the bytes the parent hashed into `revision`."""

    revision: str
    modules: tuple[tuple[str, str], ...]
    data: Mapping[str, Any]
    entrypoints: tuple[str, ...]
    evaluator: str = "regopy"

    def message(self) -> dict[str, Any]:
        return {
            "op": "load",
            "evaluator": self.evaluator,
            "revision": self.revision,
            "modules": [list(m) for m in self.modules],
            "data": self.data,
            "entrypoints": list(self.entrypoints),
        }


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    revision: str | None = None
    buffer: bytearray = field(default_factory=bytearray)

    def send(self, message: Mapping[str, Any]) -> None:
        assert self.process.stdin is not None
        line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        try:
            self.process.stdin.write(line)
            self.process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as exc:
            raise SandboxError(f"the policy worker is gone ({exc})") from None

    def receive(
        self, deadline: float, activity: str, on_timeout: str, max_rss: int | None = None
    ) -> dict[str, Any]:
        """One answer line before `deadline`; past it SandboxError(on_timeout). With
        `max_rss` (bytes) the worker's resident memory is checked while it works."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SandboxError(on_timeout, timed_out=True)
            # An answer arrives within a slice on the fast path; the memory check runs only
            # while an evaluation keeps the worker busy.
            wait = left if max_rss is None else min(left, MEMORY_CHECK_SECONDS)
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                if max_rss is not None and self.rss() > max_rss:
                    raise SandboxError(
                        f"the policy worker used more than {max_rss >> 20} MiB during {activity}"
                    )
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                code = self.process.poll()
                raise SandboxError(f"the policy worker died (exit {code}) during {activity}")
            self.buffer += chunk
            if len(self.buffer) > MAX_ANSWER_BYTES:
                raise SandboxError("the policy worker's answer is too large")
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        try:
            answer = json.loads(line)
        except ValueError:
            raise SandboxError("the policy worker answered something that is not JSON") from None
        if not isinstance(answer, dict):
            raise SandboxError("the policy worker's answer is not an object")
        return answer

    def rss(self) -> int:
        """Resident memory in bytes (0 when it cannot be read)."""
        try:
            with open(f"/proc/{self.process.pid}/statm") as statm:
                return int(statm.read().split()[1]) * PAGE_SIZE
        except (OSError, ValueError, IndexError):
            return 0

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.process.send_signal(signal.SIGKILL)
        # SIGKILL cannot be refused; a zombie this long means the kernel is busy.
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def _spawn() -> _Worker:
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    # The worker must import this very opsgate (a worktree, a checkout) not another one.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    process = subprocess.Popen(
        [sys.executable, "-m", "opsgate.policies.sandbox"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None,
        env=env,
        close_fds=True,
        # Its own process group: a ^C to the CLI's group reaches opsgate, which ends it.
        start_new_session=True,
    )
    return _Worker(process)


class _Placeholder:
    """A slot reserved while a worker process starts (outside the pool's lock)."""


class WorkerPool:
    """Up to `size` worker processes; each evaluation checks one out for its duration."""

    def __init__(
        self,
        size: int = 2,
        timeout: float = 0.5,
        max_memory: int | None = DEFAULT_MAX_MEMORY_BYTES,
    ) -> None:
        if size < 1:
            raise ValueError("a worker pool needs at least one worker")
        if timeout <= 0:
            raise ValueError("the policy deadline must be positive")
        self.size = size
        self.timeout = timeout
        self.max_memory = max_memory
        self._idle: list[_Worker] = []
        self._live: list[_Worker | _Placeholder] = []
        self._cond = threading.Condition()
        self._closed = False
        # Counters for metrics and doctor.
        self.evaluations = 0
        self.timeouts = 0
        self.crashes = 0
        self.restarts = 0
        self.spawned = 0

    def _checkout(self, deadline: float) -> _Worker | None:
        with self._cond:
            while True:
                if self._closed:
                    raise SandboxError("the policy engine is closed")
                if self._idle:
                    return self._idle.pop()
                if len(self._live) < self.size:
                    placeholder = _Placeholder()
                    self._live.append(placeholder)
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
        try:
            worker = _spawn()
        except OSError as exc:
            with self._cond:
                self._live.remove(placeholder)
                self._cond.notify()
            raise SandboxError(f"cannot start a policy worker: {exc}") from None
        with self._cond:
            self._live[self._live.index(placeholder)] = worker
            self.spawned += 1
        return worker

    def _checkin(self, worker: _Worker) -> None:
        with self._cond:
            if self._closed:
                worker.kill()
            else:
                self._idle.append(worker)
            self._cond.notify()

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        with self._cond:
            if worker in self._live:
                self._live.remove(worker)
            self._cond.notify()

    def _checkout_warm(self, revision: str) -> _Worker | None:
        """An idle worker that already holds this revision, or None: never waits, never
        starts one."""
        with self._cond:
            if self._closed:
                raise SandboxError("the policy engine is closed")
            for i in range(len(self._idle) - 1, -1, -1):
                if self._idle[i].revision == revision:
                    return self._idle.pop(i)
        return None

    def evaluate_warm(
        self, payload: Payload, rule: str, input: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """As `evaluate`, but only on an idle worker with this bundle already loaded, so
        the answer comes within `timeout` (the evaluation's own deadline, nothing else
        to wait for); None when there is no such worker."""
        worker = self._checkout_warm(payload.revision)
        if worker is None:
            return None
        return self._ask(worker, rule, input, time.monotonic() + self.timeout)

    def evaluate(self, payload: Payload, rule: str, input: Mapping[str, Any]) -> dict[str, Any]:
        """The worker's answer for `rule`; raises SandboxError (worker discarded) otherwise."""
        start = time.monotonic()
        deadline = start + self.timeout
        worker = self._checkout(deadline)
        if worker is None:
            with self._cond:
                self.timeouts += 1
            raise SandboxError(
                f"{DEADLINE_EXCEEDED} ({self.timeout:g}s) waiting for a free policy worker",
                timed_out=True,
            )
        try:
            if worker.revision != payload.revision:
                worker.send(payload.message())
                loaded = worker.receive(
                    time.monotonic() + START_TIMEOUT_SECONDS,
                    "loading the bundle",
                    f"loading the bundle took more than {START_TIMEOUT_SECONDS:g}s",
                )
                if loaded.get("ok") is not True:
                    raise SandboxError(str(loaded.get("error") or "the bundle did not load"))
                worker.revision = payload.revision
                # The cold start is not the evaluation: its deadline starts now.
                deadline = time.monotonic() + self.timeout
        except SandboxError as exc:
            self._failed(worker, exc)
            raise
        except BaseException:
            self._discard(worker)
            raise
        return self._ask(worker, rule, input, deadline)

    def _ask(
        self, worker: _Worker, rule: str, input: Mapping[str, Any], deadline: float
    ) -> dict[str, Any]:
        """One evaluation on a checked-out, loaded worker; it is checked in after, or
        discarded (and SandboxError raised) when it fails."""
        try:
            worker.send({"op": "eval", "rule": rule, "input": input})
            answer = worker.receive(
                deadline,
                "the evaluation",
                f"evaluation {DEADLINE_EXCEEDED} ({self.timeout:g}s)",
                self.max_memory,
            )
        except SandboxError as exc:
            self._failed(worker, exc)
            raise
        except BaseException:
            self._discard(worker)
            raise
        with self._cond:
            self.evaluations += 1
        self._checkin(worker)
        return answer

    def _failed(self, worker: _Worker, exc: SandboxError) -> None:
        with self._cond:
            self.evaluations += 1
            if exc.timed_out:
                self.timeouts += 1
            else:
                self.crashes += 1
            self.restarts += 1
        self._discard(worker)

    def pids(self) -> list[int]:
        with self._cond:
            return [w.process.pid for w in self._live if isinstance(w, _Worker)]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            workers = [w for w in self._live if isinstance(w, _Worker)]
            self._live = []
            self._idle = []
            self._cond.notify_all()
        for worker in workers:
            worker.kill()


# ---------------------------------------------------------------------------------------
# The worker side.


class _Regopy:
    """rego-cpp, strict built-in errors, compiled once for the entrypoints."""

    def __init__(self, request: Mapping[str, Any]) -> None:
        import regopy

        self._errors: tuple[type[BaseException], ...] = (
            regopy.RegoError,
            RuntimeError,
            ValueError,
            TypeError,
        )
        interp = regopy.Interpreter()
        interp.strict_built_in_errors = True
        interp.log_level = regopy.LogLevel.NONE
        from opsgate.policies.fidelity import readable_rego_error

        modules = {str(name): str(source) for name, source in request.get("modules") or []}
        try:
            interp.add_data(request.get("data") or {})
            for name, source in modules.items():
                interp.add_module(name, source)
            self._bundle = interp.build(None, list(request.get("entrypoints") or []))
        except self._errors as exc:
            raise LoadError(readable_rego_error(str(exc), modules)) from None
        self._interp = interp

    def evaluate(self, rule: str, input: Any) -> dict[str, Any]:
        try:
            self._interp.set_input(input)
            output = self._interp.query_bundle_entrypoint(self._bundle, rule)
            # Reading an errored output aborts regopy 1.5.2: check ok() first.
            if not output.ok():
                return {"ok": False, "error": f"evaluation error in {rule}"}
            text = str(output)
        except self._errors as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return first_expression(text)


class _GoOpa:
    """OPA's own Go evaluator (opa-golib-python-bindings); strict built-in errors."""

    def __init__(self, request: Mapping[str, Any]) -> None:
        try:
            from opa_bindings import OpaEngine, OpaError
        except ImportError:
            raise LoadError(
                "OPA's Go evaluator is not installed: pip install --ignore-requires-python "
                "'opa-golib-python-bindings>=0.4.4'"
            ) from None

        self._error = OpaError
        engine = OpaEngine()
        engine.print_handler = _to_stderr
        try:
            engine.add_data(request.get("data") or {})
            for name, source in request.get("modules") or []:
                engine.add_policy(name, source)
            # add_policy only parses; the first query compiles every module.
            engine.eval_query("true")
        except OpaError as exc:
            from opsgate.policies.fidelity import readable_opa_error

            raise LoadError(readable_opa_error(exc.message or exc.code)) from None
        self._engine = engine

    def evaluate(self, rule: str, input: Any) -> dict[str, Any]:
        from opa_bindings import OpaUndefinedError

        try:
            value = self._engine.eval_document(rule.replace("/", "."), input)
        except OpaUndefinedError:
            return {"ok": True, "undefined": True}
        except self._error as exc:
            return {"ok": False, "error": " ".join(str(exc).split())[:500]}
        return {"ok": True, "value": value}


def _to_stderr(message: str, location: str) -> None:
    print(f"{location}: {message}", file=sys.stderr)


class LoadError(Exception):
    """The bundle does not compile in this evaluator."""


EVALUATORS: dict[str, Any] = {"regopy": _Regopy, "opa": _GoOpa}


def first_expression(text: str) -> dict[str, Any]:
    """regopy's output text as an answer: the single expression's value, or undefined."""
    if text.strip() == "undefined":
        return {"ok": True, "undefined": True}
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return {"ok": False, "error": "the engine's output is not JSON"}
    expressions = document.get("expressions") if isinstance(document, dict) else None
    if not isinstance(expressions, list) or len(expressions) != 1:
        return {"ok": True, "undefined": True}
    return {"ok": True, "value": expressions[0]}


def _serve(inp: Any, out: Any) -> int:
    evaluator: Any = None

    def reply(document: Mapping[str, Any]) -> None:
        out.write(json.dumps(document, separators=(",", ":")).encode() + b"\n")
        out.flush()

    for line in inp:
        try:
            request = json.loads(line)
        except ValueError:
            reply({"ok": False, "error": "request is not JSON"})
            continue
        op = request.get("op") if isinstance(request, dict) else None
        if op == "load":
            evaluator = None
            kind = EVALUATORS.get(str(request.get("evaluator", "regopy")))
            if kind is None:
                reply({"ok": False, "error": f"unknown evaluator {request.get('evaluator')!r}"})
                continue
            try:
                evaluator = kind(request)
            except (LoadError, ImportError) as exc:
                reply({"ok": False, "error": str(exc)})
                continue
            reply({"ok": True})
        elif op == "eval":
            if evaluator is None:
                reply({"ok": False, "error": "no bundle loaded"})
                continue
            reply(evaluator.evaluate(str(request.get("rule")), request.get("input") or {}))
        else:
            reply({"ok": False, "error": f"unknown op {op!r}"})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # The protocol gets a private copy of stdout; fd 1 itself goes to stderr, where
    # rego-cpp's diagnostics and Rego print() can do no harm.
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    with os.fdopen(0, "rb") as inp:
        return _serve(inp, out)


if __name__ == "__main__":
    sys.exit(main())
