"""The OPA server engine: push and external modes, fail closed, re-push, health, doctor.

Tests that only need "an OPA" run against a real one when available (see
tests/opa_double.py); tests that need a switch (slow, 500, undefined, ...) use the double.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from opsgate.errors import ConfigError
from opsgate.policies import opa
from opsgate.policies.engine import DECISION_RULE, UNAVAILABLE, bundle_revision
from opsgate.policies.opa import MARKER_KEY, PROBE_INPUT, OpaEngine
from tests.opa_double import OpaDouble, OpaTarget, free_port, opa_target

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"

LIMITED = """package opsgate
import rego.v1
deny contains {"code": "too_big", "message": sprintf("n=%v is over %v", [input.n, data.limit])} if {
    input.n > data.limit
}
decision := {"allow": count(deny) == 0, "deny": deny, "required_approvals": 1,
             "approver_roles": data.approvers}
"""

# to_number errors on a non-numeric string: without strict built-in errors the deny rule
# is simply undefined and the decision allows (fails open).
ERRORING_BUILTIN = """package opsgate
import rego.v1
deny contains {"code": "too_big", "message": "n is too big"} if to_number(input.n) > 5
decision := {"allow": count(deny) == 0, "deny": deny, "required_approvals": 1,
             "approver_roles": ["sre"]}
