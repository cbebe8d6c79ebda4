"""The service's lifetime: what is built from the configuration, reloads, and the drain at shutdown."""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import TypedDict

from fastapi import FastAPI

from app.auth import KeyRing
from app.delivery import DeliveryCore
from app.idempotency import IdempotencyStore, close_quietly, open_store
from app.limits import Limiter
from app.logs import DeliveryLog
from app.metrics import DeliveryMetrics
from relays.base import Relay
from relays.registry import close_relays, open_relays
from schemas.config import ServiceConfig

logger = logging.getLogger("mailrelay")


@dataclass(eq=False)
class Runtime:
    """One configuration and what was built from it; replaced as a whole on reload."""

    config: ServiceConfig
    relays: Mapping[str, Relay]
    keyring: KeyRing
    limiter: Limiter
    idempotency: IdempotencyStore
    core: DeliveryCore
    active: int = 0  # deliveries running on these relays
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def build(
        cls, config: ServiceConfig, relays: Mapping[str, Relay], idempotency: IdempotencyStore | None = None
    ) -> "Runtime":
        settings = config.mailrelay
        limiter = Limiter(settings.limits, config.relay)
        store = idempotency or open_store(settings.idempotency)
        core = DeliveryCore(
            limiter,
            store,
            (DeliveryMetrics(), DeliveryLog()),
            queue_timeout=settings.limits.queue_timeout,
            retry_after=settings.retry_after,
        )
        return cls(config, relays, KeyRing(settings.auth.keys), limiter, store, core)

    def enter(self) -> None:
        self.active += 1
        self._idle.clear()

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def wait_idle(self, grace: float) -> bool:
        """True once no delivery runs here; False if some still run after `grace` seconds."""
        if self.active == 0:
            return True
        try:
            async with asyncio.timeout(grace):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True


class Services:
    """What every request sees: the current Runtime, and whether the service is draining."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime
        self.draining = False
        self._retiring: set[asyncio.Task[None]] = set()

    async def swap(self, config: ServiceConfig) -> None:
        """Build relays for `config` and switch to them; deliveries running on the old
        ones finish there, then those are closed. Raises ConfigError, leaving the old ones."""
        relays = await open_relays(config)
        old = self.current
        # The idempotency store keeps its claims and results across a reload when it is the same store.
        same_store = config.mailrelay.idempotency == old.config.mailrelay.idempotency
        try:
            self.current = Runtime.build(config, relays, old.idempotency if same_store else None)
        except BaseException:
            await close_relays(relays)
            raise
        task = asyncio.get_running_loop().create_task(self._retire(old, close_store=not same_store))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, runtime: Runtime, *, close_store: bool) -> None:
        grace = runtime.config.mailrelay.shutdown_grace
        if not await runtime.wait_idle(grace):
            logger.warning(
                "%d deliveries still running on the old configuration after %g s; closing its relays",
                runtime.active,
                grace,
                extra={"event": "config_reload"},
            )
        await close_relays(runtime.relays)
        if close_store:
            await close_quietly(runtime.idempotency)

    async def retired(self) -> None:
        """Until the relays of replaced configurations are closed."""
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    async def drain(self) -> bool:
        """Refuse new deliveries and wait (at most shutdown_grace) for the running ones."""
        self.draining = True
        grace = self.current.config.mailrelay.shutdown_grace
        return await self.current.wait_idle(grace)

    async def aclose(self) -> None:
        self.draining = True
        await self.retired()
        await close_relays(self.current.relays)
        await close_quietly(self.current.idempotency)


class State(TypedDict):
    services: Services


def make_lifespan(
    config: ServiceConfig,
    prebuilt: Mapping[str, Relay] | None = None,
    on_start: Callable[[Services], None] | None = None,
) -> Callable[[FastAPI], AbstractAsyncContextManager[State]]:
    """A lifespan that owns the relays: `prebuilt` ones (the CLI builds them to report
    factory errors before the server starts) or ones it builds itself. `on_start` gets
    the Services (the CLI wires signals to them)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        relays = prebuilt if prebuilt is not None else await open_relays(config)
        services = Services(Runtime.build(config, relays))
        if on_start is not None:
            on_start(services)
        try:
            yield {"services": services}
        finally:
            await services.aclose()

    return lifespan
