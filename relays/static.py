"""`static`: SMTP to one host, through a pool of reused connections."""

from relays.base import DeliveryContext
from relays.context import RelayContext
from relays.rates import RelayRates
from relays.smtp.pool import SmtpPool
from relays.smtp.session import Destination, SessionSettings
from schemas.delivery import Envelope, RecipientResult
from schemas.relay_options import LmtpOptions, StaticOptions


class StaticRelay:
    """Every envelope goes to `host:port` in one transaction."""

    lmtp = False

    def __init__(self, name: str, options: StaticOptions | LmtpOptions, context: RelayContext) -> None:
        self.name = name
        settings = SessionSettings.from_options(options, name, lmtp=self.lmtp)
        destination = Destination(address=options.host, port=options.port, name=options.host)
        self._fleet = context.fleet_leases(name) if options.fleet_connections else None
        self._rates = RelayRates.for_relay(context.settings, name, options)
        self.rate = self._rates.message
        self.pool = SmtpPool(
            destination,
            settings,
            options.concurrent_connections,
            options.idle_timeout,
            max_waiting=options.max_waiting,
            metrics_destination=destination.label,  # one configured host: a bounded label
            fleet=self._fleet,
            connection_rate=self._rates.connection,
        )

    async def deliver(self, envelope: Envelope, context: DeliveryContext) -> list[RecipientResult]:
        recipients = list(envelope.recipients)
        host = self.pool.destination.label
        if self.rate is not None and (refusal := await self.rate.admit(host, context)) is not None:
            return [RecipientResult(recipient=rcpt, reply=refusal) for rcpt in recipients]
        transaction = await self.pool.deliver(envelope, recipients, context)
        return [
            RecipientResult(
                recipient=rcpt,
                reply=reply,
                host=host,
                possibly_delivered=i in transaction.in_doubt,
                security=transaction.security,
            )
            for i, (rcpt, reply) in enumerate(zip(recipients, transaction.replies, strict=True))
        ]

    async def aclose(self) -> None:
        await self.pool.aclose()
        if self._fleet is not None:
            await self._fleet.detach()
        await self._rates.aclose()
