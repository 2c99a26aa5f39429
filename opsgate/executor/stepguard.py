"""Run one step's argv so that it cannot outlive the worker that started it.

The shell runner starts this file as a script
(`python -I -S stepguard.py WORKER_PID PROGRAM_PATH -- ARGV...`)
as the leader of a new session. It asks Linux for a parent-death signal, then spawns the
step in its own process group and waits for it. When the worker dies (SIGKILL, OOM),
the kernel sends SIGTERM here and the whole group is killed: the step, and anything the
step started. Without this a step keeps running in its session, and may apply its change
after the next worker has already undone the action.

Standard library only and no import of opsgate, so it starts in a few milliseconds.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from types import FrameType

PR_SET_PDEATHSIG = 1
EXIT_PARENT_GONE = 137  # as if SIGKILLed: the worker died before the step could start
EXIT_CANNOT_START = 127


def _kill_group(_signum: int, _frame: FrameType | None) -> None:
    os.killpg(0, signal.SIGKILL)


def main(argv: list[str]) -> int:
    if len(argv) < 5 or argv[3] != "--" or not argv[1].isdigit():
        sys.stderr.write("usage: stepguard.py WORKER_PID PROGRAM_PATH -- ARGV...\n")
        return 2
    worker, program, command = int(argv[1]), argv[2], argv[4:]
    # Until the handler below is in place, SIGTERM's default (exit) is just as good.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        sys.stderr.write(f"prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}\n")
        return EXIT_CANNOT_START
    # The signal is only armed from here on: if the worker died before, no one will send
    # it, and the guard is already an orphan (re-parented away from the worker).
    if os.getppid() != worker:
        return EXIT_PARENT_GONE
    signal.signal(signal.SIGTERM, _kill_group)
    try:
        # Python ignores SIGPIPE; the step must see the defaults a shell would give it.
        pid = os.posix_spawn(
            program,
            command,
            os.environ,
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM),
        )
    except OSError as exc:
        sys.stderr.write(f"cannot start {command[0]}: {exc.strerror}\n")
        return EXIT_CANNOT_START
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        # Die of the same signal, so the runner sees what the step saw.
        code = os.WTERMSIG(status)
        if code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(code, signal.SIG_DFL)
        os.kill(os.getpid(), code)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
