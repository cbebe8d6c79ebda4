"""What relays of one configuration share: the DNS resolver and its cache, and the fleet-wide rates."""

from dataclasses import dataclass, field

from app.rates import SharedLimits
from relays.dns import DnsResolver
from schemas.config import FleetSettings, IdempotencySettings, ServiceSettings


@dataclass
class RelayContext:
    dns: DnsResolver
    #: The relays' max_message_rate limits (app/rates.py): Redis is connected only once a relay checks one.
    rates: SharedLimits = field(
        default_factory=lambda: SharedLimits(
            FleetSettings(), IdempotencySettings(), what="rate", prefix="mailrelay:rate:"
        )
    )

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> "RelayContext":
        rates = SharedLimits(settings.fleet, settings.idempotency, what="rate", prefix="mailrelay:rate:")
        return cls(dns=DnsResolver(settings.nameservers()), rates=rates)
