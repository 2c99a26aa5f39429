"""OIDC bearer JWTs, checked against the issuer's published keys (JWKS).

Signature (asymmetric algorithms only), `iss`, `aud`, `exp` (with a configurable clock
skew) and `sub` are required; the user comes from a configurable claim and the groups
from another. Any doubt is Unauthenticated: nothing about a token is trusted until all
of it checks out.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import jwt
import requests

from opsgate.auth.principal import MAX_GROUPS, NAME, Principal, Unauthenticated

# Never HS*: a shared-secret algorithm would let anyone holding the public key sign.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA")
ACCESS_TOKEN_TYPES = {"at+jwt", "application/at+jwt", "jwt"}
DISCOVERY_TTL = 3600.0
JWKS_REFETCH_COOLDOWN = 5.0  # an unknown key id refetches the keys at most this often


@dataclass(frozen=True)
class OidcSettings:
    issuer: str
    audience: str
    user_claim: str = "sub"
    groups_claim: str = "groups"
    leeway: float = 30.0
    client_id: str | None = None  # the public client `opsgate login` uses
    scopes: str = "openid profile offline_access"
    timeout: float = 5.0

    def public(self) -> dict[str, Any]:
        """What a client needs for `opsgate login`; nothing secret."""
        return {
            "issuer": self.issuer,
            "audience": self.audience,
            "client_id": self.client_id,
            "scopes": self.scopes,
        }


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and not token.startswith("ogt_")


def discover(issuer: str, timeout: float) -> dict[str, Any]:
    """The issuer's OpenID configuration; its `issuer` must be exactly ours (mix-up)."""
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        response = requests.get(url, timeout=timeout)
        response.raise_for_status()
        document = response.json()
    except (requests.RequestException, ValueError) as exc:
        raise Unauthenticated(f"cannot reach the OpenID provider: {type(exc).__name__}") from None
    if not isinstance(document, dict) or document.get("issuer") != issuer:
        raise Unauthenticated("the OpenID provider's discovery document names another issuer")
    return document


class OidcVerifier:
    """Verifies bearer JWTs for one issuer and audience; thread-safe."""

    def __init__(self, settings: OidcSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._jwks: jwt.PyJWKClient | None = None
        self._discovered_at = 0.0

    def _keys(self) -> jwt.PyJWKClient:
        with self._lock:
            stale = time.monotonic() - self._discovered_at > DISCOVERY_TTL
            if self._jwks is None or stale:
                document = discover(self.settings.issuer, self.settings.timeout)
                jwks_uri = document.get("jwks_uri")
                if not isinstance(jwks_uri, str) or not jwks_uri.startswith(
                    ("https://", "http://")
                ):
                    raise Unauthenticated("the OpenID provider publishes no usable jwks_uri")
                self._jwks = jwt.PyJWKClient(
                    jwks_uri,
                    cache_keys=False,
                    cache_jwk_set=True,
                    lifespan=300,
                    timeout=self.settings.timeout,
                    cooldown_duration=JWKS_REFETCH_COOLDOWN,
                )
                self._discovered_at = time.monotonic()
            return self._jwks

    def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("invalid or expired credentials") from None
        algorithm = header.get("alg")
        if algorithm not in ALGORITHMS:
            raise Unauthenticated("invalid or expired credentials")
        typ = header.get("typ")
        if typ is not None and str(typ).lower() not in ACCESS_TOKEN_TYPES:
            raise Unauthenticated("invalid or expired credentials")
        try:
            key = self._keys().get_signing_key_from_jwt(token)
        except jwt.PyJWKClientConnectionError:
            raise Unauthenticated("cannot reach the OpenID provider's keys") from None
        except jwt.PyJWTError:
            raise Unauthenticated("invalid or expired credentials") from None
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[algorithm],
                audience=self.settings.audience,
                issuer=self.settings.issuer,
                leeway=self.settings.leeway,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError:
            raise Unauthenticated("invalid or expired credentials") from None
        return self.principal(claims)

    def principal(self, claims: dict[str, Any]) -> Principal:
        user = claims.get(self.settings.user_claim)
        if not isinstance(user, str) or not NAME.match(user):
            raise Unauthenticated(f"the token's {self.settings.user_claim} claim is not a name")
        raw_groups = claims.get(self.settings.groups_claim, [])
        if not isinstance(raw_groups, list) or len(raw_groups) > MAX_GROUPS:
            raise Unauthenticated(f"the token's {self.settings.groups_claim} claim is not a list")
        groups = tuple(sorted({g for g in raw_groups if isinstance(g, str) and NAME.match(g)}))
        # A client-credentials token has no end user (sub is the client): a machine,
        # which may propose but never approve.
        machine = claims.get("client_id") is not None and claims.get("sub") == claims.get(
            "client_id"
        )
        return Principal(
            id=user,
            kind="agent" if machine else "human",
            groups=groups,
            method="oidc",
            credential=str(claims.get("jti", ""))[:128],
        )
