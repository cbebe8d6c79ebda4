"""What relays of one configuration share: the DNS resolver and its cache, the fleet's leases."""

from dataclasses import dataclass, field

from relays.dns import DnsResolver
from relays.smtp.leases import FleetLeases
from schemas.config import ServiceSettings


@dataclass
class RelayContext:
    dns: DnsResolver
    settings: ServiceSettings = field(default_factory=ServiceSettings)
    _fleet: FleetLeases | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> "RelayContext":
        return cls(dns=DnsResolver(settings.nameservers()), settings=settings)

    def fleet_leases(self, relay: str) -> FleetLeases:
        """The leases of the relays with `fleet_connections`, one set (one renewal task, one Redis
        client) for the configuration; each relay attaches, and detaches when it closes.
        Raises ConfigError naming `relay.<relay>.fleet_connections` when there is no Redis."""
        if self._fleet is None or self._fleet.closed:
            self._fleet = FleetLeases.for_relay(self.settings, relay)
        self._fleet.attach()
        return self._fleet
