"""Connections to one destination: bounded, reused while fresh, closed with QUIT when idle."""

import asyncio
import time
from collections.abc import Callable

from relays.base import RelayError
from relays.smtp.session import Destination, SessionSettings, SmtpSession, StaleSessionError, Transaction
from schemas.delivery import Envelope

#: Like Postfix's smtp_connection_reuse_time_limit: a connection is not reused past this age.
MAX_CONNECTION_AGE = 300.0


class SmtpPool:
    """At most `size` connections to `destination`, open or idle; further deliveries wait.

    An idle connection is kept `idle_timeout` seconds, then closed with QUIT.
    A connection that failed, timed out, or got a 421 is closed, never reused.
    """

    def __init__(
        self,
        destination: Destination,
        settings: SessionSettings,
        size: int,
        idle_timeout: float,
        session_factory: Callable[[Destination, SessionSettings], SmtpSession] = SmtpSession,
    ) -> None:
        self.destination = destination
        self.settings = settings
        self.idle_timeout = idle_timeout
        self._limit = asyncio.Semaphore(size)
        self._idle: list[SmtpSession] = []
        self._expiry: dict[SmtpSession, asyncio.TimerHandle] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._session_factory = session_factory
        self._closed = False

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def deliver(self, envelope: Envelope, recipients: list[str]) -> Transaction:
        """One transaction on a pooled connection. A reused connection found dead
        before anything was sent is replaced once, so a stale socket never fails a delivery."""
        async with self._limit:
            session = self._take_idle()
            for _ in range(2):
                if session is None:
                    session = self._session_factory(self.destination, self.settings)
                    try:
                        await session.open()
                    except RelayError as exc:
                        session.close()
                        return Transaction([exc.reply] * len(recipients), False)
                    except BaseException:  # cancelled (a deadline): never leave the socket open
                        session.close()
                        raise
                try:
                    transaction = await session.transaction(envelope, recipients)
                except StaleSessionError:
                    session.close()
                    session = None
                    continue
                except BaseException:
                    session.close()
                    raise
                self._release(session)
                return transaction
        raise AssertionError("unreachable: a fresh connection never raises StaleSessionError")

    def _take_idle(self) -> SmtpSession | None:
        now = time.monotonic()
        while self._idle:
            session = self._idle.pop()
            self._expiry.pop(session).cancel()
            if session.usable and now - session.created < MAX_CONNECTION_AGE:
                return session
            self._quit_later(session)
        return None

    def _release(self, session: SmtpSession) -> None:
        fresh = time.monotonic() - session.created < MAX_CONNECTION_AGE
        if self._closed or not session.usable or not fresh or self.idle_timeout <= 0:
            self._quit_later(session)
            return
        self._idle.append(session)
        loop = asyncio.get_running_loop()
        self._expiry[session] = loop.call_later(self.idle_timeout, self._expire, session)

    def _expire(self, session: SmtpSession) -> None:
        if session in self._expiry:
            del self._expiry[session]
            self._idle.remove(session)
            self._quit_later(session)

    def _quit_later(self, session: SmtpSession) -> None:
        if not session.usable:
            session.close()
            return
        task = asyncio.get_running_loop().create_task(session.quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """QUIT every idle connection and wait for the QUITs under way."""
        self._closed = True
        for handle in self._expiry.values():
            handle.cancel()
        self._expiry.clear()
        idle, self._idle = self._idle, []
        for session in idle:
            self._quit_later(session)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
