"""The relays' lifetime: built at start-up, closed at shutdown."""

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TypedDict

from fastapi import FastAPI

from app.auth import KeyRing
from app.idempotency import IdempotencyStore, close_quietly, open_store
from app.limits import Limiter
from relays.base import Relay
from relays.registry import close_relays, open_relays
from schemas.config import ServiceConfig


@dataclass
class Runtime:
    """What every request sees: the configuration and what was built from it."""

    config: ServiceConfig
    relays: Mapping[str, Relay]
    keyring: KeyRing
    limiter: Limiter
    idempotency: IdempotencyStore
    draining: bool = False

    @classmethod
    def build(cls, config: ServiceConfig, relays: Mapping[str, Relay]) -> "Runtime":
        return cls(
            config=config,
            relays=relays,
            keyring=KeyRing(config.mailrelay.auth.keys),
            limiter=Limiter(config.mailrelay.limits, config.relay),
            idempotency=open_store(config.mailrelay.idempotency),
        )


class State(TypedDict):
    runtime: Runtime


def make_lifespan(
    config: ServiceConfig, prebuilt: Mapping[str, Relay] | None = None
) -> Callable[[FastAPI], AbstractAsyncContextManager[State]]:
    """A lifespan that owns the relays: `prebuilt` ones (the CLI builds them to report
    factory errors before the server starts) or ones it builds itself."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        relays = prebuilt if prebuilt is not None else await open_relays(config)
        runtime = Runtime.build(config, relays)
        try:
            yield {"runtime": runtime}
        finally:
            runtime.draining = True
            await close_relays(relays)
            await close_quietly(runtime.idempotency)

    return lifespan
