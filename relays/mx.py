"""`mx`: SMTP to each recipient domain's mail exchangers, found in DNS."""

import asyncio
import ipaddress
from collections.abc import Sequence
from typing import NamedTuple

from relays import replies
from relays.base import DeliveryContext, PermanentRelayError, RelayError, TransientRelayError
from relays.context import RelayContext
from relays.dns import DnsFailure, NoSuchDomain
from relays.smtp.pool import SmtpPool
from relays.smtp.session import Destination, SessionSettings, Transaction
from schemas.delivery import Envelope, RecipientResult, domain_of
from schemas.relay_options import MxOptions, split_host_port
from schemas.reply import Reply

#: Addresses tried for one domain within one delivery (RFC 5321 asks for at least two).
MAX_ATTEMPTS = 5
#: Pools kept before the empty ones are dropped.
_PRUNE_AT = 256


class _Route(NamedTuple):
    """Where a domain's mail goes: host names (or addresses) in order, and whether they need DNS."""

    hosts: list[str]
    port: int
    resolve: bool
    implicit: bool = False  # no MX record: the domain's own address


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
        self._pools: dict[Destination, SmtpPool] = {}

    async def deliver(self, envelope: Envelope, context: DeliveryContext) -> list[RecipientResult]:
        results: list[RecipientResult | None] = [None] * len(envelope.recipients)
        groups: dict[str, list[int]] = {}
        for i, rcpt in enumerate(envelope.recipients):
            domain = domain_of(rcpt)
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
        recipients = [envelope.recipients[i] for i in indexes]
        transaction: Transaction | None = None
        destination: Destination | None = None
        try:
            route = await self._route(domain)
            attempts = 0
            failure: Reply | None = None
            # Hosts in order, each one's addresses looked up only when the ones before failed:
            # backups cost nothing while the first answers.
            for name in route.hosts:
                try:
                    addresses = (
                        await self.dns.addresses(name, ipv4_only=self.options.ipv4_only) if route.resolve else [name]
                    )
                except DnsFailure as exc:
                    failure = replies.dns_failure(name, str(exc))
                    continue
                for address in addresses:
                    destination = Destination(address, route.port, name)
                    transaction = await self._pool(destination).deliver(envelope, recipients, context)
                    attempts += 1
                    if transaction.data_sent or not all(r.is_transient for r in transaction.replies):
                        break
                    if attempts >= MAX_ATTEMPTS:
                        break
                else:
                    continue
                break
            if transaction is None:
                if failure is not None:
                    raise TransientRelayError(failure)
                if route.implicit:
                    raise PermanentRelayError(replies.no_mail_host(domain, self.options.ipv4_only))
                raise TransientRelayError(replies.dns_failure(domain, "no MX host has an address"))
        except RelayError as exc:
            if transaction is None:
                for i in indexes:
                    results[i] = RecipientResult(recipient=envelope.recipients[i], reply=exc.reply)
                return
        # Either a transaction was made or the RelayError above returned.
        assert transaction is not None  # noqa: S101
        assert destination is not None  # noqa: S101
        for n, (i, reply) in enumerate(zip(indexes, transaction.replies, strict=True)):
            results[i] = RecipientResult(
                recipient=envelope.recipients[i],
                reply=reply,
                host=destination.label,
                possibly_delivered=n in transaction.in_doubt,
            )

    async def _route(self, domain: str) -> "_Route":
        """The hosts to try for `domain`, in order. Raises RelayError when there are none."""
        port = self.options.port
        if domain.startswith("[") and domain.endswith("]"):
            literal = domain[1:-1].removeprefix("IPv6:").removeprefix("ipv6:")
            try:
                ipaddress.ip_address(literal)
            except ValueError:
                raise PermanentRelayError(replies.no_such_domain(domain)) from None
            return _Route([literal], port, resolve=False)
        if forced := self.options.force_mx.get(domain):
            host, forced_port = split_host_port(forced, port)
            return _Route([host], forced_port, resolve=False)
        try:
            exchangers = await self.dns.mx(domain)
        except NoSuchDomain:
            raise PermanentRelayError(replies.no_such_domain(domain)) from None
        except DnsFailure as exc:
            raise TransientRelayError(replies.dns_failure(domain, str(exc))) from None
        if exchangers == []:
            raise PermanentRelayError(replies.null_mx(domain))
        if exchangers is None:  # no MX: the domain itself (RFC 5321 5.1)
            return _Route([domain], port, resolve=True, implicit=True)
        return _Route([mx.name for mx in exchangers], port, resolve=True)

    def _pool(self, destination: Destination) -> SmtpPool:
        pool = self._pools.get(destination)
        if pool is None:
            if len(self._pools) >= _PRUNE_AT:
                # A pool with no connection left costs nothing to make again.
                self._pools = {d: p for d, p in self._pools.items() if p.open_count > 0}
            pool = SmtpPool(destination, self.settings, self.options.concurrent_connections, self.options.idle_timeout)
            self._pools[destination] = pool
        return pool

    async def aclose(self) -> None:
        await asyncio.gather(*(pool.aclose() for pool in self._pools.values()))
