"""`mx`: SMTP to each recipient domain's mail exchangers, found in DNS."""

import asyncio
import dataclasses
import functools
import ipaddress
import logging
import operator
from collections.abc import Iterable, Sequence
from typing import Self, TypeVar

from relays import replies
from relays.base import DeliveryContext, PermanentRelayError, RelayError, TransientRelayError
from relays.context import RelayContext
from relays.dane import DaneHost, usable
from relays.dns import DnsFailure, DnsResolver, NoSuchDomain
from relays.instruments import MTA_STS_CHECKS
from relays.mta_sts import MtaSts, Policy
from relays.rates import RelayRates
from relays.smtp.pool import SmtpPool
from relays.smtp.session import Destination, SessionSettings, Transaction
from schemas.delivery import Envelope, RecipientResult, domain_of
from schemas.relay_options import MxOptions, normal_domain, split_host_port
from schemas.reply import Reply

#: Addresses tried, and MX hosts looked up, for one domain within one delivery: the default of
#: the `mx_address_limit` option (RFC 5321 asks for at least two; Postfix's smtp_mx_address_limit is 5).
MAX_ATTEMPTS = 5
#: Pools kept before the empty ones are dropped.
_PRUNE_AT = 256

logger = logging.getLogger(__name__)
_K = TypeVar("_K", Destination, tuple[Destination, DaneHost])

_host_name = operator.attrgetter("name")


