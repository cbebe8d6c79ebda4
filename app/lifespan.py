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
        """True once no delivery runs here, those finishing in the background after a deadline cut
        included (their relays must stay open); False if some still run after `grace` seconds."""
        try:
            async with asyncio.timeout(grace):
                if self.active:
                    await self._idle.wait()
                while self.core.finishing:
                    await asyncio.wait(list(self.core.finishing))
        except TimeoutError:
            return False
        return True


class Services:
    """What every request sees: the current Runtime, and where the service is in its shutdown.

    `ready` turns False at SIGTERM (/readyz 503) while deliveries are still served; `draining`
    turns True `drain_delay` later, when new deliveries are refused.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime
        self.ready = True
        self.draining = False
        self._retiring: set[asyncio.Task[None]] = set()
        #: Replaced configurations whose deliveries may still run (a reload shortly before a shutdown).
        self._replaced: set[Runtime] = set()

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
        self._replaced.add(old)
        task = asyncio.get_running_loop().create_task(self._retire(old, close_store=not same_store))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, runtime: Runtime, *, close_store: bool) -> None:
        grace = runtime.config.mailrelay.shutdown_grace
        try:
            if not await runtime.wait_idle(grace):
                logger.warning(
                    "%d deliveries still running on the old configuration after %g s; closing its relays",
                    runtime.active,
                    grace,
                    extra={"event": "config_reload"},
                )
        finally:
            self._replaced.discard(runtime)
        await close_relays(runtime.relays)
        await runtime.keyring.aclose()  # its quota client, if it made one
        if close_store:
            await close_quietly(runtime.idempotency)

    async def retired(self) -> None:
        """Until the relays of replaced configurations are closed."""
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    @property
    def active(self) -> int:
        """Requests for deliveries under way, on every configuration (reading a body counts)."""
        return self.current.active + sum(runtime.active for runtime in self._replaced)

    @property
    def finishing(self) -> int:
        """Keyed deliveries finishing in the background after a deadline cut, on every configuration."""
        return sum(len(runtime.core.finishing) for runtime in (self.current, *self._replaced))

    async def wait_idle(self, seconds: float, interrupt: asyncio.Event | None = None) -> bool:
        """True once no delivery runs on any configuration, those finishing in the background
        included (they store their true outcome; the relays and the store close after this); False
        after `seconds`, or as soon as `interrupt` is set. Polls: it runs once, at shutdown, and a
        reload may add a runtime."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while self.active or self.finishing:
            left = end - loop.time()
            if left <= 0 or (interrupt is not None and interrupt.is_set()):
                return False
            await asyncio.sleep(min(0.05, left))
        return True

    def cut_running(self) -> int:
        """End every delivery running on any configuration now, each answered like a deadline cut
        (DeliveryCore.cut_running). Returns how many were cut."""
        return sum(runtime.core.cut_running() for runtime in (self.current, *self._replaced))

    async def aclose(self) -> None:
        self.draining = True
        # uvicorn gets here once no connection is left, without waiting for the drain: deliveries
        # finishing in the background keep their relays and the store until they have stored their
        # outcome, at most shutdown_grace (the drain cuts them at the end of its own grace anyway).
        if self.finishing and not await self.wait_idle(self.current.config.mailrelay.shutdown_grace):
            self.cut_running()
            tasks = [task for runtime in (self.current, *self._replaced) for task in runtime.core.finishing]
            if tasks:
                await asyncio.wait(tasks, timeout=1.0)  # cancelled: only their unwinding is left
        await self.retired()
        await close_relays(self.current.relays)
        await self.current.keyring.aclose()
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
