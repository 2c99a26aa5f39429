"""`opsgate login`: the OAuth 2.0 device authorization grant (RFC 8628) against the
identity provider the server names, then a check with the server that it works."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from opsgate.auth.oidc import discover
from opsgate.auth.principal import Unauthenticated
from opsgate.client import credentials
from opsgate.client.http import ApiClient, check_url
from opsgate.errors import ConfigError, OpsgateError, Refused

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


def _post(url: str, data: dict[str, str]) -> tuple[int, dict[str, Any]]:
    try:
        response = requests.post(url, data=data, timeout=15)
        answer = response.json()
    except (requests.RequestException, ValueError) as exc:
        raise OpsgateError(f"the identity provider did not answer: {type(exc).__name__}") from None
    return response.status_code, answer if isinstance(answer, dict) else {}


def server_oidc(server: str) -> dict[str, Any]:
    try:
        response = requests.get(f"{check_url(server)}/api/v1/auth", timeout=15)
        oidc = response.json().get("oidc")
    except (requests.RequestException, ValueError, AttributeError) as exc:
        raise OpsgateError(f"cannot reach the opsgate server at {server}: {exc}") from None
    if not isinstance(oidc, dict) or not oidc.get("client_id"):
        raise ConfigError(
            "this opsgate server has no OpenID login configured; ask for an API token"
        )
    return oidc


def device_login(
    server: str, say: Callable[[str], None], *, sleep: Callable[[float], None] = time.sleep
) -> tuple[Path, dict[str, Any]]:
    oidc = server_oidc(server)
    try:
        provider = discover(str(oidc["issuer"]), 15.0)
    except Unauthenticated as exc:
        raise OpsgateError(str(exc)) from None
    device_endpoint = provider.get("device_authorization_endpoint")
    token_endpoint = provider.get("token_endpoint")
    if not isinstance(device_endpoint, str) or not isinstance(token_endpoint, str):
        raise ConfigError("the identity provider does not offer the device authorization grant")
    client_id = str(oidc["client_id"])
    status, device = _post(
        device_endpoint,
        {
            "client_id": client_id,
            "scope": str(oidc.get("scopes") or "openid"),
            # RFC 8707; providers that name it differently (`audience`) ignore it.
            "resource": str(oidc["audience"]),
        },
    )
    if status != 200 or "device_code" not in device:
        raise Refused(f"the identity provider refused the login: {device.get('error', status)}")
    link = device.get("verification_uri_complete") or device.get("verification_uri")
    say(f"open {link} and confirm the code {device.get('user_code')}")
    interval = float(device.get("interval") or 5)
    deadline = time.monotonic() + float(device.get("expires_in") or 600)
    poll = {
        "grant_type": DEVICE_GRANT,
        "device_code": device["device_code"],
        "client_id": client_id,
    }
    while True:
        if time.monotonic() > deadline:
            raise Refused("the login code expired; run `opsgate login` again")
        status, answer = _post(token_endpoint, poll)
        if status == 200 and isinstance(answer.get("access_token"), str):
            break
        error = answer.get("error")
        if error == "authorization_pending":
            sleep(interval)
        elif error == "slow_down":
            interval += 5
            sleep(interval)
        else:
            raise Refused(f"login refused by the identity provider: {error or status}")
    entry = credentials.token_entry(
        answer,
        {"issuer": oidc["issuer"], "token_endpoint": token_endpoint, "client_id": client_id},
    )
    client = ApiClient(server, entry["access_token"])
    try:
        who = client.call("GET", "/whoami")
    finally:
        client.close()
    path = credentials.save(check_url(server), entry)
    return path, who
