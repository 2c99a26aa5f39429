"""The story `opsgate demo` plays: a bad release, an agent's proposals (one allowed, two
blocked), an approved rollback that verifies, a flag change that a stop condition rolls
back by itself, then the governance report.

Every opsgate step runs the real CLI (`python -m opsgate ...`) as a subprocess with
the `env` identity provider, exactly as a user would type it; the demo only plays the
world around it (the service, Prometheus, the bad release).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml

import opsgate
from opsgate.demo.processes import LOOPBACK, http_json, stop_process
from opsgate.demo.prometheus import INSTALL_HINT, Prometheus, PrometheusError, find_prometheus
from opsgate.errors import OpsgateError

SERVICE = "checkout"
GOOD_VERSION = "v2.4.1"
BAD_VERSION = "v2.5.0"
FLAG = "new-pricing"
URL_PATTERN = r"^http://127\.0\.0\.1:[0-9]{1,5}$"  # the demo only ever acts on loopback
AGENT = ("demo-agent", "agent")
APPROVER = ("bob", "human")
SECOND_APPROVER = ("carol", "human")
ENGINEER = ("alice", "human")
_ACTION_ID = re.compile(r"\baction ([0-9A-HJKMNP-TV-Z]{26})\b")


class DemoError(OpsgateError):
    """The demo cannot go on; the message says why and what to do."""

    exit_code = 1


class DemoSetupError(DemoError):
    """Something the demo needs is missing (Prometheus, an empty workdir)."""

    exit_code = 2


@dataclass(frozen=True)
class Profile:
    """Timing: `normal` for people watching, `fast` for the integration test."""

    name: str
    window: int  # seconds of every rate() window
    hold: int  # seconds every signal must pass, continuously
    timeout: int  # seconds a verification may take
    beat: float  # pause between scenes, so a reader can follow


PROFILES = {
    "normal": Profile("normal", window=5, hold=10, timeout=90, beat=1.5),
    "fast": Profile("fast", window=4, hold=3, timeout=60, beat=0.0),
}


def error_ratio_query(window: int) -> str:
    return (
        f'sum(rate(http_requests_total{{service="{{target}}",code=~"5.."}}[{window}s]))'
        f' / sum(rate(http_requests_total{{service="{{target}}"}}[{window}s]))'
    )


def latency_query(window: int) -> str:
    return (
        "histogram_quantile(0.99, sum by (le) "
        f'(rate(http_request_duration_seconds_bucket{{service="{{target}}"}}[{window}s])))'
    )


def demo_catalog(profile: Profile) -> dict[str, dict[str, Any]]:
    """The demo's action types: HTTP steps against the demo service, short windows."""
    url_param = {"type": "string", "pattern": URL_PATTERN, "description": "Service base URL"}
    name_param = {"type": "string", "pattern": "^[a-z0-9-]{1,63}$"}
    errors = error_ratio_query(profile.window)
    error_rate = {"name": "error_rate", "query": errors, "pass": {"max": 0.01}}

    def verification(signals: list[dict[str, Any]], halt: dict[str, float]) -> dict[str, Any]:
        # The catalog's own semantics, untuned: measurements whose windows still reach
        # back before the step do not count, so failure_limit needs no slack for them.
        return {
            "interval": "1s",
            "hold": f"{profile.hold}s",
            "timeout": f"{profile.timeout}s",
            "signals": signals,
            "stop_conditions": [{"name": "error_spike", "query": errors, "halt": halt}],
            "failure_limit": 2,
            "error_limit": 3,
        }

    # A fix passes at 1 % errors or at half the error rate it started from, and stops
    # only when it makes things 5 points worse than that (docs/design.md, "Baseline").
    fixed = {"name": "error_rate", "query": errors, "pass": {"max": 0.01, "baseline_times": 0.5}}
    worse_than_before = {"baseline_plus": 0.05}

    return {
        "rollback_deploy": {
            "name": "rollback_deploy",
            "description": "Roll the service back to its previous good release.",
            "intent": "mitigation",
            "risk": "medium",
            "params": {"deployment": name_param, "service_url": url_param},
            # Only while there is something to fix: the error rate is out of its range.
            "preconditions": ["error_rate_elevated"],
            "capture": {
                "http": {
                    "method": "GET",
                    "url": "{service_url}/release",
                    "expect_status": [200],
                    "extract": "version",
                },
                "as": "previous_version",
            },
            "run": {
                "http": {"method": "POST", "url": "{service_url}/release/rollback"},
                "timeout": "10s",
            },
            "undo": {
                "http": {
                    "method": "PUT",
                    "url": "{service_url}/release",
                    "body": {"version": "{previous_version}"},
                    "expect_status": [200],
                },
                "timeout": "10s",
            },
            "verification": verification(
                [
                    fixed,
                    {
                        "name": "latency_p99",
                        "query": latency_query(profile.window),
                        "pass": {"max": 0.25, "baseline_times": 0.8},
                    },
                ],
                worse_than_before,
            ),
        },
        "toggle_feature_flag": {
            "name": "toggle_feature_flag",
            "description": "Turn a feature flag on or off through the service's flag API.",
            "risk": "low",
            "params": {
                "flag": {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,63}$"},
                "enabled": {"type": "boolean"},
                "flag_service": url_param,
            },
            "capture": {
                "http": {
                    "method": "GET",
                    "url": "{flag_service}/flags/{flag}",
                    "expect_status": [200],
                    "extract": "enabled",
                },
                "as": "previous_enabled",
                "type": "boolean",  # undo sends a JSON boolean back, as the API wants
            },
            "run": {
                "http": {
                    "method": "PUT",
                    "url": "{flag_service}/flags/{flag}",
                    "body": {"enabled": "{enabled}"},
                    "expect_status": [200, 204],
                },
                "timeout": "10s",
            },
            "undo": {
                "http": {
                    "method": "PUT",
                    "url": "{flag_service}/flags/{flag}",
                    "body": {"enabled": "{previous_enabled}"},
                    "expect_status": [200, 204],
                },
                "timeout": "10s",
            },
            "intent": "change",
            # A change to a healthy service: an absolute bound is what "healthy" means.
            "verification": verification([error_rate], {"min": 0.2}),
        },
        "scale_deployment": {
            "name": "scale_deployment",
            "description": "Scale the service's deployment to a number of replicas.",
            "risk": "medium",
            "params": {
                "deployment": name_param,
                "replicas": {"type": "integer", "minimum": 0, "maximum": 1000},
                "service_url": url_param,
            },
            "capture": {
                "http": {
                    "method": "GET",
                    "url": "{service_url}/deployment",
                    "expect_status": [200],
                    "extract": "replicas",
                },
                "as": "previous_replicas",
                "type": "integer",
            },
            "run": {
                "http": {
                    "method": "PUT",
                    "url": "{service_url}/deployment",
                    "body": {"replicas": "{replicas}"},
                    "expect_status": [200],
                },
            },
            "undo": {
                "http": {
                    "method": "PUT",
                    "url": "{service_url}/deployment",
                    "body": {"replicas": "{previous_replicas}"},
                    "expect_status": [200],
                },
            },
            "intent": "mitigation",
            "verification": verification([fixed], worse_than_before),
        },
        "drain_node": {
            "name": "drain_node",
            "description": "Drain a node. Irreversible: evicted pods do not come back.",
            "risk": "high",
            "params": {"node": name_param, "service_url": url_param},
            "run": {"http": {"method": "POST", "url": "{service_url}/nodes/{node}/drain"}},
            "intent": "change",
            "verification": verification([error_rate], {"min": 0.2}),
        },
    }


