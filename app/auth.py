"""Bearer keys: who is calling, and which relays they may use."""

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from starlette.requests import Request

from app.problems import ProblemError
from relays.rates import KeyQuotas, SharedLimits
from schemas.config import ApiKey, KeyQuota, ServiceSettings


@dataclass(frozen=True)
class Principal:
    """The caller: a key's name (for logs and metrics) and its scope."""

    name: str
    relays: frozenset[str] | None  # None: every relay
    quota: KeyQuota | None = None  # auth.keys[].quota: fleet-wide, relays/rates.py

    def may_use(self, relay: str) -> bool:
        return self.relays is None or relay in self.relays


#: The caller when no key is configured (the service then listens on loopback only).
ANONYMOUS = Principal(name="anonymous", relays=None)


class KeyRing:
    """The configured keys, held only as SHA-256 digests."""

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self._keys = [
            (
                key.digest,
                Principal(
                    name=key.name,
                    relays=None if "*" in key.relays else frozenset(key.relays),
                    quota=key.quota if key.quota and (key.quota.messages or key.quota.recipients) else None,
                ),
            )
            for key in keys
        ]
        self._quotas: KeyQuotas | None = None

    def quotas(self, settings: ServiceSettings) -> KeyQuotas:
        """The keys' quotas, shared through the fleet's Redis; connected on first use (only a key
        with a quota asks), for the configuration these keys came with."""
        if self._quotas is None:
            limits = SharedLimits(settings.fleet, settings.idempotency, what="quota", prefix="mailrelay:quota:")
            self._quotas = KeyQuotas(limits)
        return self._quotas

    async def aclose(self) -> None:
        if self._quotas is not None:
            await self._quotas.limits.aclose()

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, request: Request) -> Principal:
        """The caller, or a 401 problem. With no key configured everyone is ANONYMOUS."""
        if not self._keys:
            return ANONYMOUS
        header = request.headers.get("authorization")
        if header is None:
            raise _unauthorized("an API key is required: send `Authorization: Bearer <key>`", error=None)
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized("the Authorization header must be `Bearer <key>`", error="invalid_request")
        # Compare digests, every one of them, in constant time: neither the key nor
        # which entry matched shows in the timing.
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for known, principal in self._keys:
            if hmac.compare_digest(known, digest):
                found = principal
        if found is None:
            raise _unauthorized("the API key is not valid", error="invalid_token")
        return found


def _unauthorized(detail: str, *, error: str | None) -> ProblemError:
    challenge = 'Bearer realm="mailrelay"'
    if error:
        challenge += f', error="{error}"'
    return ProblemError(401, detail, headers={"WWW-Authenticate": challenge})


def forbidden(principal: Principal, relay: str) -> ProblemError:
    return ProblemError(403, f"the API key {principal.name!r} may not use relay {relay!r}")
