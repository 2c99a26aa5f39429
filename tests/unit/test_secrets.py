"""Secrets stay secret: every encoded form of a secret value is masked in step output
and errors, a secret default is never printed, and the decision-log export marks as
masked exactly the secret params, by flag."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from opsgate.executor.runners import HttpRunner, mask
from opsgate.models import Step
from opsgate.policies.decision_log import masked_pointers
from tests.unit.test_cli import ROOT, Cli

SECRET = 'S3CRET/tok en?"\\ü'


def forms(secret: str) -> list[str]:
    raw = secret.encode()
    return [
        secret,
        quote(secret, safe=""),
        quote(secret),
        quote_plus(secret),
        base64.b64encode(raw).decode(),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode(),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
    ]


@pytest.mark.parametrize("form", forms(SECRET))
def test_every_encoded_form_of_a_secret_is_masked(form: str) -> None:
    text = f"GET /api?token={form} failed: 500 body={{'echo': '{form}'}}"
    out = mask(text, [SECRET])
    assert form not in out
    assert out.count("***") == 2


def test_the_issues_url_encoded_leak_through_an_http_error_is_masked() -> None:
    secret = "S3CRET/tok en?"
    step = Step.model_validate(
        {"http": {"method": "GET", "url": "http://127.0.0.1:9/flags/{token}"}, "timeout": "1s"}
    )
    result = HttpRunner().run(step, {"token": secret}, secrets=[secret])
    assert not result.ok and result.error
    assert "S3CRET%2Ftok%20en%3F" not in result.error and secret not in result.error
    assert "***" in result.error


def test_a_short_secret_is_still_masked_as_is() -> None:
    assert mask("pin=42;", ["42"]) == "pin=***;"


def test_a_secret_default_is_never_printed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    catalog = tmp_path / "catalog"
    shutil.copytree(ROOT / "catalog", catalog)
    scale = catalog / "scale_deployment.yaml"
    scale.write_text(
        scale.read_text().replace(
            "params:\n",
            "params:\n  token: {type: string, secret: true, required: false, "
            "default: hunter2-default}\n",
            1,
        )
    )
    cli = Cli(monkeypatch, capsys, tmp_path / "opsgate.db")
    monkeypatch.setenv("OPSGATE_CATALOG", str(catalog))
    shown = cli.json("catalog", "show", "scale_deployment")
    assert shown["params"]["token"] == {"type": "string", "maxLength": 256, "writeOnly": True}
    code, out, _ = cli("catalog", "show", "scale_deployment")
    assert code == 0 and "hunter2" not in out


def test_the_decision_log_marks_secret_params_by_flag_not_by_value() -> None:
    document = {
        "action": {
            "params": {"token": "***", "comment": "***", "replicas": 3},
            "secret_params": ["token"],
        }
    }
    # "comment" is literally "***" but not secret; "token" is secret.
    assert masked_pointers(document) == ["/input/action/params/token"]


def test_a_secret_in_argv_is_refused_at_catalog_load(tmp_path: Path) -> None:
    from opsgate.catalog import load_catalog
    from opsgate.errors import InvalidInput

    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / "t.yaml").write_text(
        "name: t\nparams:\n  token: {type: string, secret: true}\n"
        'run: {argv: [curl, "-H", "Authorization: {token}", "http://x"]}\n'
    )
    with pytest.raises(InvalidInput, match=r"run\.argv.*secret param \{token\}.*env"):
        load_catalog(catalog)


def test_a_secret_reaches_a_shell_step_through_env_and_not_argv(tmp_path: Path) -> None:
    from opsgate.executor.runners import ShellRunner

    out = tmp_path / "seen"
    script = (
        'printf "%s" "$OPSGATE_TEST_TOKEN" > "$0.env"; '
        'tr "\\0" " " < /proc/$$/cmdline > "$0.self"; '
        'tr "\\0" " " < /proc/$PPID/cmdline > "$0.parent"'
    )
    step = Step.model_validate(
        {"argv": ["/bin/sh", "-c", script, str(out)], "env": {"OPSGATE_TEST_TOKEN": "{token}"}}
    )
    result = ShellRunner().run(step, {"token": SECRET}, secrets=[SECRET])
    assert result.ok, result
    assert Path(f"{out}.env").read_text() == SECRET
    for argv_file in (f"{out}.self", f"{out}.parent"):
        seen = Path(argv_file).read_text()
        assert seen and SECRET not in seen and "S3CRET" not in seen


@pytest.mark.parametrize(
    ("step", "problem"),
    [
        ({"argv": ["true"], "env": {"lower": "x"}}, "env name"),
        ({"argv": ["true"], "env": {"A=B": "x"}}, "env name"),
        ({"http": {"method": "GET", "url": "http://127.0.0.1:9"}, "env": {"A": "x"}}, "argv"),
        ({"argv": ["true"], "env": {f"V{i}": "x" for i in range(65)}}, "at most 64"),
    ],
)
def test_malformed_step_env_is_refused(step: dict[str, object], problem: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=problem):
        Step.model_validate(step)


def test_a_step_never_sees_the_workers_opsgate_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opsgate.executor.runners import ShellRunner

    monkeypatch.setenv("OPSGATE_DB", "postgresql+psycopg://opsgate:db-password@db/opsgate")
    monkeypatch.setenv("OPSGATE_AUDIT_KEY", "/etc/opsgate/audit.key")
    monkeypatch.setenv("KUBECONFIG", "/etc/kube/config")
    step = Step.model_validate({"argv": ["/usr/bin/env"]})
    result = ShellRunner().run(step, {})
    assert result.ok
    assert "db-password" not in result.output and "OPSGATE_" not in result.output
    assert "KUBECONFIG=/etc/kube/config" in result.output  # the rest is inherited
