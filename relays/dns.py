"""MX and address lookups: one answer cache for the service, negative caching, one query in flight per name."""

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from relays.instruments import DNS_CACHE_HITS, DNS_LOOKUPS

#: Cap on how long any answer is kept, whatever its TTL says.
MAX_TTL = 3600.0
#: Most answers kept; past it, expired ones go first, then the oldest.
MAX_ENTRIES = 10_000
#: How long "no such name" / "no such record" is kept when the answer carries no SOA.
DEFAULT_NEGATIVE_TTL = 60.0
MAX_NEGATIVE_TTL = 900.0


class NoSuchDomain(Exception):
    """NXDOMAIN: the name does not exist."""


class DnsFailure(Exception):
    """SERVFAIL, REFUSED, a timeout, no reachable nameserver: try again later."""


@dataclass(frozen=True)
class MxHost:
    preference: int
    name: str


@dataclass(frozen=True)
class _Entry:
    expires: float
    # Plain values, converted once when stored (MxHost, or address strings), not per delivery.
    # None: the name exists but has no records of this type.
    records: tuple[Any, ...] | None
    nxdomain: bool = False


_MX = dns.rdatatype.MX
_IPV4 = (dns.rdatatype.A,)
_IPV4_IPV6 = (dns.rdatatype.A, dns.rdatatype.AAAA)


def _preference(host: MxHost) -> int:
    return host.preference