"""

OTHER_MODULE = "package opsgate_extra\nimport rego.v1\nanswer := 42\n"


def write_bundle(directory: Path, source: str = LIMITED, **files: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "opsgate.rego").write_text(source)
    (directory / "data.json").write_text(
        files.pop("data", json.dumps({"limit": 5, "approvers": ["sre"]}))
    )
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def touch(path: Path, text: str) -> None:
    """Rewrite a file and move its mtime forward, so a stat check sees the change."""
    path.write_text(text)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


def get(url: str) -> tuple[int, Any]:
    response = requests.get(url, timeout=5)
    return response.status_code, response.json() if response.content else None


@pytest.fixture
def target() -> Iterator[OpaTarget]:
    """A real OPA when one is available, else the test double."""
    with opa_target() as found:
        yield found


@pytest.fixture
def double() -> Iterator[OpaDouble]:
    """Always the test double: for the switches a real OPA does not have."""
    with OpaDouble() as server:
        yield server


@pytest.fixture
def engines() -> Iterator[Callable[..., OpaEngine]]:
    """Build engines that are closed (HTTP sessions released) after the test."""
    made: list[OpaEngine] = []

    def make(url: str, **kwargs: Any) -> OpaEngine:
        kwargs.setdefault("timeout", 2.0)
        engine = OpaEngine(url, **kwargs)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


@pytest.fixture
def instant_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(opa, "RELOAD_CHECK_SECONDS", 0.0)


def assert_fails_closed(engine: OpaEngine, before: int, fragment: str = "") -> None:
    result = engine.evaluate(DECISION_RULE, {"n": 1})
    assert not result.allow
    assert result.deny_codes == [UNAVAILABLE]
    # interpret() reports a result without `allow: true` as a deny message, not an error.
    reason = result.error or result.deny[0]["message"]
    assert fragment in reason
    assert engine.failures == before + 1
    assert engine.last_error == reason


# --- push mode ----------------------------------------------------------------------------


def test_push_uploads_policies_and_data_and_answers(
    target: OpaTarget, engines: Callable[..., OpaEngine], tmp_path: Path
) -> None:
    bundle = write_bundle(tmp_path / "b")
    (bundle / "extra_test.rego").write_text("package opsgate_test\nimport rego.v1\n")
    engine = engines(target.url, mode="push", policies=bundle)

    ok = engine.evaluate(DECISION_RULE, {"n": 3})
    assert ok.allow and ok.approver_roles == ("sre",) and ok.error is None
    no = engine.evaluate(DECISION_RULE, {"n": 9})
    assert not no.allow and no.deny == ({"code": "too_big", "message": "n=9 is over 5"},)
    assert ok.revision == no.revision == engine.revision() == bundle_revision(bundle)
    assert engine.failures == 0 and engine.evaluations == 2

    status, body = get(f"{target.url}/v1/policies/opsgate/opsgate.rego")
    assert status == 200 and body["result"]["raw"] == LIMITED
    # Test files are not policy: they stay out of OPA, as they stay out of the revision.
    assert get(f"{target.url}/v1/policies/opsgate/extra_test.rego")[0] == 404
    assert get(f"{target.url}/v1/data/limit")[1] == {"result": 5}
    record = get(f"{target.url}/v1/data/{MARKER_KEY}")[1]["result"]
    assert record["revision"] == bundle_revision(bundle)
    assert record["modules"] == ["opsgate/opsgate.rego"]
    assert record["data_keys"] == ["approvers", "limit"]


def test_push_leaves_other_documents_and_policies_alone(
    target: OpaTarget, engines: Callable[..., OpaEngine], tmp_path: Path
) -> None:
    # Another tenant of the same OPA: a PUT of the data root would wipe these.
    requests.put(f"{target.url}/v1/data/other_app", json={"keep": True}, timeout=5)
    requests.put(
        f"{target.url}/v1/policies/other/app.rego",
        data=b"package other\nimport rego.v1\nallow := true\n",
        timeout=5,
    )
    engine = engines(target.url, mode="push", policies=write_bundle(tmp_path / "b"))
    assert engine.evaluate(DECISION_RULE, {"n": 1}).allow
    assert get(f"{target.url}/v1/data/other_app")[1] == {"result": {"keep": True}}
    assert get(f"{target.url}/v1/policies/other/app.rego")[0] == 200
    if target.double is not None:
        assert target.double.count("PUT", "/v1/data/") >= 1
        assert ("PUT", "/v1/data") not in target.double.requests
        assert ("PUT", "/v1/data/") not in target.double.requests


def test_changed_bundle_is_pushed_again_and_removed_parts_deleted(
    target: OpaTarget, engines: Callable[..., OpaEngine], tmp_path: Path, instant_reload: None
) -> None:
    data = json.dumps({"limit": 5, "approvers": ["sre"], "old_key": 1})
    bundle = write_bundle(tmp_path / "b", data=data, **{"extra.rego": OTHER_MODULE})
    engine = engines(target.url, mode="push", policies=bundle)
    first = engine.revision()
    assert engine.evaluate(DECISION_RULE, {"n": 3}).allow
    assert get(f"{target.url}/v1/policies/opsgate/extra.rego")[0] == 200

    touch(bundle / "data.json", json.dumps({"limit": 2, "approvers": ["sre-lead"]}))
    (bundle / "extra.rego").unlink()
    result = engine.evaluate(DECISION_RULE, {"n": 3})
    assert result.deny_codes == ["too_big"] and result.deny[0]["message"] == "n=3 is over 2"
    assert result.revision == bundle_revision(bundle) != first
    assert engine.evaluate(DECISION_RULE, {"n": 1}).approver_roles == ("sre-lead",)
    assert get(f"{target.url}/v1/policies/opsgate/extra.rego")[0] == 404
    assert "result" not in get(f"{target.url}/v1/data/old_key")[1]
    assert engine.pushes == 2 and engine.push_failures == 0


def test_a_restarted_process_cleans_up_what_an_earlier_one_pushed(
    target: OpaTarget, engines: Callable[..., OpaEngine], tmp_path: Path
) -> None:
    data = json.dumps({"limit": 5, "approvers": ["sre"], "old_key": 1})
    bundle = write_bundle(tmp_path / "b", data=data, **{"extra.rego": OTHER_MODULE})
    engines(target.url, mode="push", policies=bundle).close()
    # While opsgate was down the bundle lost a file and a key; the OPA record remembers them.
    (bundle / "extra.rego").unlink()
    touch(bundle / "data.json", json.dumps({"limit": 5, "approvers": ["sre"]}))
    engines(target.url, mode="push", policies=bundle)
    assert get(f"{target.url}/v1/policies/opsgate/extra.rego")[0] == 404
    assert "result" not in get(f"{target.url}/v1/data/old_key")[1]


def test_bad_policy_file_fails_closed_until_fixed(
    target: OpaTarget, engines: Callable[..., OpaEngine], tmp_path: Path, instant_reload: None
) -> None:
    bundle = write_bundle(tmp_path / "b", LIMITED.replace("input.n > data.limit", "input.n >"))
    engine = engines(target.url, mode="push", policies=bundle)
    result = engine.evaluate(DECISION_RULE, {"n": 1})
    assert result.deny_codes == [UNAVAILABLE]
    assert result.error is not None and "push to OPA" in result.error
    assert engine.failures == 1 and engine.push_failures >= 1
    assert engine.health()[0] is False
    touch(bundle / "opsgate.rego", LIMITED)
    assert engine.evaluate(DECISION_RULE, {"n": 1}).allow
    assert engine.health()[0] is True


def test_a_rule_moved_between_files_is_pushed_from_scratch(
    double: OpaDouble,
    engines: Callable[..., OpaEngine],
    tmp_path: Path,
    instant_reload: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # OPA compiles every PUT against the modules it holds: the new a.rego (which now has
    # `helper`) conflicts with the old b.rego (which still has it, and is gone from the
    # bundle, so no later pass replaces it). The double compiles with OPA's Go compiler,
    # which leaves this conflict to evaluation, so this test teaches it the one conflict
    # an OPA server reports.
    def put_policy(policy_id: str, source: str) -> tuple[int, Any]:
        others = [v for k, v in double.policies.items() if k != policy_id]
        if "helper :=" in source and any("helper :=" in v for v in others):
            message = "rego_compile_error: rule data.opsgate.helper redeclared"
            return 400, {"code": "invalid_parameter", "message": message}
        return OpaDouble.put_policy(double, policy_id, source)

    monkeypatch.setattr(double, "put_policy", put_policy)
    a = "package opsgate\nimport rego.v1\nuses := 1\n"
    b = "package opsgate\nimport rego.v1\nhelper := 1\n"
    bundle = write_bundle(tmp_path / "b", **{"a.rego": a, "b.rego": b})
    engine = engines(double.url, mode="push", policies=bundle)
    assert engine.evaluate(DECISION_RULE, {"n": 1}).allow

    touch(bundle / "a.rego", a + "helper := 2\n")
    (bundle / "b.rego").unlink()
    assert engine.evaluate(DECISION_RULE, {"n": 1}).allow
    assert engine.push_failures == 0 and engine.revision() == bundle_revision(bundle)
    # Every module it had pushed (the reset), then b.rego's removal (already gone: a 404).
    assert double.count("DELETE", "/v1/policies/opsgate/") == 4
    assert double.policies["opsgate/a.rego"].endswith("helper := 2\n")
    assert "opsgate/b.rego" not in double.policies


def test_strict_builtin_errors_are_requested(
    target: OpaTarget, engines: Callable[..., OpaEngine], tmp_path: Path
) -> None:
    engine = engines(
        target.url, mode="push", policies=write_bundle(tmp_path / "b", ERRORING_BUILTIN)
    )
    result = engine.evaluate(DECISION_RULE, {"n": "not-a-number"})
    assert not result.allow and result.deny_codes == [UNAVAILABLE]
    assert engine.evaluate(DECISION_RULE, {"n": 1}).allow
    # Why it matters: asked without the flag, OPA itself answers allow for the same input.
    lax = requests.post(
        f"{target.url}/v1/data/opsgate/decision", json={"input": {"n": "x"}}, timeout=5
    )
    assert lax.json()["result"]["allow"] is True


# --- external mode ------------------------------------------------------------------------


def test_external_mode_only_queries_and_reports_opa_revision(
    double: OpaDouble, engines: Callable[..., OpaEngine], tmp_path: Path
) -> None:
    engines(double.url, mode="push", policies=write_bundle(tmp_path / "b"))
    pushes = len([r for r in double.requests if r[0] in {"PUT", "DELETE"}])
    engine = engines(double.url, mode="external", policies=tmp_path / "not-read")

    assert engine.evaluate(DECISION_RULE, {"n": 1}).revision == "external:unknown"
    double.bundles = {"authz": "git-4f2a9c1"}
    result = engine.evaluate(DECISION_RULE, {"n": 9})
    assert result.deny_codes == ["too_big"] and result.revision == "authz:git-4f2a9c1"
    double.bundles = {"b": "2", "a": "1"}
    assert engine.evaluate(DECISION_RULE, {"n": 1}).revision == "a:1,b:2"
    double.legacy_revision = "legacy-7"
    assert engine.evaluate(DECISION_RULE, {"n": 1}).revision == "legacy-7"
    assert engine.revision() == "legacy-7"
    assert len([r for r in double.requests if r[0] in {"PUT", "DELETE"}]) == pushes
    assert all("provenance=true" in p for m, p in double.requests[-4:] if m == "POST")


def test_external_mode_undefined_decision_fails_closed(
    double: OpaDouble, engines: Callable[..., OpaEngine]
) -> None:
    double.bundles = {"authz": "r1"}
    engine = engines(double.url, mode="external")
    result = engine.evaluate(DECISION_RULE, {"n": 1})
    assert result.deny_codes == [UNAVAILABLE] and result.revision == "authz:r1"
    assert result.error is not None and "undefined" in result.error
    ok, detail = engine.health()
    assert not ok and "undefined" in detail


# --- fail closed ----------------------------------------------------------------------------


def _down(double: OpaDouble) -> str:
    double.stop()
    return "Connection refused"


def _slow(double: OpaDouble) -> str:
    double.slow = 2.0
    return "did not answer data.opsgate.decision within 0.2s"


def _status_500(double: OpaDouble) -> str:
    double.fail_status = 500
    return "HTTP 500"


def _undefined(double: OpaDouble) -> str:
    double.undefined = True
    return "undefined"


def _malformed(result: Any, fragment: str) -> Callable[[OpaDouble], str]:
    def switch(double: OpaDouble) -> str:
        double.force_result = result
        return fragment

    return switch


@pytest.mark.parametrize(
    "switch",
    [
        _down,
        _slow,
        _status_500,
        _undefined,
        _malformed({"allow": "yes", "deny": []}, "allow: true"),
        _malformed({"allow": True, "deny": "none"}, "deny is not a list"),
        _malformed({"allow": True, "deny": [{"message": "no code"}]}, "no code"),
        _malformed({"allow": True, "deny": [], "required_approvals": 0}, "required_approvals"),
        _malformed([True], "not an object"),
        _malformed(None, "undefined"),
    ],
    ids=[
        "down",
        "slow",
        "500",
        "undefined",
        "allow-not-bool",
        "deny-not-list",
        "deny-no-code",
        "zero-approvals",
        "not-object",
        "null",
    ],
)
@pytest.mark.parametrize("mode", ["push", "external"])
def test_fails_closed(
    double: OpaDouble,
    engines: Callable[..., OpaEngine],
    tmp_path: Path,
    mode: str,
    switch: Callable[[OpaDouble], str],
) -> None:
    engines(double.url, mode="push", policies=write_bundle(tmp_path / "b"))
    engine = engines(double.url, mode=mode, policies=tmp_path / "b", timeout=0.2)
    assert engine.evaluate(DECISION_RULE, {"n": 1}).allow
    fragment = switch(double)
    assert_fails_closed(engine, 0, fragment)
    assert_fails_closed(engine, 1, fragment)
    assert engine.evaluations == 3


def test_slow_opa_is_cut_off_at_the_timeout(
    double: OpaDouble, engines: Callable[..., OpaEngine], tmp_path: Path
) -> None:
    engine = engines(double.url, mode="push", policies=write_bundle(tmp_path / "b"), timeout=0.2)
    double.slow = 5.0
    started = dt.datetime.now(dt.UTC)
    assert not engine.evaluate(DECISION_RULE, {"n": 1}).allow
    assert (dt.datetime.now(dt.UTC) - started).total_seconds() < 1.5


def test_evaluate_never_raises(
    double: OpaDouble,
    engines: Callable[..., OpaEngine],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = engines(double.url, mode="push", policies=write_bundle(tmp_path / "b"))

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("a bug")

    monkeypatch.setattr(engine, "_ask", boom)
    assert_fails_closed(engine, 0, "unexpected KeyError")
    unserialisable = engine.evaluate(DECISION_RULE, {"n": object()})
    assert unserialisable.deny_codes == [UNAVAILABLE]


def test_push_failure_fails_closed_until_a_later_push_succeeds(
    engines: Callable[..., OpaEngine], tmp_path: Path, instant_reload: None
) -> None:
    port = free_port()
    bundle = write_bundle(tmp_path / "b")
    engine = engines(f"http://127.0.0.1:{port}", mode="push", policies=bundle)
    assert engine.push_failures == 1 and engine.revision() == ""
    assert_fails_closed(engine, 0, "push to OPA")
    assert engine.health()[0] is False
    with OpaDouble(port=port):
        result = engine.evaluate(DECISION_RULE, {"n": 1})
        assert result.allow and result.revision == bundle_revision(bundle)
        assert engine.failures == 1 and engine.health()[0] is True


def test_a_restarted_opa_gets_the_bundle_again(
    double: OpaDouble, engines: Callable[..., OpaEngine], tmp_path: Path, instant_reload: None
) -> None:
    engine = engines(double.url, mode="push", policies=write_bundle(tmp_path / "b"))
    assert engine.evaluate(DECISION_RULE, {"n": 1}).allow
    double.reset()  # OPA restarted: policies and data live in its memory only
    assert_fails_closed(engine, 0, "undefined")
    assert engine.evaluate(DECISION_RULE, {"n": 1}).allow
    assert engine.pushes == 2


def test_push_is_checked_at_most_once_per_interval(
    double: OpaDouble, engines: Callable[..., OpaEngine], tmp_path: Path
) -> None:
    bundle = write_bundle(tmp_path / "b")
    engine = engines(double.url, mode="push", policies=bundle)
    touch(bundle / "data.json", json.dumps({"limit": 0, "approvers": ["sre"]}))
    # Within the interval the old push stands (a stat per decision would be wasted work).
    assert engine.evaluate(DECISION_RULE, {"n": 1}).allow
    engine.reload()
    assert engine.evaluate(DECISION_RULE, {"n": 1}).deny_codes == ["too_big"]


# --- transport options ----------------------------------------------------------------------


def test_token_is_sent(
    double: OpaDouble, engines: Callable[..., OpaEngine], tmp_path: Path
) -> None:
    double.token = "s3cret"
    bundle = write_bundle(tmp_path / "b")
    engine = engines(double.url, mode="push", policies=bundle, token="s3cret")
    assert engine.evaluate(DECISION_RULE, {"n": 1}).allow
    assert engine.health()[0] is True
    anonymous = engines(double.url, mode="external")
    assert_fails_closed(anonymous, 0, "HTTP 401")
    assert "s3cret" not in json.dumps(engine.describe())


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "opa-double")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_https_with_a_private_ca_file(engines: Callable[..., OpaEngine], tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    bundle = write_bundle(tmp_path / "b")
    with OpaDouble(tls=(cert, key)) as double:
        assert double.url.startswith("https://")
        engine = engines(double.url, mode="push", policies=bundle, ca_file=str(cert))
        assert engine.evaluate(DECISION_RULE, {"n": 1}).allow
        assert engine.health()[0] is True
        untrusted = engines(double.url, mode="external")
        assert_fails_closed(untrusted, 0, "SSLError")


@pytest.mark.parametrize(
    ("url", "kwargs", "fragment"),
    [
        ("opa:8181", {}, r"expected http\(s\)"),
        ("ftp://opa:8181", {}, r"expected http\(s\)"),
        ("http://user:pw@opa:8181", {}, "OPSGATE_OPA_TOKEN"),
        ("http://opa:notaport", {}, "OPSGATE_OPA_URL"),
        ("http://opa:8181?x=1", {}, "no query"),
        ("http://opa:8181", {"mode": "pull"}, "push or external"),
        ("http://opa:8181", {"mode": "push", "policies": None}, "needs a policy bundle"),
        ("http://opa:8181", {"mode": "external", "timeout": 0}, "positive"),
        ("http://opa:8181", {"mode": "external", "ca_file": "/nonexistent.pem"}, "not a file"),
    ],
)
def test_configuration_errors_are_reported_up_front(
    url: str, kwargs: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        OpaEngine(url, **kwargs)


def test_urls_with_a_path_prefix_and_ipv6() -> None:
    with OpaEngine("http://[::1]:8181/opa/", mode="external") as engine:
        assert engine.url == "http://[::1]:8181/opa"
        client = engine._client()
        assert client.root_url == "http://[::1]:8181/opa/v1"


# --- health, describe, threads ----------------------------------------------------------------


def test_health_reports_opa_and_bundle_state(
    double: OpaDouble, engines: Callable[..., OpaEngine], tmp_path: Path
) -> None:
    engine = engines(double.url, mode="push", policies=write_bundle(tmp_path / "b"))
    ok, detail = engine.health()
    assert ok and "healthy" in detail
    double.healthy = False
    ok, detail = engine.health()
    assert not ok and "unhealthy" in detail
    double.healthy = True
    external = engines(double.url, mode="external")
    assert external.health()[0] is True
    double.bundles_activated = False  # only external mode asks /health?bundles
    assert external.health()[0] is False
    assert engine.health()[0] is True
    described = engine.describe()
    assert described["mode"] == "push" and described["revision"] == engine.revision()
    assert described["push_error"] is None and described["pushes"] == 1


def test_threads_each_get_a_client_and_agree(
    double: OpaDouble, engines: Callable[..., OpaEngine], tmp_path: Path
) -> None:
    engine = engines(double.url, mode="push", policies=write_bundle(tmp_path / "b"))
    errors: list[str] = []

    def work(offset: int) -> None:
        for i in range(25):
            n = (i + offset) % 10
            result = engine.evaluate(DECISION_RULE, {"n": n})
            if result.allow != (n <= 5):
                errors.append(f"n={n}: {result.deny}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and engine.failures == 0 and engine.evaluations == 100
    assert len(engine._clients) == 5  # four workers and the thread that pushed
    # A new thread's client closes the sessions of the four finished ones.
    late = threading.Thread(target=engine.evaluate, args=(DECISION_RULE, {"n": 1}))
    late.start()
    late.join()
    assert [t for t, _ in engine._clients] == [threading.main_thread(), late]


def test_probe_input_is_answered_by_the_default_bundle(
    target: OpaTarget, engines: Callable[..., OpaEngine]
) -> None:
    engine = engines(target.url, mode="push", policies=POLICIES)
    result = engine.evaluate(DECISION_RULE, PROBE_INPUT)
    assert result.error is None and "not_allowlisted" in result.deny_codes
    assert engine.health()[0] is True


# --- doctor ------------------------------------------------------------------------------------


@pytest.fixture
def doctor_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> Iterator[Callable[..., tuple[int, str, str]]]:
    """Run `opsgate doctor` in process (registered here if the CLI does not have it yet)."""
    from opsgate.cli import cli, main
    from opsgate.cli.doctor import doctor

    added = "doctor" not in cli.commands
    if added:
        cli.add_command(doctor)
    for name in list(os.environ):
        if name.startswith("OPSGATE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OPSGATE_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("OPSGATE_DB", f"sqlite:///{tmp_path / 'opsgate.db'}")
    monkeypatch.setenv("OPSGATE_CATALOG", str(ROOT / "catalog"))
    monkeypatch.setenv("OPSGATE_POLICIES", str(POLICIES))

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["doctor", *args])
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    if added:
        cli.commands.pop("doctor", None)


def test_doctor_embedded_engine_and_unmigrated_store(
    doctor_cli: Callable[..., tuple[int, str, str]],
) -> None:
    code, out, err = doctor_cli("--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    checks = report["checks"]
    assert checks["policy_engine"]["ok"] is True
    assert checks["policy_engine"]["engine"] == "embedded"
    assert checks["policy_engine"]["revision"] == bundle_revision(POLICIES)
    assert checks["store"]["ok"] is False and "opsgate init" in checks["store"]["detail"]
    assert checks["catalog"]["ok"] is True and checks["catalog"]["action_types"] == 5
    assert checks["prometheus"]["ok"] is None and checks["prometheus"]["required"] is False
    from opsgate.cli import main

    assert main(["init"]) == 0
    code, out, err = doctor_cli()
    assert code == 0, out + err
    assert "ok    store" in out and "migrated" in out and "FAIL" not in out


def test_doctor_with_the_opa_engine(
    doctor_cli: Callable[..., tuple[int, str, str]],
    double: OpaDouble,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opsgate.cli import main

    assert main(["init"]) == 0
    monkeypatch.setenv("OPSGATE_POLICY_ENGINE", "opa")
    monkeypatch.setenv("OPSGATE_OPA_URL", double.url)
    monkeypatch.setenv("OPSGATE_OPA_TOKEN", "s3cret")
    double.token = "s3cret"
    code, out, err = doctor_cli("--json")
    assert code == 0, out + err
    engine = json.loads(out)["checks"]["policy_engine"]
    assert engine["engine"] == "opa" and engine["mode"] == "push" and engine["ok"] is True
    assert engine["revision"] == bundle_revision(POLICIES) and engine["token"] == "set"
    assert "s3cret" not in out

    double.stop()
    code, out, err = doctor_cli()
    assert code == 1
    assert "FAIL  policy engine (opa, push)" in out and "policy engine" in err


def test_doctor_reports_prometheus_when_configured(
    doctor_cli: Callable[..., tuple[int, str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from opsgate.cli import main

    assert main(["init"]) == 0
    monkeypatch.setenv("OPSGATE_PROMETHEUS_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("OPSGATE_PROMETHEUS_TIMEOUT", "1s")
    code, out, _err = doctor_cli("--json")
    report = json.loads(out)
    assert code == 1 and report["checks"]["prometheus"]["ok"] is False
    assert report["checks"]["prometheus"]["required"] is True


def test_a_module_using_a_rule_from_a_later_file_is_pushed(
    double: OpaDouble, engines: Callable[..., OpaEngine], tmp_path: Path
) -> None:
    # OPA (and the double, compiling with OPA's compiler) rejects a.rego alone: `helper`
    # is defined in b.rego, which sorts after it. A second pass pushes it.
    a = "package opsgate\nimport rego.v1\nuses := helper\n"
    b = "package opsgate\nimport rego.v1\nhelper := 1\n"
    bundle = write_bundle(tmp_path / "b", **{"a.rego": a, "b.rego": b})
    engine = engines(double.url, mode="push", policies=bundle)
    assert engine.push_failures == 0, engine.last_error
    assert engine.evaluate(DECISION_RULE, {"n": 1}).allow
    assert {"opsgate/a.rego", "opsgate/b.rego"} <= set(double.policies)


def test_a_module_that_never_compiles_still_fails_the_push(
    double: OpaDouble, engines: Callable[..., OpaEngine], tmp_path: Path
) -> None:
    never = "package opsgate\nimport rego.v1\nuses := nowhere\n"
    bundle = write_bundle(tmp_path / "b", **{"a.rego": never})
    engine = engines(double.url, mode="push", policies=bundle)
    result = engine.evaluate(DECISION_RULE, {"n": 1})
    assert result.deny_codes == [UNAVAILABLE] and "nowhere" in (result.error or "")
