"""MTA-STS (RFC 8461) for `mx`: a recipient domain's policy, looked up, fetched, cached and checked.

A domain publishes `_mta-sts.<domain>` TXT (`v=STSv1; id=...;`) and a policy at
`https://mta-sts.<domain>/.well-known/mta-sts.txt` (mode, the MX host patterns, max_age). The
policy is fetched over HTTPS with the certificate verified for `mta-sts.<domain>`, no redirects,
at most MAX_POLICY_BYTES within FETCH_TIMEOUT; it is cached for its max_age (at most
MAX_ENTRIES domains) and fetched again when the TXT id changes. A failed lookup or fetch keeps
a cached policy (RFC 8461 5.1: an attacker must not be able to remove it); with nothing cached
the domain has no policy. The host `mta-sts.<domain>` is found through the relay's resolver,
like every other name mx uses.
"""

import asyncio
import ipaddress
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import httpx
import idna

from relays.dns import DnsFailure, DnsResolver

logger = logging.getLogger(__name__)

#: Most bytes of a policy read (RFC 8461 3.2 suggests 64 KiB as a limit).
MAX_POLICY_BYTES = 64 * 1024
#: Seconds a policy fetch may take, connection included (also bounded by the delivery's deadline).
FETCH_TIMEOUT = 10.0
#: Most domains whose policy is cached; past it the least recently used goes first.
MAX_ENTRIES = 10_000
#: RFC 8461 3.2: max_age is at most 31557600 s (a year).
MAX_AGE_LIMIT = 31_557_600

Mode = Literal["enforce", "testing", "none"]
_MODES: dict[str, Mode] = {"enforce": "enforce", "testing": "testing", "none": "none"}


class PolicyError(Exception):
    """A record or policy that does not follow RFC 8461, or a fetch that failed: the reason."""


@dataclass(frozen=True)
class Policy:
    domain: str
    id: str
    mode: Mode
    mx: tuple[str, ...]
    expires: float  # time.monotonic()

    def matches(self, host: str) -> bool:
        """Whether the MX host `host` is one the policy names (RFC 8461 4.1: `*.` covers exactly
        one leftmost label)."""
        host = host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                label, dot, rest = host.partition(".")
                if label and dot and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False


def record_id(texts: list[str]) -> str | None:
    """The id of the domain's one STSv1 record; None when there is none, or more than one (RFC 8461 3.1)."""
    found = [t for t in texts if t.startswith("v=STSv1")]
    if len(found) != 1:
        return None
    fields = dict(_pair(part) for part in found[0].split(";") if part.strip())
    value = fields.get("id", "")
    if not (1 <= len(value) <= 32 and value.isascii() and value.isalnum()):
        return None
    return value


def _pair(part: str) -> tuple[str, str]:
    key, _, value = part.strip().partition("=")
    return key.strip(), value.strip()


def parse_policy(text: str) -> tuple[Mode, tuple[str, ...], int]:
    """The mode, MX patterns and max_age of a policy body; raises PolicyError."""
    version = mode = max_age = None
    mx: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"a policy line without a colon: {line[:80]!r}")
        key, value = key.strip(), value.strip()
        if key == "version":
            version = value
        elif key == "mode":
            mode = value
        elif key == "max_age":
            max_age = value
        elif key == "mx":
            mx.append(value.lower().rstrip("."))
    if version != "STSv1":
        raise PolicyError(f"version is {version!r}, not STSv1")
    if mode not in _MODES:
        raise PolicyError(f"mode is {mode!r}")
    if max_age is None or not max_age.isdigit() or len(max_age) > 10:
        raise PolicyError(f"max_age is {max_age!r}")
    if mode != "none" and not mx:
        raise PolicyError("no mx pattern")
    return _MODES[mode], tuple(mx), min(int(max_age), MAX_AGE_LIMIT)


