"""A real OpenID provider for the tests: the npm package `oidc-provider` under Node on
127.0.0.1 (tests/oidc/provider.mjs), and a person's side of the device flow."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import time
import urllib.parse
from typing import Any

import requests

from opsgate.demo.processes import LOOPBACK, free_port, stop_process
from tests.integration.api_server import ROOT

PROVIDER_DIR = ROOT / "tests" / "oidc"
AUDIENCE = "urn:opsgate"


def node_ready() -> str | None:
    """Why the provider cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not installed (make system-deps)"
    if not (PROVIDER_DIR / "node_modules" / "oidc-provider").is_dir():
        return "oidc-provider is not installed (make oidc-deps)"
    return None


class OidcProvider:
    """`node provider.mjs PORT KEY_ID`; `restart(key_id)` rotates the signing key."""

    def __init__(self, key_id: str = "k1") -> None:
        self.port = free_port()
        self.key_id = key_id
        self.process: subprocess.Popen[str] | None = None

    @property
    def issuer(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        self.process = subprocess.Popen(
            ["node", "provider.mjs", str(self.port), self.key_id],
            cwd=PROVIDER_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        line = self.process.stdout.readline()
        if not line.startswith("ready ") or time.monotonic() > deadline:
            stop_process(self.process)
            raise RuntimeError(f"oidc-provider did not start: {line!r}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            if self.process.stdout is not None:
                self.process.stdout.close()
            self.process = None

    def restart(self, key_id: str) -> None:
        self.stop()
        self.key_id = key_id
        self.start()

    def client_token(
        self, client: str = "opsgate-ci", secret: str = "ci-secret", resource: str = AUDIENCE
    ) -> str:
        """A client-credentials access token (a machine's) for `resource`."""
        response = requests.post(
            self.issuer + "/token",
            data={"grant_type": "client_credentials", "resource": resource},
            auth=(client, secret),
            timeout=10,
        )
        response.raise_for_status()
        return str(response.json()["access_token"])

    def user_token(self, login: str, resource: str = AUDIENCE) -> dict[str, Any]:
        """A person's tokens by the device flow, playing both the device and the person."""
        response = requests.post(
            self.issuer + "/device/auth",
            data={
                "client_id": "opsgate-cli",
                "scope": "openid profile groups offline_access",
                "resource": resource,
            },
            timeout=10,
        )
        response.raise_for_status()
        device = response.json()
        approve_device(device["verification_uri_complete"], login)
        token = requests.post(
            self.issuer + "/token",
            data={
                "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
                "device_code": device["device_code"],
                "client_id": "opsgate-cli",
            },
            timeout=10,
        )
        token.raise_for_status()
        return dict(token.json())


def _form(page: requests.Response) -> tuple[str, dict[str, str]]:
    match = re.search(r'<form[^>]*action="([^"]+)"', page.text)
    action = html.unescape(match.group(1)) if match else page.url
    fields = dict(re.findall(r'<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"', page.text))
    return urllib.parse.urljoin(page.url, action), fields


def approve_device(verification_uri_complete: str, login: str) -> None:
    """What a person does in the browser: open the link, confirm the code, sign in as
    `login` (the provider's development login takes any password), consent."""
    browser = requests.Session()
    page = browser.get(verification_uri_complete, timeout=10)
    for extra in ({}, {}, {"login": login, "password": "any"}, {}):
        action, fields = _form(page)
        page = browser.post(action, data={**fields, **extra}, timeout=10)
        page.raise_for_status()
    if "Sign-in Success" not in page.text:
        raise AssertionError(f"the device flow did not finish: {page.url}")
    browser.close()
