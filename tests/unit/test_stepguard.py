"""A shell step dies with the worker that started it: the parent-death guard takes the
step's whole process group down (grandchildren included) when the worker is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from opsgate.executor.runners import STEP_GUARD, ShellRunner, guarded_argv
from opsgate.models import Step

PY = sys.executable

# A stand-in worker: runs one step with the real ShellRunner, in a thread as workers do.
FAKE_WORKER = """
import sys, threading
from opsgate.executor.runners import ShellRunner
from opsgate.models import Step
step = Step.model_validate({"argv": sys.argv[1:], "timeout": "60s"})
thread = threading.Thread(target=ShellRunner().run, args=(step, {}))
thread.start()
thread.join()
"""


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_for(check: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_a_sigkilled_worker_takes_its_step_and_the_steps_children_with_it(
    tmp_path: Path,
) -> None:
    pids, applied = tmp_path / "pids", tmp_path / "applied"
    # The step starts a background child of its own, then would apply a change late.
    script = (
        'sleep 30 & echo $! > "$0.tmp"; echo $$ >> "$0.tmp"; mv "$0.tmp" "$0"; '
        'sleep 2; touch "$1"; wait'
    )
    worker = subprocess.Popen(
        [PY, "-c", FAKE_WORKER, "/bin/sh", "-c", script, str(pids), str(applied)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        assert wait_for(pids.exists, 20), "the step never started"
        step_pids = [int(line) for line in pids.read_text().split()]
        assert all(alive(pid) for pid in step_pids)
        worker.kill()
        worker.wait(10)
        assert wait_for(lambda: not any(alive(pid) for pid in step_pids), 5), step_pids
        time.sleep(2.5)  # past the moment the step would have applied its change
        assert not applied.exists()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        for pid in [int(p) for p in pids.read_text().split()] if pids.exists() else []:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_guard_whose_worker_is_already_gone_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    # Its parent is this test process, not the "worker" pid it is told about: exactly
    # what it sees when the worker died between fork and arming the signal.
    not_parent = os.getpid() + 1_000_000
    argv = guarded_argv("/bin/sh", ["/bin/sh", "-c", 'touch "$0"', str(marker)])
    argv[4] = str(not_parent)
    done = subprocess.run(argv, capture_output=True, timeout=20, check=False)
    assert done.returncode == 137
    assert not marker.exists()


def test_the_guard_passes_exit_codes_and_signals_through() -> None:
    runner = ShellRunner()
    failed = runner.run(Step.model_validate({"argv": [PY, "-c", "raise SystemExit(3)"]}), {})
    assert failed.exit_code == 3 and failed.error == "exit code 3"
    killed = runner.run(Step.model_validate({"argv": ["/bin/sh", "-c", "kill -TERM $$"]}), {})
    assert killed.exit_code == -signal.SIGTERM


def test_the_guard_refuses_a_malformed_command_line() -> None:
    for argv in (
        [str(STEP_GUARD)],
        [str(STEP_GUARD), "notapid", "/bin/true", "--", "/bin/true"],
        [str(STEP_GUARD), str(os.getpid()), "/bin/true", "/bin/true"],
    ):
        done = subprocess.run([PY, "-I", "-S", *argv], capture_output=True, timeout=20)
        assert done.returncode == 2 and b"usage" in done.stderr


def test_the_step_gets_the_default_sigpipe() -> None:
    # Python ignores SIGPIPE; a step that inherited that would see EPIPE errors instead
    # of dying quietly like it does from a shell.
    result = ShellRunner().run(
        Step.model_validate({"argv": ["/bin/sh", "-c", "grep SigIgn /proc/self/status"]}), {}
    )
    ignored = int((result.value or "").split()[-1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1))
