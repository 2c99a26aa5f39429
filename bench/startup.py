"""Start-up time of the `opsgate` command, next to the interpreter's own start.

Runs, round-robin so that machine load falls on all alike, `python -c pass`,
`opsgate --version` and `opsgate queue` on an empty (initialised) SQLite store, each as
a fresh process, and prints the median wall time of each, the spread (min..max) and
the median over the interpreter's start. Target: <= 0.3 s over `python -c pass` for
both commands. The checkout's code is run (PYTHONPATH is this repository).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._rig import print_facts  # noqa: E402

TARGET_OVER_INTERPRETER = 0.3


def opsgate_argv() -> list[str]:
    """The console script as users run it (beside this interpreter), else `-m opsgate`."""
    script = shutil.which("opsgate", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "opsgate"]


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print_facts("startup", f"{args.rounds}, the three commands interleaved, after one warm-up")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("OPSGATE_")},
            "PYTHONPATH": str(ROOT),
            "OPSGATE_DB": f"sqlite:///{directory / 'empty.db'}",
            "OPSGATE_CATALOG": str(ROOT / "catalog"),
            "OPSGATE_POLICIES": str(ROOT / "policies"),
            "OPSGATE_IDENTITY": "env",
            "OPSGATE_USER": "alice",
        }
        opsgate = opsgate_argv()
        subprocess.run([*opsgate, "init"], env=env, cwd=directory, check=True, capture_output=True)
        cases = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "opsgate --version": [*opsgate, "--version"],
            "opsgate queue": [*opsgate, "queue"],
        }
        for argv in cases.values():  # warm the OS file cache and .pyc files
            timed(argv, env, directory)
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, argv in cases.items():
                samples[name].append(timed(argv, env, directory))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    base = medians["python -c pass"]
    print(f"opsgate started as: {' '.join(opsgate)}")
    print(f"{'command':<20} {'median':>8} {'min..max':>15} {'stdev':>7} {'over python':>12}")
    verdicts = []
    for name, values in samples.items():
        over = medians[name] - base
        spread = f"{min(values):.3f}..{max(values):.3f}"
        stdev = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{name:<20} {medians[name]:>7.3f}s {spread:>15} {stdev:>6.3f}s {over:>+11.3f}s")
        if name != "python -c pass":
            verdicts.append(over <= TARGET_OVER_INTERPRETER)
    target = f"target <= {TARGET_OVER_INTERPRETER:.1f}s over python"
    print(f"{target}: {'met' if all(verdicts) else 'NOT met'}")


if __name__ == "__main__":
    main()