class MtaSts:
    """The policies of the recipient domains one mx relay delivers to."""

    def __init__(
        self,
        dns: DnsResolver,
        context: ssl.SSLContext,
        *,
        ipv4_only: bool,
        refuse: Callable[[str], bool] | None = None,
    ) -> None:
        self.dns = dns
        self.ipv4_only = ipv4_only
        #: Addresses never fetched from (mx's is_private, unless allow_internal_destinations): the
        #: recipient domain's DNS chooses them, as it chooses the MX hosts mx refuses the same way.
        self.refuse = refuse
        self.client = httpx.AsyncClient(
            verify=context,
            follow_redirects=False,  # RFC 8461 3.3: redirects are not followed
            trust_env=False,  # no proxy or CA from the service's environment
            timeout=httpx.Timeout(FETCH_TIMEOUT),
            limits=httpx.Limits(max_connections=10, max_keepalive_connections=0),
        )
        self._policies: OrderedDict[str, Policy] = OrderedDict()
        self._fetching: dict[tuple[str, str], asyncio.Future[Policy]] = {}

    async def policy(self, domain: str) -> Policy | None:
        """The domain's policy in force: cached, or looked up and fetched now. None: no policy."""
        if not domain.isascii():
            # An internationalised domain's names as DNS and HTTP carry them: A-labels (the Host
            # header and SNI are ASCII; httpx raised UnicodeEncodeError, and the delivery a 500).
            try:
                domain = idna.encode(domain, uts46=True).decode("ascii")
            except idna.IDNAError:
                return None  # no such name in DNS: no policy
        cached = self._cached(domain)
        try:
            texts = await self.dns.txt(f"_mta-sts.{domain}")
        except DnsFailure:
            return cached
        current = record_id(texts)
        if current is None or (cached is not None and cached.id == current):
            return cached  # no record (now): a cached policy stands until it expires
        key = (domain, current)
        future = self._fetching.get(key)
        if future is None:  # one fetch per domain and id, however many deliveries wait for it
            future = asyncio.ensure_future(self._fetch(domain, current))
            self._fetching[key] = future
            future.add_done_callback(lambda f: self._fetched(key, f))
        try:
            return await asyncio.shield(future)
        except PolicyError as exc:
            logger.warning(
                "MTA-STS policy of %s not fetched: %s",
                domain,
                exc,
                extra={"event": "mta_sts_fetch_failed", "domain": domain, "reason": str(exc)},
            )
            return cached

    def _cached(self, domain: str) -> Policy | None:
        policy = self._policies.get(domain)
        if policy is None:
            return None
        if policy.expires <= time.monotonic():
            del self._policies[domain]
            return None
        self._policies.move_to_end(domain)
        return policy

    def _fetched(self, key: tuple[str, str], future: asyncio.Future[Policy]) -> None:
        self._fetching.pop(key, None)
        if future.cancelled() or future.exception() is not None:
            return
        policy = future.result()
        self._policies[policy.domain] = policy
        self._policies.move_to_end(policy.domain)
        while len(self._policies) > MAX_ENTRIES:
            self._policies.popitem(last=False)

    async def _fetch(self, domain: str, policy_id: str) -> Policy:
        host = f"mta-sts.{domain}"
        try:
            addresses = await self.dns.addresses(host, ipv4_only=self.ipv4_only)
        except DnsFailure as exc:
            raise PolicyError(f"{host}: {exc}") from None
        if not addresses:
            raise PolicyError(f"{host} has no address")
        if self.refuse is not None and not (addresses := [a for a in addresses if not self.refuse(a)]):
            raise PolicyError(f"{host} has only addresses mx does not connect to (allow_internal_destinations)")
        errors = []
        for address in addresses[:2]:
            literal = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
            try:
                text = await self._get(f"https://{literal}/.well-known/mta-sts.txt", host)
            except PolicyError as exc:
                errors.append(str(exc))
                continue
            mode, mx, max_age = parse_policy(text)
            return Policy(domain, policy_id, mode, mx, time.monotonic() + max_age)
        raise PolicyError("; ".join(errors))

    async def _get(self, url: str, host: str) -> str:
        """The policy body from `url`, the certificate verified for `host` (sent as SNI and Host)."""
        try:
            async with (
                asyncio.timeout(FETCH_TIMEOUT),
                self.client.stream(
                    "GET",
                    url,
                    # identity: the size limit holds for the bytes that arrive, no decompression
                    headers={"Host": host, "Accept-Encoding": "identity"},
                    extensions={"sni_hostname": host},
                ) as response,
            ):
                if response.status_code != 200:
                    raise PolicyError(f"{host} answered HTTP {response.status_code}")
                if not response.headers.get("content-type", "").lower().startswith("text/plain"):
                    raise PolicyError(f"{host} answered {response.headers.get('content-type')!r}, not text/plain")
                body = bytearray()
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) > MAX_POLICY_BYTES:
                        raise PolicyError(f"{host}: the policy is longer than {MAX_POLICY_BYTES} bytes")
        except (httpx.HTTPError, TimeoutError, ssl.SSLError) as exc:
            raise PolicyError(f"{host}: {type(exc).__name__}: {exc}"[:300]) from None
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyError(f"{host}: the policy is not UTF-8") from None

    async def aclose(self) -> None:
        for future in list(self._fetching.values()):
            future.cancel()
        await self.client.aclose()
