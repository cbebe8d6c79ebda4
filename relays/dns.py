"""MX and address lookups: dnspython's resolver cache for the service, one query in flight per name.

What dnspython 2.9's resolver does with `resolver.cache` set (read in dns/resolver.py and
dns/message.py): it keeps every NOERROR answer, with records or without (NoAnswer), under
(name, rdtype, rdclass), and an NXDOMAIN under (name, ANY, rdclass) so that it answers for
every type; an answer expires at `time.time()` plus the smallest TTL of its CNAMEs and its
records, or for a negative answer of the SOA's TTL and MINIMUM field (RFC 2308), or 300 s
when there is no SOA. `LRUCache(max_size)` holds at most max_size answers and drops the least
recently used first. Its statistics (`hits()`, `misses()`) count `get()` calls, two per name
for a miss (the type, then ANY), not queries sent: the counters here stay ours.
"""

import asyncio
import bisect
import random
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from relays.instruments import DNS_CACHE_HITS, DNS_LOOKUPS

#: Cap on how long a positive answer is kept, whatever its TTL says.
MAX_TTL = 3600.0
#: Most answers kept (dnspython's LRUCache); past it, the one least recently stored or
#: found through the resolver goes first.
MAX_ENTRIES = 10_000
#: How long "no such name" / "no such record" is kept when the answer carries no SOA
#: (dnspython would keep it 300 s), and the cap when it does.
DEFAULT_NEGATIVE_TTL = 60.0
MAX_NEGATIVE_TTL = 900.0
#: How long a failed lookup (SERVFAIL, REFUSED, a timeout) is remembered, so that deliveries to a
#: broken zone do not ask again each time (RFC 2308 section 7 allows up to 5 minutes).
FAILURE_TTL = 30.0


class NoSuchDomain(Exception):
    """NXDOMAIN: the name does not exist."""


class DnsFailure(Exception):
    """SERVFAIL, REFUSED, a timeout, no reachable nameserver: try again later."""


@dataclass(frozen=True)
class Tlsa:
    """One TLSA record (RFC 6698): certificate usage, selector, matching type, data."""

    usage: int
    selector: int
    mtype: int
    data: bytes


@dataclass(frozen=True)
class MxHost:
    preference: int
    name: str


_MX = dns.rdatatype.MX
_ANY = dns.rdatatype.ANY  # where dnspython keeps an NXDOMAIN
_IPV4 = (dns.rdatatype.A,)
_TXT = dns.rdatatype.TXT
_TLSA = dns.rdatatype.TLSA
_IPV4_IPV6 = (dns.rdatatype.A, dns.rdatatype.AAAA)

_Key = tuple[str, dns.rdatatype.RdataType]
#: Up to this many MX records, mx() shuffles them all (2 records: 1.5 us; drawing per preference: 4 us).
_FEW_MX = 32


class _Indexed(weakref.ref[dns.resolver.Answer]):
    """A weak reference to an answer in the cache, with what the warm path needs from it:
    its expiration and its records converted once (None for NXDOMAIN)."""

    __slots__ = ("expiration", "key", "records")

    def __new__(
        cls,
        answer: dns.resolver.Answer,
        forget: Callable[["_Indexed"], None],
        key: _Key,
        records: tuple[Any, ...] | None,
    ) -> "_Indexed":
        return super().__new__(cls, answer, forget)

    def __init__(
        self,
        answer: dns.resolver.Answer,
        forget: Callable[["_Indexed"], None],
        key: _Key,
        records: tuple[Any, ...] | None,
    ) -> None:
        # weakref.ref's own __init__ only checks the arguments __new__ took.
        self.key = key
        self.records = records
        self.expiration = answer.expiration


def _preference(host: MxHost) -> int:
    return host.preference


class AnswerCache(dns.resolver.LRUCache):
    """dnspython's LRU answer cache, keeping no answer longer than the caps above."""

    def put(self, key: dns.resolver.CacheKey, value: dns.resolver.Answer) -> None:
        if value.rrset is not None:
            longest = MAX_TTL
        elif any(rrset.rdtype == dns.rdatatype.SOA for rrset in value.response.authority):
            longest = MAX_NEGATIVE_TTL
        else:
            longest = DEFAULT_NEGATIVE_TTL
        # `expiration` is a documented attribute of Answer; get() judges freshness by it.
        value.expiration = min(value.expiration, time.time() + longest)
        super().put(key, value)