@functools.lru_cache(maxsize=4096)
def is_private(address: str) -> bool:
    """Whether `address` is no place for mail from outside: loopback, private, link-local,
    unique-local, unspecified, shared, reserved or multicast, IPv4-mapped forms included.
    Cached: resolved addresses repeat, and parsing one costs a microsecond."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 reaches 127.0.0.1
    return not ip.is_global or ip.is_multicast or ip.is_reserved


class _Candidates:
    """Where a domain's mail goes: the addresses to try, in order, at most `limit` of them,
    from at most `limit` hosts (a host whose lookup failed counts, so a zone of a thousand
    broken MX hosts costs a handful of queries, not two thousand).

    A host's addresses are looked up only when every address before them was
    tried: backups cost nothing while the first answers. A host whose lookup
    failed is skipped, its failure kept as the reply should nothing else work.
    Without `dns`, the hosts are addresses already (an address literal, force_mx).
    With `refuse_private`, a resolved address that `is_private` is skipped (not
    an attempt), and refused as the reply should nothing else work.

    An async iterator, not an async generator: nothing to close when the first
    address answers, the usual case. MxRelay.deliver on a stub pool and DNS
    (timeit): 7.71 us, as with the nested loops it replaced (7.65 us); an async
    generator under aclosing() cost 0.9 us more per domain.
    """

    __slots__ = (
        "_addresses",
        "_dns",
        "_hosts",
        "_hosts_left",
        "_implicit",
        "_ipv4_only",
        "_limit",
        "_name",
        "_port",
        "_refuse_private",
        "attempts",
        "failure",
        "refused",
    )

    def __init__(
        self,
        hosts: Iterable[str],
        port: int,
        dns: DnsResolver | None,
        ipv4_only: bool,
        limit: int = MAX_ATTEMPTS,
        refuse_private: bool = False,
        implicit: bool = False,
    ) -> None:
        self._hosts = iter(hosts)
        self._hosts_left = limit  # a counter, not islice(): 0.1 us less per delivery
        self._port = port
        self._dns = dns
        self._ipv4_only = ipv4_only
        self._limit = limit
        self._refuse_private = refuse_private
        self._implicit = implicit  # no MX record: the domain's own address
        self._name = ""
        self._addresses: list[str] = []  # the current host's untried addresses, the next one last
        self.attempts = 0
        self.failure: Reply | None = None  # the last host lookup that failed
        self.refused: Reply | None = None  # the last private address skipped

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Destination:
        while self.attempts < self._limit:
            while not self._addresses:
                name = next(self._hosts, None) if self._hosts_left else None
                if name is None:
                    raise StopAsyncIteration
                self._hosts_left -= 1
                if self._dns is None:
                    self._name, self._addresses = name, [name]
                    break
                try:
                    found = await self._dns.addresses(name, ipv4_only=self._ipv4_only)
                except DnsFailure as exc:
                    self.failure = replies.dns_failure(name, str(exc))
                    continue
                self._name, self._addresses = name, found[::-1]
            address = self._addresses.pop()
            if self._refuse_private and is_private(address):  # checked only for the addresses tried
                self.refused = replies.private_destination(f"{self._name} ({address})")
                continue
            self.attempts += 1
            return Destination(address, self._port, self._name)
        raise StopAsyncIteration

    def nowhere(self, domain: str) -> Reply:
        """The reply when there was no address to try."""
        if self.failure is not None:
            return self.failure
        if self.refused is not None:
            return self.refused
        if self._implicit:
            return replies.no_mail_host(domain, self._ipv4_only)
        return replies.dns_failure(domain, "no MX host has an address")


def _tls_refusal(reply: Reply) -> bool:
    """A host that could not be secured: no STARTTLS for a require_tls/policy connection (5.7.10),
    or a TLS failure (4.7.5; a certificate that did not verify among them)."""
    return reply.enhanced_status in ("5.7.10", "4.7.5")


def _try_next(reply: Reply) -> bool:
    """Whether the next MX host may do better: a transient failure, or a host a require_tls
    delivery could not secure (550 5.7.10: another MX may offer verified TLS)."""
    return reply.is_transient or reply.enhanced_status == "5.7.10"


class MxRelay:
    """Groups recipients by domain; each group is one transaction, the groups run concurrently.

    Within a delivery, a connection failure, a timeout or a 4xx before the
    message data moves on to the next exchanger; a 5xx, or anything after the
    data went out, is final.
    """

    def __init__(self, name: str, options: MxOptions, context: RelayContext) -> None:
        self.name = name
        self.options = options
        self.dns = context.dns
        self.settings = SessionSettings.from_options(options, name, lmtp=False)
        self._limit = options.mx_address_limit
        self._refuse_private = not options.allow_internal_destinations
        self._fleet = context.fleet_leases(name) if options.fleet_connections else None
        self._pools: dict[Destination, SmtpPool] = {}
        self._verified_pools: dict[Destination, SmtpPool] = {}
        self._dane_pools: dict[tuple[Destination, DaneHost], SmtpPool] = {}
        self._dane_settings: dict[DaneHost, SessionSettings] = {}
        self._rates = RelayRates.for_relay(context.settings, name, options)
        self._rate = self._rates.message
        self._verified_settings = self.settings.verified(options.tls, name)
        # The policy fetch trusts what the verified connections trust (tls.ca_certs, else the system's).
        trust = self._verified_settings.tls_context
        self._mta_sts = (
            MtaSts(self.dns, trust, ipv4_only=options.ipv4_only, refuse=is_private if self._refuse_private else None)
            if options.mta_sts and trust is not None
            else None
        )

    async def deliver(self, envelope: Envelope, context: DeliveryContext) -> list[RecipientResult]:
        results: list[RecipientResult | None] = [None] * len(envelope.recipients)
        groups: dict[str, list[int]] = {}
        for i, rcpt in enumerate(envelope.recipients):
            domain = domain_of(rcpt)
            if domain and domain[-1] == ".":  # `example.org.` is example.org, for force_mx and DNS alike
                domain = normal_domain(domain)  # (RCPT drops the dot: relays/smtp/session.py)
            if domain:
                groups.setdefault(domain, []).append(i)
            else:
                results[i] = RecipientResult(recipient=rcpt, reply=replies.no_domain())
        if len(groups) == 1:  # the usual case: no task to start and schedule
            ((domain, indexes),) = groups.items()
            await self._deliver_domain(envelope, domain, indexes, results, context)
        elif groups:
            async with asyncio.TaskGroup() as group:
                for domain, indexes in groups.items():
                    group.create_task(self._deliver_domain(envelope, domain, indexes, results, context))
        return [r for r in results if r is not None]

    async def _deliver_domain(
        self,
        envelope: Envelope,
        domain: str,
        indexes: Sequence[int],
        results: list[RecipientResult | None],
        context: DeliveryContext,
    ) -> None:
        try:
            candidates = await self._candidates(domain)
        except RelayError as exc:
            for i in indexes:
                results[i] = RecipientResult(recipient=envelope.recipients[i], reply=exc.reply)
            return
        recipients = [envelope.recipients[i] for i in indexes]
        policy = await self._policy(domain)
        enforce = policy is not None and policy.mode == "enforce"
        last: tuple[Destination, Transaction] | None = None
        skipped: list[str] = []
        async for destination in candidates:
            dane = await self._dane(destination) if self.options.dane else None
            if isinstance(dane, Reply):  # the TLSA lookup failed: this host is deferred
                last = destination, Transaction([dane] * len(recipients), False)
                continue
            if dane is not None:  # DANE takes precedence over MTA-STS (RFC 8461 2)
                transaction = await self._send(
                    self._dane_pool(destination, dane), destination, envelope, recipients, context
                )
                last = destination, transaction
                if transaction.data_sent or not all(_try_next(r) for r in transaction.replies):
                    break
                continue
            if policy is not None and not policy.matches(destination.name):
                self._checked(policy, "no_match", destination.name)
                if enforce:
                    skipped.append(destination.name)  # RFC 8461 4.1: only the hosts the policy names
                    continue
            transaction = await self._transaction(envelope, recipients, context, destination, policy)
            last = destination, transaction
            if transaction.data_sent or not all(_try_next(r) for r in transaction.replies):
                break  # final: a 5xx, a delivery, or data that went out (never sent twice)
        if last is None:
            reply = replies.mta_sts_no_match(domain, skipped) if skipped else candidates.nowhere(domain)
            for i in indexes:
                results[i] = RecipientResult(recipient=envelope.recipients[i], reply=reply)
            return
        destination, transaction = last
        for n, (i, reply) in enumerate(zip(indexes, transaction.replies, strict=True)):
            results[i] = RecipientResult(
                recipient=envelope.recipients[i],
                reply=reply,
                host=destination.label,
                possibly_delivered=n in transaction.in_doubt,
                security=transaction.security,
            )

    async def _policy(self, domain: str) -> Policy | None:
        """The domain's MTA-STS policy in enforce or testing mode; None without one (or with
        `mta_sts: false`). Domains given by force_mx or as address literals have none."""
        if self._mta_sts is None or domain in self.options.force_mx or domain.startswith("["):
            return None
        policy = await self._mta_sts.policy(domain)
        return policy if policy is not None and policy.mode != "none" else None

    async def _transaction(
        self,
        envelope: Envelope,
        recipients: list[str],
        context: DeliveryContext,
        destination: Destination,
        policy: Policy | None,
    ) -> Transaction:
        """One host's transaction, over verified TLS when require_tls or the domain's MTA-STS policy
        asks for it. In testing mode a host whose TLS does not verify is used as usual, and counted."""
        if not (envelope.require_tls or policy is not None):
            return await self._send(self._pool(destination), destination, envelope, recipients, context)
        transaction = await self._send(self._verified_pool(destination), destination, envelope, recipients, context)
        if policy is None:
            return transaction
        unsecured = not transaction.data_sent and any(_tls_refusal(r) for r in transaction.replies)
        self._checked(policy, "tls_failed" if unsecured else "ok", destination.name)
        if policy.mode == "testing":
            if unsecured and not envelope.require_tls:
                return await self._send(self._pool(destination), destination, envelope, recipients, context)
            return transaction
        security = transaction.security
        if security is not None and security.authenticated == "ca":
            security = security.model_copy(update={"authenticated": "mta-sts"})
        answers = transaction.replies
        if not envelope.require_tls:  # no verified TLS: deferred under the policy (RFC 8461 5), never permanent
            answers = [
                replies.mta_sts_tls_failed(policy.domain, r.message) if r.enhanced_status == "5.7.10" else r
                for r in answers
            ]
        return dataclasses.replace(transaction, replies=answers, security=security)

    def _checked(self, policy: Policy, result: str, host: str) -> None:
        MTA_STS_CHECKS.labels(self.name, policy.mode, result).inc()
        if result != "ok" and policy.mode == "testing":  # what enforce would have refused (TLSRPT's idea)
            logger.warning(
                "MTA-STS (testing) of %s: %s for MX host %s; delivered as usual",
                policy.domain,
                result,
                host,
                extra={"event": "mta_sts_testing", "domain": policy.domain, "host": host, "result": result},
            )

    async def _candidates(self, domain: str) -> _Candidates:
        """Where to try `domain`'s mail. Raises RelayError when DNS says there is nowhere."""
        options = self.options
        port = options.port
        if domain.startswith("[") and domain.endswith("]"):
            literal = domain[1:-1].removeprefix("IPv6:").removeprefix("ipv6:")
            try:
                private = is_private(literal)
            except ValueError:
                raise PermanentRelayError(replies.no_such_domain(domain)) from None
            if private and not options.allow_internal_destinations:
                raise PermanentRelayError(replies.private_destination(domain))
            return _Candidates((literal,), port, None, options.ipv4_only)
        if forced := options.force_mx.get(domain):  # the operator's choice: private or not
            host, forced_port = split_host_port(forced, port)
            return _Candidates((host,), forced_port, None, options.ipv4_only)
        try:
            exchangers = await self.dns.mx(domain, self._limit)
        except NoSuchDomain:
            raise PermanentRelayError(replies.no_such_domain(domain)) from None
        except DnsFailure as exc:
            raise TransientRelayError(replies.dns_failure(domain, str(exc))) from None
        if exchangers == []:
            raise PermanentRelayError(replies.null_mx(domain))
        if exchangers is None:  # no MX: the domain itself (RFC 5321 5.1)
            return _Candidates((domain,), port, self.dns, options.ipv4_only, self._limit, self._refuse_private, True)
        # map(): the names are read one by one, as far as the attempts go; no list per delivery.
        return _Candidates(
            map(_host_name, exchangers), port, self.dns, options.ipv4_only, self._limit, self._refuse_private
        )

    async def _send(
        self,
        pool: SmtpPool,
        destination: Destination,
        envelope: Envelope,
        recipients: list[str],
        context: DeliveryContext,
    ) -> Transaction:
        """The pool's transaction, after this MX host's max_message_rate let it go (a refusal is
        transient: the next MX host, with a rate of its own, may take it)."""
        if self._rate is not None and (refusal := await self._rate.admit(destination.name, context)) is not None:
            return Transaction([refusal] * len(recipients), False)
        return await pool.deliver(envelope, recipients, context)

    def _pool(self, destination: Destination) -> SmtpPool:
        return self._pool_in(self._pools, destination, destination, self.settings)

    async def _dane(self, destination: Destination) -> DaneHost | Reply | None:
        """The MX host's DNSSEC-validated TLSA records; None when it has none (or they are not
        validated: no DANE); a reply when the lookup failed (RFC 7672 2.2: the host is deferred)."""
        name = f"_{destination.port}._tcp.{destination.name}"
        try:
            secure, records = await self.dns.tlsa(name)
        except DnsFailure as exc:
            return replies.dane_lookup_failed(name, str(exc))
        if not secure or not records:
            return None
        return DaneHost(destination.name, usable(records))

    def _dane_pool(self, destination: Destination, dane: DaneHost) -> SmtpPool:
        """Connections checked against these TLSA records: a pool per host and record set."""
        settings = self._dane_settings.get(dane)
        if settings is None:
            if len(self._dane_settings) >= _PRUNE_AT:
                self._dane_settings.clear()
            settings = self._dane_settings[dane] = self.settings.with_dane(dane, self.options.tls, self.name)
        return self._pool_in(self._dane_pools, (destination, dane), destination, settings)

    def _verified_pool(self, destination: Destination) -> SmtpPool:
        """The pool of connections that verified the server (require_tls deliveries): never shared
        with the opportunistic ones, whose certificate nobody checked."""
        return self._pool_in(self._verified_pools, destination, destination, self._verified_settings)

    def _pool_in(
        self, pools: dict[_K, SmtpPool], key: _K, destination: Destination, settings: SessionSettings
    ) -> SmtpPool:
        pool = pools.get(key)
        if pool is None:
            if len(pools) >= _PRUNE_AT:
                # A pool with no connection left costs nothing to make again.
                for stale in [d for d, p in pools.items() if p.open_count == 0]:
                    del pools[stale]
            pool = SmtpPool(
                destination,
                settings,
                self.options.concurrent_connections,
                self.options.idle_timeout,
                max_waiting=self.options.max_waiting,
                fleet=self._fleet,
                # Per MX host like max_message_rate: its addresses' and TLS variants' pools share one rate.
                connection_rate=self._rates.connection,
                rate_target=destination.name,
            )
            pools[key] = pool
        return pool

    async def aclose(self) -> None:
        pools = [*self._pools.values(), *self._verified_pools.values(), *self._dane_pools.values()]
        await asyncio.gather(*(pool.aclose() for pool in pools))
        if self._fleet is not None:
            await self._fleet.detach()
        await self._rates.aclose()
        if self._mta_sts is not None:
            await self._mta_sts.aclose()