def write_catalog(directory: Path, profile: Profile) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, document in demo_catalog(profile).items():
        text = yaml.safe_dump(document, sort_keys=False, width=100)
        (directory / f"{name}.yaml").write_text(f"# written by `opsgate demo`\n{text}")


def default_policies(configured: Path) -> Path:
    """The bundle the demo uses: an explicitly configured one, else the checkout's."""
    if configured != Path("policies") and configured.is_dir():
        return configured.resolve()
    shipped = Path(opsgate.__file__).resolve().parents[1] / "policies"
    for candidate in (shipped, configured):
        if (candidate / "opsgate.rego").is_file():
            return candidate.resolve()
    raise DemoSetupError(
        "no policy bundle found: run `opsgate demo` from the opsgate checkout or set "
        "OPSGATE_POLICIES to the bundle directory"
    )


def _percent(value: float | None) -> str:
    return "  -  " if value is None else f"{value * 100:.1f}%"


class Scenario:
    """Plays the demo once; `cleanup()` stops everything it started."""

    def __init__(
        self,
        workdir: Path,
        profile: Profile,
        policies: Path,
        *,
        keep: bool = False,
        prometheus_binary: str | None = None,
    ) -> None:
        self.workdir = workdir.resolve()
        self.profile = profile
        self.policies = policies
        self.keep = keep
        self.prometheus_binary = prometheus_binary
        self.catalog_dir = self.workdir / "catalog"
        self.db_url = f"sqlite:///{self.workdir / 'opsgate.db'}"
        self.report_path = self.workdir / "report.html"
        self.service: subprocess.Popen[bytes] | None = None
        self.service_url = ""
        self.prometheus: Prometheus | None = None
        self._children: list[subprocess.Popen[bytes]] = []
        self._started = time.monotonic()
        self.kept = False

    # --- output ------------------------------------------------------------------------

    def say(self, text: str = "", **style: Any) -> None:
        click.echo(click.style(text, **style) if style else text)

    def scene(self, number: int, title: str) -> None:
        if number > 1 and self.profile.beat:
            time.sleep(self.profile.beat)
        elapsed = time.monotonic() - self._started
        self.say()
        self.say(f"[{elapsed:5.1f}s] {number}. {title}", bold=True)

    def show_command(self, args: Sequence[str], identity: tuple[str, str] | None) -> None:
        prefix = []
        if identity is not None:
            prefix.append(f"OPSGATE_USER={identity[0]}")
            if identity[1] != "human":
                prefix.append(f"OPSGATE_USER_KIND={identity[1]}")
        words = [*prefix, "opsgate", *args]
        # An option and its value stay together; wrap before an option, as one types it.
        units: list[str] = []
        index = 0
        while index < len(words):
            unit = shlex.quote(words[index])
            has_value = index + 1 < len(words) and not words[index + 1].startswith("-")
            if words[index].startswith("-") and has_value:
                unit += " " + shlex.quote(words[index + 1])
                index += 1
            units.append(unit)
            index += 1
        lines: list[str] = []
        line = "$"
        for unit in units:
            if unit.startswith("-") and len(line) + len(unit) > 92:
                lines.append(line + " \\")
                line = "   "
            line += " " + unit
        lines.append(line)
        for text in lines:
            self.say(text, fg="cyan")

    # --- environment -------------------------------------------------------------------

    def exports(self) -> dict[str, str]:
        """What a user exports to continue by hand (identity chosen per command)."""
        assert self.prometheus is not None
        return {
            "OPSGATE_DB": self.db_url,
            "OPSGATE_CATALOG": str(self.catalog_dir),
            "OPSGATE_POLICIES": str(self.policies),
            "OPSGATE_PROMETHEUS_URL": self.prometheus.url,
            "OPSGATE_IDENTITY": "env",
        }

    def base_env(self) -> dict[str, str]:
        """The parent's environment minus any OPSGATE_* setting that would leak in."""
        wanted = {"OPSGATE_DEBUG", "OPSGATE_PROMETHEUS_BIN"}
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPSGATE_") or k in wanted}
        # The children must run this very opsgate, whatever the working directory.
        root = str(Path(opsgate.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"  # live lines appear as they happen, even in a pipe
        # An opsgate.toml in the workdir (there is none) instead of one in the user's cwd.
        env["OPSGATE_CONFIG"] = str(self.workdir / "opsgate.toml")
        if not sys.stdout.isatty():
            env.setdefault("COLUMNS", "160")
        return env

    def opsgate(
        self,
        *args: str,
        identity: tuple[str, str] | None = APPROVER,
        expect: Collection[int] = (0,),
        live: bool = False,
        echo: bool = True,
        timeout: float = 120.0,
    ) -> tuple[int, str]:
        """Run `opsgate ARGS` as `identity`, show the command and its output.

        `live` hands the terminal to the command (the run view); otherwise its output
        is collected (stderr merged in order) and printed when it ends.
        """
        if echo:
            self.show_command(args, identity)
        env = {**self.base_env(), **self.exports()}
        if identity is not None:
            env["OPSGATE_USER"], env["OPSGATE_USER_KIND"] = identity
        sys.stdout.flush()
        sys.stderr.flush()
        # Own session: Ctrl-C reaches the demo alone, which then stops the command.
        process = subprocess.Popen(
            [sys.executable, "-m", "opsgate", *args],
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=None if live else subprocess.PIPE,
            stderr=None if live else subprocess.STDOUT,
            start_new_session=True,
        )
        self._children.append(process)
        try:
            out, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(process)
            raise DemoError(f"`opsgate {args[0]}` did not finish within {timeout:g}s") from None
        self._children.remove(process)
        text = (out or b"").decode(errors="replace")
        if echo and text:
            click.echo(text, nl=not text.endswith("\n"))
        if process.returncode not in expect:
            last = text.strip().splitlines()[-1] if text.strip() else "no output"
            raise DemoError(
                f"`opsgate {' '.join(args[:2])}` exited {process.returncode} "
                f"(expected {'/'.join(map(str, expect))}): {last}"
            )
        return process.returncode, text

    # --- the world: service and Prometheus ----------------------------------------------

    def start_service(self, timeout: float = 30.0) -> None:
        port_file = self.workdir / "checkout.port"
        log = self.workdir / "service.log"
        with log.open("ab") as handle:
            self.service = subprocess.Popen(
                [sys.executable, "-m", "opsgate.demo.service", "--port", "0",
                 "--port-file", str(port_file), "--service", SERVICE],
                cwd=self.workdir,
                env=self.base_env(),
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # survives the demo with --keep; see opsgate()
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not port_file.is_file():
            if self.service.poll() is not None:
                raise DemoError(f"the demo service exited with {self.service.returncode}: {log}")
            if time.monotonic() > deadline:
                raise DemoError(f"the demo service did not start within {timeout:g}s: {log}")
            time.sleep(0.05)
        self.service_url = f"http://{LOOPBACK}:{int(port_file.read_text())}"

    def start_prometheus(self, binary: str) -> None:
        target = self.service_url.removeprefix("http://")
        self.prometheus = Prometheus(binary, [target], self.workdir)
        try:
            self.prometheus.start()
        except PrometheusError as exc:
            raise DemoError(str(exc)) from None

    def signal_value(self, query: str) -> float | None:
        assert self.prometheus is not None
        return self.prometheus.query(query.replace("{target}", SERVICE))

    def watch_error_rate(
        self, until: Callable[[float], bool], timeout: float, label: str = "error rate"
    ) -> float:
        """Print the error rate every second until `until(value)`; the last value."""
        query = error_ratio_query(self.profile.window)
        deadline = time.monotonic() + timeout
        click.echo(f"  {label} ({self.profile.window}s window):", nl=False)
        value: float | None = None
        while True:
            value = self.signal_value(query)
            click.echo(f" {_percent(value).strip()}", nl=False)
            sys.stdout.flush()
            if value is not None and until(value):
                click.echo()
                return value
            if time.monotonic() > deadline:
                click.echo()
                raise DemoError(f"the {label} did not get there within {timeout:g}s")
            time.sleep(1.0)

    def service_call(self, method: str, path: str, body: Any = None) -> Any:
        """A call the demo makes as the outside world (the deploy pipeline), shown as curl."""
        words = ["curl", "-s", "-X", method, f"{self.service_url}{path}"]
        if body is not None:
            words += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
        self.say("$ " + shlex.join(words), fg="cyan")
        status, document = http_json(method, f"{self.service_url}{path}", body)
        self.say(json.dumps(document))
        if status >= 300:
            raise DemoError(f"the demo service answered {status}: {document}")
        return document

    # --- the story -----------------------------------------------------------------------

    def play(self) -> None:
        """Every scene in order; raises DemoError when the story does not go as told."""
        self._started = time.monotonic()
        self.say(f"opsgate demo ({self.profile.name} profile) in {self.workdir}", bold=True)
        self.setup()
        rollback_id = self.incident()
        self.fix(rollback_id)
        flag_id = self.risky_change()
        self.report(rollback_id, flag_id)
        elapsed = time.monotonic() - self._started
        self.say()
        self.say(f"demo finished in {elapsed:.0f}s", bold=True, fg="green")

    def setup(self) -> None:
        self.scene(1, f"A {SERVICE} service and a Prometheus scraping it every second")
        binary = self.prometheus_binary or find_prometheus()
        if binary is None:  # before anything starts, so there is nothing to clean up
            raise DemoSetupError(INSTALL_HINT)
        self.start_service()
        assert self.service is not None
        self.say(f"  {SERVICE} service   {self.service_url}  (pid {self.service.pid})")
        self.start_prometheus(binary)
        assert self.prometheus is not None
        self.say(f"  prometheus         {self.prometheus.url}  (pid {self.prometheus.pid})")
        write_catalog(self.catalog_dir, self.profile)
        self.say(f"  action catalog     {self.catalog_dir}  (HTTP steps against the service)")
        self.say(f"  policy bundle      {self.policies}")
        self.say("  every command below runs with:")
        for key, value in self.exports().items():
            self.say(f"    export {key}={shlex.quote(value)}", fg="cyan")
        self.opsgate("init", identity=None)
        self.watch_error_rate(lambda v: v <= 0.01, timeout=30, label="baseline error rate")

    def incident(self) -> str:
        self.scene(2, "A bad release goes out; an agent proposes three fixes")
        self.say(f"  the deploy pipeline ships {BAD_VERSION} (it is broken):")
        self.service_call("POST", "/release", {"version": BAD_VERSION, "bad": True})
        # Well above the pass range, so the agent's `error_rate_elevated` precondition holds.
        self.watch_error_rate(lambda v: v >= 0.1, timeout=30)
        incident = [
            "--incident", "INC-4711", "--severity", "sev2",
            "--incident-class", "deploy-related", "--tier", "standard",
        ]  # fmt: skip
        self.say()
        self.say("  the agent asks for a rollback: allowed, so it waits for a human")
        _, out = self.opsgate(
            "propose", "rollback_deploy", "--target", SERVICE, "--env", "prod",
            "--param", f"deployment={SERVICE}", "--param", f"service_url={self.service_url}",
            "--reason", f"5xx ratio above 10% since {BAD_VERSION} went out", *incident,
            identity=AGENT,
        )  # fmt: skip
        rollback_id = self.action_id(out)
        self.say()
        self.say("  ...and to drain the node: not allowlisted in prod, and irreversible")
        self.opsgate(
            "propose", "drain_node", "--target", SERVICE, "--env", "prod",
            "--param", "node=worker-3", "--param", f"service_url={self.service_url}",
            "--reason", "worker-3 serves most of the 5xx", *incident,
            identity=AGENT, expect=(3,),
        )  # fmt: skip
        self.say()
        self.say("  ...and to scale to 500 replicas: out of the prod bounds")
        self.opsgate(
            "propose", "scale_deployment", "--target", SERVICE, "--env", "prod",
            "--param", f"deployment={SERVICE}", "--param", "replicas=500",
            "--param", f"service_url={self.service_url}",
            "--reason", "more replicas to absorb the errors", *incident,
            identity=AGENT, expect=(3,),
        )  # fmt: skip
        self.say()
        self.opsgate("queue")
        return rollback_id

    def fix(self, rollback_id: str) -> None:
        self.scene(3, "A human approves the rollback; opsgate runs and verifies it")
        self.opsgate("approve", rollback_id, "--comment", f"roll back to {GOOD_VERSION}")
        self.say(
            "  the agent has no verified passes of rollback_deploy yet, so the trust ladder "
            "asks one approval more than a human would need: a second one"
        )
        self.opsgate(
            "approve", rollback_id, "--comment", "second approval", identity=SECOND_APPROVER
        )
        self.say(
            "  a mitigation, judged against its baseline (the error rate just before it runs):"
        )
        self.say(
            f"  verification: error_rate <= 1% or half its baseline, latency_p99 <= 0.25s or "
            f"0.8 x its baseline, continuously for {self.profile.hold}s once the "
            f"{self.profile.window}s windows hold only post-change samples; stop if errors "
            "get 5 points worse than the baseline"
        )
        self.opsgate("run", rollback_id, live=True, timeout=self.profile.timeout * 2 + 60)
        self.outcome(rollback_id)

    def risky_change(self) -> str:
        self.scene(4, f"A new change: turn on feature flag {FLAG}")
        _, out = self.opsgate(
            "propose", "toggle_feature_flag", "--target", SERVICE, "--env", "prod",
            "--param", f"flag={FLAG}", "--param", "enabled=true",
            "--param", f"flag_service={self.service_url}",
            "--reason", "launch the new pricing page", "--incident", "CHG-1024",
            "--incident-class", "feature-rollout", "--tier", "standard",
            identity=ENGINEER,
        )  # fmt: skip
        flag_id = self.action_id(out)
        self.opsgate("approve", flag_id, "--comment", "launch window is open")
        self.say(
            "  the flag breaks checkout: watch the error_spike stop condition (halt at 20%) "
            "fire and opsgate roll back by itself"
        )
        # `opsgate run` exits 1 for anything but success: here that is the expected end.
        self.opsgate("run", flag_id, live=True, expect=(1,), timeout=self.profile.timeout * 2 + 60)
        self.outcome(flag_id)
        document = self.service_call("GET", f"/flags/{FLAG}")
        if not isinstance(document, dict) or document.get("enabled") is not False:
            raise DemoError(f"{FLAG} is still on after the rollback: {document}")
        return flag_id

    def report(self, rollback_id: str, flag_id: str) -> None:
        self.scene(5, "What governance sees")
        self.opsgate("report", identity=None)
        self.opsgate("report", "--format", "html", "-o", str(self.report_path), identity=None)
        if not self.report_path.is_file() or self.report_path.stat().st_size == 0:
            raise DemoError(f"the HTML report {self.report_path} was not written")
        self.opsgate("audit", "verify", identity=None)
        self.say()
        self.say(f"HTML report: {self.report_path}", bold=True)
        self.say(f"  open it:   {self.report_path.as_uri()}")
        self.say(f"  in detail: opsgate show {rollback_id}   /   opsgate show {flag_id}")
        self.say(f"  database, catalog and logs stay in {self.workdir} (delete it when done)")

    # --- helpers -------------------------------------------------------------------------

    @staticmethod
    def action_id(output: str) -> str:
        match = _ACTION_ID.search(output)
        if match is None:
            raise DemoError(f"no action id in the output of `opsgate propose`: {output!r}")
        return match.group(1)

    def outcome(self, action_id: str) -> dict[str, Any]:
        """`opsgate show --json`, condensed to the lines that tell how the run ended."""
        _, text = self.opsgate("show", action_id, "--json", echo=False)
        self.show_command(["show", action_id, "--json"], APPROVER)
        try:
            details: dict[str, Any] = json.loads(text)
        except ValueError as exc:
            raise DemoError(f"`opsgate show --json` printed no JSON: {exc}") from None
        action, execution = details["action"], details["execution"] or {}
        phases: dict[str, int] = {}
        for m in details["measurements"]:
            phases[m["phase"]] = phases.get(m["phase"], 0) + 1
        self.say(f"  state:        {action['state']}")
        outcome = execution.get("outcome")
        if execution.get("trigger_name"):
            outcome = f"{outcome} by {execution['trigger_name']} = {execution['trigger_value']:.3g}"
        self.say(f"  outcome:      {outcome}  ({execution.get('reason') or '-'})")
        counted = ", ".join(f"{n} in {p}" for p, n in phases.items()) or "none"
        self.say(f"  measurements: {counted}")
        if execution.get("rollback_time") is not None:
            self.say(
                f"  rollback time: {execution['rollback_time']:.1f}s (decision -> rollback "
                "verified)",
                bold=True,
            )
        return details

    # --- the end -------------------------------------------------------------------------

    def leave_running(self) -> None:
        """--keep: print how to go on by hand and how to stop what is left running."""
        assert self.prometheus is not None and self.service is not None
        self.kept = True
        exports = " \\\n       ".join(f"{k}={shlex.quote(v)}" for k, v in self.exports().items())
        self.say()
        self.say("The service and Prometheus keep running (--keep). To go on by hand:", bold=True)
        scripts = Path(sys.executable).parent
        if (scripts / "opsgate").is_file() and shutil.which("opsgate") != str(scripts / "opsgate"):
            self.say(f"  . {shlex.quote(str(scripts / 'activate'))}   # puts opsgate on PATH")
        self.say(f"  export {exports}")
        self.say("  export OPSGATE_USER=alice            # bob approves: OPSGATE_USER=bob ...")
        body = json.dumps({"version": "v2.6.0", "bad": True})
        self.say(
            f"  curl -s -X POST {self.service_url}/release -H 'Content-Type: application/json'"
            f" -d {shlex.quote(body)}   # another bad release"
        )
        self.say(
            f"  opsgate propose rollback_deploy --target {SERVICE} --env prod "
            f"--param deployment={SERVICE} --param service_url={self.service_url} "
            "--reason 'v2.6.0 is broken' --tier standard"
        )
        self.say("  OPSGATE_USER=bob opsgate approve <id> && opsgate run <id>")
        self.say("  opsgate report   /   opsgate show <id>   /   opsgate audit verify")
        # The demo stays in local mode; a server over the same store adds the web console.
        self.say(
            "  opsgate server --listen 127.0.0.1:8700   # API; with OIDC set, the web console "
            "at http://127.0.0.1:8700/console (README: The web console)"
        )
        self.say(f"  Prometheus: {self.prometheus.url}/graph   service: {self.service_url}/release")
        self.say(f"Stop them with: kill {self.service.pid} {self.prometheus.pid}", bold=True)

    def cleanup(self) -> list[str]:
        """Stop every process this demo started (unless kept); what was stopped."""
        stopped: list[str] = []
        for child in list(self._children):
            stop_process(child)
            stopped.append(f"opsgate (pid {child.pid})")
        self._children.clear()
        if self.kept:
            return stopped
        if self.prometheus is not None and self.prometheus.pid is not None:
            stopped.append(f"prometheus (pid {self.prometheus.pid})")
            self.prometheus.stop()
        if self.service is not None:
            stop_process(self.service)
            stopped.append(f"{SERVICE} service (pid {self.service.pid})")
            self.service = None
        return stopped


@contextmanager
def signals_ignored(*signums: int) -> Iterator[None]:
    """Cleanup must not be cut short by a second Ctrl-C (it is bounded in time)."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
