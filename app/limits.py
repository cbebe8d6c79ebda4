"""Backpressure: bounded deliveries in flight, a bounded wait for a slot, and no unbounded queue."""

import asyncio
from collections.abc import Iterable

from app.budget import ByteBudget
from schemas.config import LimitSettings


class Overloaded(Exception):
    """No slot came free in time: `what` ("the service", "relay 'x'") has `limit` deliveries in flight."""

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(f"{what} already has {limit} deliveries in flight")
        self.what = what
        self.limit = limit


class Slots:
    """At most `limit` holders; at most `max_waiting` callers wait, each for a bounded time."""

    def __init__(self, limit: int, max_waiting: int) -> None:
        self.limit = limit
        self.max_waiting = max_waiting
        self.waiting = 0
        self._semaphore = asyncio.Semaphore(limit)
        self._free = limit

    @property
    def in_use(self) -> int:
        return self.limit - self._free

    async def acquire(self, wait: float) -> bool:
        """True with a slot held; False when none came free within `wait` seconds or too many wait already."""
        if not self._semaphore.locked():
            await self._semaphore.acquire()  # free and nobody queued: returns at once
        else:
            if wait <= 0 or self.waiting >= self.max_waiting:
                return False
            self.waiting += 1
            try:
                async with asyncio.timeout(wait):
                    await self._semaphore.acquire()
            except TimeoutError:
                return False
            finally:
                self.waiting -= 1
        self._free -= 1
        return True

    def release(self) -> None:
        self._free += 1
        self._semaphore.release()


class Limiter:
    """A global bound and one per relay; a delivery needs a slot in both."""

    def __init__(self, settings: LimitSettings, relay_names: Iterable[str]) -> None:
        self.settings = settings
        # Waiters are bounded too: at most as many as may run, so memory stays bounded under any load.
        self.total = Slots(settings.max_in_flight, settings.max_in_flight)
        self.per_relay: dict[str, Slots] = {}
        # Request bodies are read before a slot is taken: their bytes are bounded on their own.
        self.bodies = ByteBudget(settings.body_budget)
        for name in relay_names:
            limit = settings.relay_limit(name)
            if limit is not None:
                self.per_relay[name] = Slots(limit, limit)

    async def acquire(self, relay: str, wait: float) -> tuple[Slots, ...]:
        """The slots `relay` needs, held (give them to `release`); or Overloaded after at
        most `wait` seconds. Plain calls, not a context manager: this runs on every delivery."""
        per_relay = self.per_relay.get(relay)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + max(0.0, wait)
        if per_relay is not None:
            if not await per_relay.acquire(give_up - loop.time()):
                raise Overloaded(f"relay {relay!r}", per_relay.limit)
            held: tuple[Slots, ...] = (per_relay, self.total)
        else:
            held = (self.total,)
        try:
            if not await self.total.acquire(give_up - loop.time()):
                raise Overloaded("the service", self.total.limit)
        except BaseException:
            if per_relay is not None:
                per_relay.release()
            raise
        return held

    @staticmethod
    def release(held: tuple[Slots, ...]) -> None:
        for slots in held:
            slots.release()