class DnsResolver:
    """dnspython's async resolver and answer cache, with two things it lacks.

    Single-flight: dnspython does not coalesce concurrent misses, so a burst of
    deliveries to a cold domain would send one query per message (200 concurrent
    mx() calls: 200 queries); here it sends one, and every delivery waiting for
    that name shares its answer.

    A warm hit without a coroutine or a dns.name.Name: `_index` finds the
    Answer the cache holds by the name as a string, through a weak reference
    that carries the answer's expiration and its records converted once. An
    entry goes when the cache drops its answer: the index keeps no answer of
    its own, sets no TTL and evicts nothing. A hit costs 0.27 us, as the
    hand-written cache's did; through LRUCache.get() it cost 2.8 us (hashing the
    Name key is a Python loop) and 4.7 us more to make the Name from the string.
    A hit here does not move the answer up the LRU order.

    Failures: dnspython caches no SERVFAIL, REFUSED or timeout, so they are
    kept here, `failure_ttl` seconds each, at most MAX_ENTRIES of them (the
    oldest go first); only a lookup that missed the cache looks at them.
    """

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]] | None = None,
        lifetime: float = 5.0,
        failure_ttl: float = FAILURE_TTL,
    ) -> None:
        self._nameservers = list(nameservers or [])
        self._lifetime = lifetime
        self._failure_ttl = failure_ttl
        self._resolver: dns.asyncresolver.Resolver | None = None
        self.cache = AnswerCache(MAX_ENTRIES)
        self._index: dict[_Key, _Indexed] = {}
        self._inflight: dict[_Key, asyncio.Future[tuple[Any, ...]]] = {}
        self._failures: dict[_Key, tuple[float, str]] = {}  # key -> (monotonic expiry, reason)
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
            resolver.cache = self.cache
            # AD in the query: a validating resolver says whether an answer is DNSSEC-secure (RFC 6840
            # 5.7) without the signatures DO would bring; DANE reads it (tlsa()).
            resolver.flags = dns.flags.RD | dns.flags.AD
            self._resolver = resolver
        return self._resolver

    async def mx(self, domain: str, limit: int | None = None) -> list[MxHost] | None:
        """MX hosts in the order to try them: by preference, equal preferences shuffled
        (RFC 5321 5.1), the first `limit` of them. None when the domain has no MX (implicit MX);
        [] for a null MX (RFC 7505). Raises NoSuchDomain or DnsFailure."""
        records = self._fresh(domain, _MX)
        if records is None:
            records = await self._lookup(domain, _MX)
        if not records:
            return None
        if len(records) == 1:  # the usual case: nothing to order
            return [] if records[0].name in ("", ".") else list(records)
        want = len(records) if limit is None else limit
        hosts: list[MxHost]
        if len(records) <= _FEW_MX:  # a shuffle and a stable sort: cheapest for a few records
            hosts = [h for h in records if h.name not in ("", ".")]
            random.shuffle(hosts)
            hosts.sort(key=_preference)  # stable: equal preferences stay shuffled
            del hosts[want:]
            return hosts
        # The records are sorted by preference once per answer (_query): each preference's
        # hosts are drawn at random, and only until `limit` hosts are drawn, so a zone of
        # a thousand MX records costs 4 us per delivery, not a 300 us shuffle of them all.
        hosts = []
        start, end = 0, len(records)
        while start < end and len(hosts) < want:
            stop = bisect.bisect_right(records, records[start].preference, start, end, key=_preference)
            group = [h for h in records[start:stop] if h.name not in ("", ".")]
            hosts += random.sample(group, min(len(group), want - len(hosts)))
            start = stop
        return hosts

    async def addresses(self, host: str, *, ipv4_only: bool) -> list[str]:
        """IPv4 then IPv6 addresses of `host`; [] when it has none. Raises DnsFailure
        only when no lookup answered."""
        rdtypes = _IPV4 if ipv4_only else _IPV4_IPV6
        found: list[str] = []
        failure: DnsFailure | None = None
        for rdtype in rdtypes:
            try:
                records = self._fresh(host, rdtype)
                if records is None:
                    records = await self._lookup(host, rdtype)
            except NoSuchDomain:
                continue
            except DnsFailure as exc:
                failure = exc
                continue
            found.extend(records)
        if not found and failure is not None:
            raise failure
        return found

    async def txt(self, name: str) -> list[str]:
        """The TXT records of `name`, each one string (its pieces joined, RFC 7208 3.3); [] when
        the name or the records do not exist. Raises DnsFailure."""
        try:
            records = self._fresh(name, _TXT)
            if records is None:
                records = await self._lookup(name, _TXT)
        except NoSuchDomain:
            return []
        return list(records)

    async def tlsa(self, name: str) -> tuple[bool, tuple[Tlsa, ...]]:
        """The TLSA records of `name` (`_25._tcp.<host>`), and whether the resolver validated
        them (the AD bit: DNSSEC-secure). (False, ()) when the name does not exist. Raises
        DnsFailure: SERVFAIL, which is what a validating resolver answers for bogus data."""
        try:
            records = self._fresh(name, _TLSA)
            if records is None:
                records = await self._lookup(name, _TLSA)
        except NoSuchDomain:
            return False, ()
        secure, *found = records
        return bool(secure), tuple(found)

    def _fresh(self, name: str, rdtype: dns.rdatatype.RdataType) -> tuple[Any, ...] | None:
        """The cached records while fresh, None when there are none; raises NoSuchDomain
        for a cached NXDOMAIN."""
        entry = self._index.get((name, rdtype))
        if entry is None:
            # Names usually come normalised already (domain_of lower-cases): one lookup, not three.
            name = name.lower().rstrip(".")
            entry = self._index.get((name, rdtype)) or self._index.get((name, _ANY))
            if entry is None:
                return None
        if entry.expiration <= time.time():  # the cache's clock
            return None
        self.cache_hits += 1
        DNS_CACHE_HITS.inc()
        if entry.records is None:
            raise NoSuchDomain(name)
        return entry.records

    def _add(self, key: _Key, answer: dns.resolver.Answer, records: tuple[Any, ...] | None) -> None:
        self._index[key] = _Indexed(answer, self._forget, key, records)

    def _forget(self, entry: _Indexed) -> None:
        """The cache dropped the answer (evicted, expired, replaced)."""
        if self._index.get(entry.key) is entry:  # not a newer answer's entry
            del self._index[entry.key]

    async def _lookup(self, name: str, rdtype: dns.rdatatype.RdataType) -> tuple[Any, ...]:
        key = (name.lower().rstrip("."), rdtype)
        failed = self._failures.get(key)
        if failed is not None:
            if failed[0] > time.monotonic():
                self.cache_hits += 1
                DNS_CACHE_HITS.inc()
                raise DnsFailure(failed[1])
            del self._failures[key]
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

    def _lookup_done(self, key: _Key, future: asyncio.Future[tuple[Any, ...]]) -> None:
        self._inflight.pop(key, None)
        if not future.cancelled():
            future.exception()  # retrieved: every waiter may have given up on it

    async def _query(self, name: str, rdtype: dns.rdatatype.RdataType) -> tuple[Any, ...]:
        self.queries += 1
        DNS_LOOKUPS.inc()
        try:
            answer = await self._get_resolver().resolve(name, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            # The cache answers every type for the name now; index its answer for the warm path.
            cached = self.cache.get((dns.name.from_text(name), _ANY, dns.rdataclass.IN))
            if cached is not None:
                self._add((name, _ANY), cached, None)
            raise NoSuchDomain(name) from None
        except dns.resolver.NoNameservers as exc:
            raise self._failed((name, rdtype), _reason(exc, "no nameserver answered (SERVFAIL or REFUSED)")) from None
        except dns.exception.Timeout:
            raise self._failed((name, rdtype), "timed out") from None
        except dns.exception.DNSException as exc:
            raise self._failed((name, rdtype), _reason(exc, type(exc).__name__)) from None
        records = tuple(_plain(r) for r in answer)
        if rdtype == _TLSA:  # the AD bit first: tlsa() needs it, and it is one per answer
            records = (bool(answer.response.flags & dns.flags.AD), *records)
        if rdtype == _MX:
            records = tuple(sorted(records, key=_preference))  # once per answer: mx() draws from it
        self._add((name, rdtype), answer, records)
        return records

    def _failed(self, key: _Key, reason: str) -> DnsFailure:
        """Remember a failed lookup for `failure_ttl` seconds; the error to raise."""
        if self._failure_ttl > 0:
            if len(self._failures) >= MAX_ENTRIES:
                now = time.monotonic()
                self._failures = {k: v for k, v in self._failures.items() if v[0] > now}
                if len(self._failures) >= MAX_ENTRIES:
                    del self._failures[next(iter(self._failures))]  # the oldest
            self._failures[key] = (time.monotonic() + self._failure_ttl, reason)
        return DnsFailure(reason)


def _plain(record: Any) -> Any:
    """Plain values, converted once per answer (MxHost, or address strings), not per delivery."""
    if record.rdtype == dns.rdatatype.MX:
        return MxHost(record.preference, record.exchange.to_text(omit_final_dot=True))
    if record.rdtype == dns.rdatatype.TXT:
        return b"".join(record.strings).decode("utf-8", "replace")
    if record.rdtype == dns.rdatatype.TLSA:
        return Tlsa(record.usage, record.selector, record.mtype, record.cert)
    return record.address  # A, AAAA


def _reason(exc: dns.exception.DNSException, default: str) -> str:
    text = str(exc)
    if "SERVFAIL" in text:
        return "SERVFAIL"
    if "REFUSED" in text:
        return "REFUSED"
    return default
