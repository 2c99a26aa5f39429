"""TLS for the HTTP clients opsgate talks through (Prometheus, OPA)."""

from __future__ import annotations

from typing import Any

import requests
from requests import PreparedRequest
from requests.adapters import HTTPAdapter


class PinnedCA(HTTPAdapter):
    """Verifies TLS with one CA file, whatever the environment's CA bundle variables say.

    Setting `session.verify` is not enough: requests lets REQUESTS_CA_BUNDLE and
    CURL_CA_BUNDLE override it, so a configured CA file would silently not be used.
    """

    def __init__(self, ca_file: str, max_retries: Any = 0) -> None:
        super().__init__(max_retries=max_retries)
        self.ca_file = ca_file

    def send(self, request: PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs["verify"] = self.ca_file
        return super().send(request, *args, **kwargs)


def pin_ca(session: requests.Session, ca_file: str, prefix: str = "https://") -> None:
    """Make every request of `session` under `prefix` verify against `ca_file` only
    (mount at the most specific prefix a client uses, or its own adapter wins)."""
    retries = getattr(session.get_adapter(prefix), "max_retries", 0)
    session.mount(prefix, PinnedCA(ca_file, retries))
