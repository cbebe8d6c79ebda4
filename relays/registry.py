"""The one registry from a configuration `type` to its implementation."""

import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

from relays.base import Relay
from relays.blackhole import BlackholeRelay
from relays.context import RelayContext
from relays.custom import load_custom_relay
from relays.dkim import Signer, SigningRelay, load_identities
from relays.dovecot import DovecotRelay
from relays.http import HttpRelay
from relays.lmtp import LmtpRelay
from relays.maildrop import MaildropRelay
from relays.mx import MxRelay
from relays.pipe import PipeRelay
from relays.static import StaticRelay
from schemas.config import ConfigError, ConfigProblem, ServiceConfig
from schemas.relay_options import RelayOptions

logger = logging.getLogger(__name__)

#: (relay name, its options model, what relays share) -> a relay
RelayFactory = Callable[[str, Any, RelayContext], Relay]

RELAY_TYPES: Final[Mapping[str, RelayFactory]] = {
    "mx": MxRelay,
    "static": StaticRelay,
    "lmtp": LmtpRelay,
    "pipe": PipeRelay,
    "maildrop": MaildropRelay,
    "dovecot": DovecotRelay,
    "http": HttpRelay,
    "blackhole": BlackholeRelay,
    "custom": load_custom_relay,
}


def build_relay(name: str, options: RelayOptions, context: RelayContext) -> Relay:
    """Build one relay; may raise ConfigError (unusable TLS files or DKIM keys, a `custom` factory
    that fails). With `dkim` identities it is wrapped in a SigningRelay: every type signs alike."""
    # Keys first: a bad one then leaves no relay (with its connections) to close.
    identities = load_identities(f"relay.{name}.dkim", options.dkim) if options.dkim else None
    relay = RELAY_TYPES[options.type](name, options, context)
    return SigningRelay(relay, Signer(identities)) if identities else relay


async def open_relays(config: ServiceConfig) -> dict[str, Relay]:
    """Build every configured relay, reporting all failures at once.

    On failure the relays already built are closed before ConfigError is raised.
    """
    built: dict[str, Relay] = {}
    problems: list[ConfigProblem] = []
    context = RelayContext.from_settings(config.mailrelay)
    for name, options in config.relay.items():
        try:
            built[name] = build_relay(name, options, context)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        await close_relays(built)
        raise ConfigError(problems)
    return built


async def close_relays(relays: Mapping[str, Relay]) -> None:
    """Close every relay; one failing to close does not keep the others open."""
    for name, relay in relays.items():
        try:
            await relay.aclose()
        except Exception:
            logger.exception("closing relay %r failed", name)
