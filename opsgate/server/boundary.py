"""The server's edge: identity a trusted proxy asserts, and a limit on failed logins.

A header such as X-Forwarded-User is a claim anybody can type. It is believed only when
the TCP peer is a proxy the operator named (OPSGATE_TRUSTED_PROXY) and only under the
header name the operator named (OPSGATE_PROXY_USER_HEADER); from any other peer it is
ignored and counted as a spoof attempt.
"""

from __future__ import annotations

import ipaddress
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from opsgate.auth.principal import Principal, Unauthenticated, check_groups, check_name
from opsgate.errors import ConfigError, InvalidInput, OpsgateError

# Headers identity-asserting proxies commonly set: counted as spoof attempts whenever they
# arrive from a peer that is not a configured proxy (never believed from one).
IDENTITY_HEADERS = frozenset(
    {
        "x-forwarded-user",
        "x-forwarded-email",
        "x-forwarded-groups",
        "x-remote-user",
        "x-remote-group",
        "remote-user",
        "x-auth-request-user",
        "x-auth-request-email",
        "x-auth-request-groups",
    }
)
_HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")
MAX_PROXY_HEADER = 4096
MAX_PROXIES = 256
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class RateLimited(OpsgateError):
    """Too many failed authentications from this peer: 429 with Retry-After."""

    exit_code = 3

    def __init__(self, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(
            f"too many failed authentications from this address; retry in {retry_after}s"
        )


class InvalidProxyIdentity(Unauthenticated):
    """A trusted proxy asserted something malformed: a defect of the proxy, not a guess
    at a credential, so it is counted but does not rate-limit the proxy's address (and
    with it everyone behind it)."""


def parse_networks(text: str) -> tuple[Network, ...]:
    """OPSGATE_TRUSTED_PROXY: comma-separated IP addresses and CIDR blocks."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ConfigError("OPSGATE_TRUSTED_PROXY: expected IP addresses or CIDR blocks")
    if len(items) > MAX_PROXIES:
        raise ConfigError(f"OPSGATE_TRUSTED_PROXY: more than {MAX_PROXIES} entries")
    networks: list[Network] = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(
                f"OPSGATE_TRUSTED_PROXY: {item!r} is not an IP address or CIDR block"
            ) from None
    return tuple(networks)


def header_name(setting: str, value: str) -> str:
    if not _HEADER_NAME.match(value):
        raise ConfigError(f"{setting}: {value!r} is not an HTTP header name")
    return value.lower()


@dataclass(frozen=True)
class TrustedProxy:
    networks: tuple[Network, ...]
    user_header: str
    groups_header: str | None = None

    @classmethod
    def from_settings(
        cls, trusted: str | None, user_header: str | None, groups_header: str | None
    ) -> TrustedProxy | None:
        """None unless OPSGATE_TRUSTED_PROXY is set; then the user header must be named
        too: which header carries identity is never guessed."""
        if not trusted:
            if user_header or groups_header:
                raise ConfigError(
                    "OPSGATE_PROXY_USER_HEADER needs OPSGATE_TRUSTED_PROXY: the proxies "
                    "whose header is believed"
                )
            return None
        if not user_header:
            raise ConfigError(
                "OPSGATE_TRUSTED_PROXY needs OPSGATE_PROXY_USER_HEADER: the header the proxy "
                "puts the authenticated user in"
            )
        return cls(
            parse_networks(trusted),
            header_name("OPSGATE_PROXY_USER_HEADER", user_header),
            header_name("OPSGATE_PROXY_GROUPS_HEADER", groups_header) if groups_header else None,
        )

    def trusts(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def principal(self, peer: str, headers: Mapping[str, str]) -> Principal | None:
        """The principal this proxy asserts, None when it asserts none (an empty header
        is none), Unauthenticated when what it asserts is malformed."""
        user = headers.get(self.user_header)
        if user is None or not user.strip():
            return None
        groups_text = headers.get(self.groups_header, "") if self.groups_header else ""
        if len(user) > MAX_PROXY_HEADER or len(groups_text) > MAX_PROXY_HEADER:
            raise InvalidProxyIdentity("invalid proxy identity: header too long")
        try:
            name = check_name("user", user.strip())
            groups = check_groups([g.strip() for g in groups_text.split(",") if g.strip()])
        except InvalidInput as exc:
            raise InvalidProxyIdentity(f"invalid proxy identity: {exc}") from None
        return Principal(id=name, kind="human", groups=groups, method="proxy", credential=peer)


def asserted_headers(headers: Mapping[str, str], proxy: TrustedProxy | None) -> list[str]:
    """Identity headers present on a request (the configured ones and the usual names)."""
    names = set(IDENTITY_HEADERS)
    if proxy is not None:
        names.add(proxy.user_header)
        if proxy.groups_header:
            names.add(proxy.groups_header)
    return sorted(name for name in names if name in headers)


class FailureLimiter:
    """A token bucket of failed authentications per peer address.

    Each peer may fail `limit` times at once, earning one more try every window/limit
    seconds; past that it gets 429 until a try is earned back. At most `max_peers` are
    tracked: the least recently failing is forgotten first, so memory stays bounded
    whatever an attacker spreads its attempts over.
    """

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        max_peers: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1 or window <= 0 or max_peers < 1:
            raise ValueError("limit, window and max_peers must be positive")
        self.limit = limit
        self.rate = limit / window  # tries earned back per second
        self.max_peers = max_peers
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def _tokens(self, peer: str, now: float) -> float:
        entry = self._buckets.get(peer)
        if entry is None:
            return float(self.limit)
        tokens, at = entry
        return min(float(self.limit), tokens + (now - at) * self.rate)

    def retry_after(self, peer: str) -> int | None:
        """Seconds until this peer may try again, or None when it may now."""
        with self._lock:
            now = self.clock()
            tokens = self._tokens(peer, now)
            if tokens >= 1:
                return None
            return max(1, math.ceil((1 - tokens) / self.rate))

    def failure(self, peer: str) -> None:
        with self._lock:
            now = self.clock()
            tokens = self._tokens(peer, now)
            self._buckets[peer] = (max(0.0, tokens - 1), now)
            self._buckets.move_to_end(peer)
            while len(self._buckets) > self.max_peers:
                self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)
