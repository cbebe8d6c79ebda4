"""The whole service configuration: slimta's `relay:` section plus our own settings."""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from schemas.relay_options import HostPort, RelayOptions, split_host_port

#: Relay names appear in URLs (/relays/<name>/deliver): unreserved URL characters only.
RelayName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._~-]{0,127}$")]


class ServiceSettings(BaseModel):
    """The `mailrelay:` section: settings of the service itself (slimta has no such section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_recipients: int = Field(
        default=100,
        ge=1,
        le=100_000,
        description="most recipients in one delivery request",
    )
    max_message_size: int = Field(
        default=25 * 1024 * 1024,
        ge=1,
        description="largest message in bytes; larger requests get 413",
    )
    retry_after: int = Field(
        default=60,
        ge=0,
        description="seconds put in Retry-After on a transient failure (503)",
    )
    dns_nameservers: list[HostPort] | None = Field(
        default=None,
        description="`host` or `host:port` of the nameservers the `mx` relay asks; default: the system's "
        "(/etc/resolv.conf). $MAILRELAY_DNS_NAMESERVERS (comma-separated) overrides this.",
    )

    def nameservers(self) -> list[tuple[str, int]]:
        return [split_host_port(ns, 53) for ns in self.dns_nameservers or []]


class ServiceConfig(BaseModel):
    """A loaded configuration file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    relay: dict[RelayName, RelayOptions] = Field(min_length=1)
    mailrelay: ServiceSettings = Field(default_factory=ServiceSettings)


class ConfigProblem(BaseModel):
    """One thing wrong with a configuration, at a key path such as `relay.outbound.port`."""

    model_config = ConfigDict(frozen=True)

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """A configuration that cannot be used; carries every problem found, not just the first."""

    def __init__(self, problems: list[ConfigProblem], warnings: list[ConfigProblem] | None = None) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems
        self.warnings = warnings or []

    @classmethod
    def at(cls, path: str, message: str) -> "ConfigError":
        return cls([ConfigProblem(path=path, message=message)])


def format_path(loc: list[int | str]) -> str:
    """slimta's key-path style: `relay.outbound.args[0]`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
