"""What relays of one configuration share: the DNS resolver and its cache."""

from dataclasses import dataclass

from relays.dns import DnsResolver
from schemas.config import ServiceSettings


@dataclass
class RelayContext:
    dns: DnsResolver

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> "RelayContext":
        return cls(dns=DnsResolver(settings.nameservers()))
