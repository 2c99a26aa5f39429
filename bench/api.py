"""Propose N actions through `opsgate server` over loopback with an API token, and the
same N in process (as bench/propose.py does), in the same run.

Prints median and p99 of both and the ratio API / in-process. The API figure is a full
HTTP round trip: authentication (one token lookup), the gate (authz + decision +
durable commit), JSON both ways. Target: ratio <= 2, API p99 <= 15 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._rig import print_facts, spread  # noqa: E402
from bench.propose import document, percentile  # noqa: E402
from opsgate.auth.tokens import create_token  # noqa: E402
from opsgate.catalog import load_catalog  # noqa: E402
from opsgate.demo.processes import LOOPBACK, free_port, port_open, stop_process  # noqa: E402
from opsgate.gate import Gate  # noqa: E402
from opsgate.models import Identity  # noqa: E402
from opsgate.policies.embedded import EmbeddedEngine  # noqa: E402
from opsgate.store import open_store  # noqa: E402


def in_process(directory: Path, n: int) -> list[float]:
    store = open_store(f"sqlite:///{directory / 'local.db'}")
    store.migrate()
    gate = Gate(
        store=store,
        catalog=load_catalog(ROOT / "catalog"),
        engine=EmbeddedEngine(ROOT / "policies"),
    )
    alice = Identity(id="alice", kind="human")
    for i in range(50):
        gate.propose(document(i), alice)
    samples = []
    for i in range(n):
        start = time.perf_counter()
        outcome = gate.propose(document(i), alice)
        samples.append((time.perf_counter() - start) * 1000)
        assert outcome.action.state.value == "pending_approval", outcome.decision.deny_codes
    store.close()
    return samples


def through_api(directory: Path, n: int) -> list[float]:
    url = f"sqlite:///{directory / 'server.db'}"
    store = open_store(url)
    store.migrate()
    token = create_token(store, principal="alice", kind="human", ttl=3600, created_by="bench")
    store.close()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSGATE_")}
    env.update(
        {
            "OPSGATE_DB": url,
            "OPSGATE_CATALOG": str(ROOT / "catalog"),
            "OPSGATE_POLICIES": str(ROOT / "policies"),
            "PYTHONPATH": str(ROOT),
        }
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "opsgate", "server", "--listen", f"{LOOPBACK}:{port}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not port_open(port, timeout=0.2):
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("opsgate server did not start")
            time.sleep(0.05)
        session = requests.Session()
        session.trust_env = False
        session.headers["Authorization"] = f"Bearer {token.plaintext}"
        endpoint = f"http://{LOOPBACK}:{port}/api/v1/actions"
        for i in range(50):
            session.post(endpoint, json=document(i), timeout=30).raise_for_status()
        samples = []
        for i in range(n):
            start = time.perf_counter()
            response = session.post(endpoint, json=document(i), timeout=30)
            samples.append((time.perf_counter() - start) * 1000)
            assert response.status_code == 201, response.text
        session.close()
        return samples
    finally:
        stop_process(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=1, help="alternate both this often")
    args = parser.parse_args()
    print_facts("api", f"{args.rounds} x ({args.n} in process, then {args.n} through the API)")
    local: list[float] = []
    api: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            directory = Path(tmp) / f"round-{round_}"
            directory.mkdir()
            local += in_process(directory, args.n)
            api += through_api(directory, args.n)
    local_median, api_median = statistics.median(local), statistics.median(api)
    print(f"in-process median:  {local_median:.3f} ms   p99 {percentile(local, 0.99):.3f} ms")
    print(
        f"through the API:    {api_median:.3f} ms   p99 {percentile(api, 0.99):.3f} ms"
        "   (target p99 <= 15 ms)"
    )
    print(f"ratio API / in-process (median): {api_median / local_median:.2f}   (target <= 2)")
    print(f"in process:  {spread(local)}")
    print(f"through API: {spread(api)}")


if __name__ == "__main__":
    main()
