"""A byte budget for request bodies: the bytes read and held by requests at once are bounded."""

import asyncio
from collections import deque


class ByteBudget:
    """At most `capacity` bytes taken at once; a taker that does not fit waits, first come first served.

    A request asks for more than the whole capacity only when the capacity is smaller
    than its form's limit: it is given all of it, once nobody else holds any.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free = capacity
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    def try_take(self, size: int) -> int | None:
        """The bytes taken (`size`, or the capacity if less) when they are free and nobody waits; else None."""
        if size > self.capacity:
            size = self.capacity
        if size <= self.free and not self._waiting:
            self.free -= size
            return size
        return None

    async def take(self, size: int, give_up_at: float) -> int | None:
        """The bytes taken, waiting until loop time `give_up_at` at most; None when they did not come free."""
        taken = self.try_take(size)
        if taken is not None:
            return taken
        size = min(size, self.capacity)
        loop = asyncio.get_running_loop()
        if give_up_at <= loop.time():
            return None
        granted: asyncio.Future[None] = loop.create_future()
        entry = (size, granted)
        self._waiting.append(entry)
        try:
            async with asyncio.timeout_at(give_up_at):
                await granted
        except TimeoutError:
            if granted.done() and not granted.cancelled():
                return size  # granted as the wait ran out: keep it
            self._leave(entry)
            return None
        except BaseException:
            if granted.done() and not granted.cancelled():
                self.give(size)
            else:
                self._leave(entry)
            raise
        return size

    def give(self, size: int) -> None:
        self.free += size
        if self._waiting:
            self._wake()

    def _leave(self, entry: tuple[int, "asyncio.Future[None]"]) -> None:
        if entry in self._waiting:
            self._waiting.remove(entry)
        self._wake()  # a large waiter leaving may let smaller ones behind it in

    def _wake(self) -> None:
        while self._waiting and self._waiting[0][0] <= self.free:
            size, granted = self._waiting.popleft()
            if not granted.done():  # a waiter cancelled a moment ago takes nothing
                self.free -= size
                granted.set_result(None)


class Holding:
    """What one request holds of a budget; `release()` gives it all back (at the end of the request)."""

    __slots__ = ("budget", "held")

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.held = 0

    def release(self) -> None:
        if self.held:
            self.budget.give(self.held)
            self.held = 0
