"""The one registry from a configuration `type` to its implementation."""

import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

from relays._unavailable import UnavailableRelay
from relays.base import Relay
from relays.blackhole import BlackholeRelay
from relays.custom import load_custom_relay
from schemas.config import ConfigError, ConfigProblem
from schemas.relay_options import RelayOptions

logger = logging.getLogger(__name__)

#: (relay name, its options model) -> a relay
RelayFactory = Callable[[str, Any], Relay]

RELAY_TYPES: Final[Mapping[str, RelayFactory]] = {
    "mx": UnavailableRelay,
    "static": UnavailableRelay,
    "lmtp": UnavailableRelay,
    "pipe": UnavailableRelay,
    "maildrop": UnavailableRelay,
    "dovecot": UnavailableRelay,
    "http": UnavailableRelay,
    "blackhole": BlackholeRelay,
    "custom": load_custom_relay,
}


def build_relay(name: str, options: RelayOptions) -> Relay:
    """Build one relay; may raise ConfigError (a `custom` factory that fails)."""
    return RELAY_TYPES[options.type](name, options)


async def open_relays(relays: Mapping[str, RelayOptions]) -> dict[str, Relay]:
    """Build every configured relay, reporting all failures at once.

    On failure the relays already built are closed before ConfigError is raised.
    """
    built: dict[str, Relay] = {}
    problems: list[ConfigProblem] = []
    for name, options in relays.items():
        try:
            built[name] = build_relay(name, options)
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