class DnsResolver:
    """dnspython's async resolver with a TTL cache in front of it.

    dnspython neither caches by default nor coalesces concurrent misses, so a
    burst of deliveries to one domain would send one query per message; here
    it sends one, and every delivery waiting for that name shares its answer.
    """

    def __init__(self, nameservers: Sequence[tuple[str, int]] | None = None, lifetime: float = 5.0) -> None:
        self._nameservers = list(nameservers or [])
        self._lifetime = lifetime
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._cache: dict[tuple[str, dns.rdatatype.RdataType], _Entry] = {}
        self._inflight: dict[tuple[str, dns.rdatatype.RdataType], asyncio.Future[_Entry]] = {}
        # Counters for the service's metrics: lookups sent, and answers served without one.
        self.queries = 0
        self.cache_hits = 0

    def _get_resolver(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            if self._nameservers:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in self._nameservers]
            else:
                try:
                    resolver = dns.asyncresolver.Resolver()
                except dns.resolver.NoResolverConfiguration as exc:
                    raise DnsFailure(f"no resolver configuration ({exc}); set MAILRELAY_DNS_NAMESERVERS") from None
            resolver.lifetime = self._lifetime
            resolver.cache = None  # ours is in front, with single-flight
            self._resolver = resolver
        return self._resolver

    async def mx(self, domain: str) -> list[MxHost] | None:
        """MX hosts in the order to try them: by preference, equal preferences shuffled
        (RFC 5321 5.1). None when the domain has no MX (implicit MX); [] for a null MX (RFC 7505).
        Raises NoSuchDomain or DnsFailure."""
        entry = self._fresh(domain, _MX) or await self._lookup(domain, _MX)
        if entry.nxdomain:
            raise NoSuchDomain(domain)
        if not entry.records:
            return None
        hosts: list[MxHost] = list(entry.records)
        if len(hosts) == 1:  # the usual case: nothing to order
            return [] if hosts[0].name in ("", ".") else hosts
        hosts = [h for h in hosts if h.name not in ("", ".")]
        random.shuffle(hosts)
        hosts.sort(key=_preference)  # stable: equal preferences stay shuffled
        return hosts

    async def addresses(self, host: str, *, ipv4_only: bool) -> list[str]:
        """IPv4 then IPv6 addresses of `host`; [] when it has none. Raises DnsFailure
        only when no lookup answered."""
        rdtypes = _IPV4 if ipv4_only else _IPV4_IPV6
        found: list[str] = []
        failure: DnsFailure | None = None
        for rdtype in rdtypes:
            try:
                entry = self._fresh(host, rdtype) or await self._lookup(host, rdtype)
            except DnsFailure as exc:
                failure = exc
                continue
            found.extend(entry.records or ())
        if not found and failure is not None:
            raise failure
        return found

    def _fresh(self, name: str, rdtype: dns.rdatatype.RdataType) -> _Entry | None:
        """The cached answer while it is fresh: a warm cache answers without a coroutine."""
        # Names usually come normalised already (domain_of lower-cases): one lookup, not two.
        entry = self._cache.get((name, rdtype)) or self._cache.get((name.lower().rstrip("."), rdtype))
        if entry is not None and entry.expires > time.monotonic():
            self.cache_hits += 1
            DNS_CACHE_HITS.inc()
            return entry
        return None

    async def _lookup(self, name: str, rdtype: dns.rdatatype.RdataType) -> _Entry:
        entry = self._fresh(name, rdtype)
        if entry is not None:
            return entry
        key = (name.lower().rstrip("."), rdtype)
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._query(*key))
            self._inflight[key] = future
            future.add_done_callback(lambda f: self._lookup_done(key, f))
        else:
            self.cache_hits += 1
            DNS_CACHE_HITS.inc()
        # shield: one caller giving up (its deadline) must not cancel the others' lookup.
        return await asyncio.shield(future)

    def _lookup_done(self, key: tuple[str, dns.rdatatype.RdataType], future: asyncio.Future[_Entry]) -> None:
        self._inflight.pop(key, None)
        if not future.cancelled():
            future.exception()  # retrieved: every waiter may have given up on it

    def _store(self, key: tuple[str, dns.rdatatype.RdataType], entry: _Entry) -> None:
        if len(self._cache) >= MAX_ENTRIES:
            now = time.monotonic()
            for stale in [k for k, e in self._cache.items() if e.expires <= now]:
                del self._cache[stale]
            while len(self._cache) >= MAX_ENTRIES:
                del self._cache[next(iter(self._cache))]  # the oldest stored
        self._cache[key] = entry

    async def _query(self, name: str, rdtype: dns.rdatatype.RdataType) -> _Entry:
        self.queries += 1
        DNS_LOOKUPS.inc()
        now = time.monotonic()
        try:
            answer = await self._get_resolver().resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN as exc:
            entry = _Entry(now + _negative_ttl(exc), None, nxdomain=True)
        except dns.resolver.NoAnswer as exc:
            entry = _Entry(now + _negative_ttl(exc), None)
        except dns.resolver.NoNameservers as exc:
            raise DnsFailure(_reason(exc, "no nameserver answered (SERVFAIL or REFUSED)")) from None
        except dns.exception.Timeout:
            raise DnsFailure("timed out") from None
        except dns.exception.DNSException as exc:
            raise DnsFailure(_reason(exc, type(exc).__name__)) from None
        else:
            ttl = min(float(answer.rrset.ttl), MAX_TTL) if answer.rrset is not None else DEFAULT_NEGATIVE_TTL
            entry = _Entry(now + ttl, tuple(_plain(r) for r in answer))
        self._store((name, rdtype), entry)
        return entry


def _plain(record: Any) -> Any:
    if record.rdtype == dns.rdatatype.MX:
        return MxHost(record.preference, record.exchange.to_text(omit_final_dot=True))
    return record.address  # A, AAAA


def _negative_ttl(exc: dns.exception.DNSException) -> float:
    """RFC 2308: the SOA's TTL, bounded by its MINIMUM field, when the answer carries one."""
    responses: list[Any] = []
    if isinstance(exc, dns.resolver.NXDOMAIN):
        responses = list(exc.responses().values())  # type: ignore[no-untyped-call]
    elif isinstance(exc, dns.resolver.NoAnswer) and exc.kwargs.get("response") is not None:
        responses = [exc.kwargs["response"]]
    for response in responses:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA:
                return min(float(rrset.ttl), float(rrset[0].minimum), MAX_NEGATIVE_TTL)
    return DEFAULT_NEGATIVE_TTL


def _reason(exc: dns.exception.DNSException, default: str) -> str:
    text = str(exc)
    if "SERVFAIL" in text:
        return "SERVFAIL"
    if "REFUSED" in text:
        return "REFUSED"
    return default
