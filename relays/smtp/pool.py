"""Connections to one destination: bounded, reused while fresh, closed with QUIT when idle."""

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from relays import replies
from relays.base import DeliveryContext, RelayError
from relays.instruments import FLEET_LEASE_WAIT, SMTP_CONNECTIONS, SMTP_OPENED, SMTP_REUSED
from relays.rates import RelayRate
from relays.smtp.leases import LEASE_IDLE, POLL_EVERY, FleetLeases, LeaseGate
from relays.smtp.session import Destination, SessionSettings, SmtpSession, StaleSessionError, Transaction
from schemas.delivery import Envelope, HopSecurity
from schemas.reply import Reply

#: Like Postfix's smtp_connection_reuse_time_limit: a connection is not reused past this age.
MAX_CONNECTION_AGE = 300.0
#: The default of the `max_waiting` option (schemas.relay_options.SmtpOptions).
MAX_WAITING = 100
#: The `destination` label of a pool's metrics unless its relay names one: mx's destinations
#: are recipients' mail hosts, a series per host would grow without bound and name them.
ANY_DESTINATION = "*"


class _TooManyWaiting(Exception):
    pass


class SmtpPool:
    """At most `size` connections to `destination` open at once, counting those in
    use, idle, and still saying QUIT; further deliveries wait for one.

    An idle connection is kept `idle_timeout` seconds, then closed with QUIT.
    A connection that failed, timed out, or got a 421 is closed, never reused.
    At most `max_waiting` deliveries wait for a connection; one more fails at once
    (451 4.4.5): each waiting delivery holds an in-flight slot of the service, and a
    slow destination must not take them all from the other relays and destinations.
    Metrics are labelled `metrics_destination`: a fixed set, never a recipient's host.

    With `fleet` (the relay's `fleet_connections`), `size` is the fleet's limit: each open
    connection also holds a lease in Redis (relays.smtp.leases). A delivery that finds none
    waits like one that finds every connection busy (within `max_waiting` and its deadline),
    asking again every POLL_EVERY seconds, or takes an idle connection of this pool. Idle
    connections are kept at most LEASE_IDLE seconds, and closed at once when other instances
    wait and this pool holds more than its share.

    With `connection_rate` (the relay's `max_connection_rate`), opening a connection also waits
    for its slot under that rate (fleet-wide, keyed by `rate_target`), at most `max_rate_wait`
    and never past the delivery's deadline; refused, the delivery gets 451 4.4.5 naming the
    limit, nothing sent. A reused idle connection takes no slot.
    """

    def __init__(
        self,
        destination: Destination,
        settings: SessionSettings,
        size: int,
        idle_timeout: float,
        session_factory: Callable[[Destination, SessionSettings], SmtpSession] = SmtpSession,
        *,
        max_waiting: int = MAX_WAITING,
        metrics_destination: str = ANY_DESTINATION,
        fleet: FleetLeases | None = None,
        connection_rate: RelayRate | None = None,
        rate_target: str | None = None,
    ) -> None:
        self.destination = destination
        self.settings = settings
        self.size = size
        self.idle_timeout = idle_timeout
        self.max_waiting = max_waiting
        self.open_count = 0
        # A stack: the connection used last goes out first, so a burst's extra connections
        # sink to the bottom and expire. Each idle connection's start is in `_idle_since`.
        self._idle: list[SmtpSession] = []
        self._idle_since: dict[SmtpSession, float] = {}
        # One timer for the pool, at the oldest idle connection's expiry; not one per delivery.
        self._sweeper: asyncio.TimerHandle | None = None
        # Deliveries waiting for a connection, in arrival order: a connection given back goes to the
        # first that may reuse one (its future's result); None wakes one to try again.
        self._waiters: deque[asyncio.Future[SmtpSession | None]] = deque()
        self._fresh_only: set[asyncio.Future[SmtpSession | None]] = set()  # waiters that will not reuse one
        # Deliveries holding a slot while they wait for the connection rate's (_wait_for_slot).
        self._rate_waiters: deque[asyncio.Future[SmtpSession | None]] = deque()
        self._closing: set[asyncio.Task[None]] = set()
        self._session_factory = session_factory
        self._closed = False
        # The relay's max_connection_rate, keyed like its max_message_rate (`rate_target`).
        self._connection_rate = connection_rate
        self._rate_target = rate_target or destination.label
        labels = (settings.relay, metrics_destination)
        self._open_gauge = SMTP_CONNECTIONS.labels(*labels, "open")
        self._idle_gauge = SMTP_CONNECTIONS.labels(*labels, "idle")
        self._opened = SMTP_OPENED.labels(*labels)
        self._reused = SMTP_REUSED.labels(*labels)
        self._gate: LeaseGate | None = None
        if fleet is not None:
            self._gate = fleet.gate(settings.relay, destination.label, size, metrics_destination)
            self._gate.on_news = self._shed
            self.idle_timeout = min(idle_timeout, LEASE_IDLE)
            self._lease_wait = FLEET_LEASE_WAIT.labels(*labels)
            self._poller: asyncio.TimerHandle | None = None

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def deliver(self, envelope: Envelope, recipients: list[str], context: DeliveryContext) -> Transaction:
        """The envelope in transactions on a pooled connection: one per `max_recipients_per_batch`
        recipients, and one more for the recipients a server refused as too many (452 4.5.3, RFC
        5321 4.5.3.1.10) as long as each transaction delivers to someone. The next transaction
        goes on the same connection while it lasts. One reply per recipient, in order."""
        count = len(recipients)
        try:
            session = await self._acquire(reuse=True)
        except _TooManyWaiting:
            return Transaction([replies.too_many_waiting(self.destination.label)] * count, False)
        size = self.settings.max_recipients_per_batch
        if count <= size:  # the usual case: one transaction
            session, transaction = await self._transaction(session, envelope, recipients, context)
            if session is not None:
                self._release(session)
            if transaction.replies and any(_too_many(r) for r in transaction.replies):
                return await self._further(envelope, recipients, context, list(range(count)), transaction)
            return transaction
        results: list[Reply | None] = [None] * count
        batches = deque(list(range(start, min(start + size, count))) for start in range(0, count, size))
        return await self._batches(session, envelope, recipients, context, batches, results)

    async def _further(
        self,
        envelope: Envelope,
        recipients: list[str],
        context: DeliveryContext,
        batch: list[int],
        transaction: Transaction,
    ) -> Transaction:
        """After a one-transaction delivery that left recipients refused as too many: the rest."""
        results: list[Reply | None] = [None] * len(recipients)
        state = _Outcome(results, transaction.data_sent, set(), transaction.security)
        rest = state.take(batch, transaction)
        if not rest:
            return state.transaction()
        try:
            session = await self._acquire(reuse=True)
        except _TooManyWaiting:
            return state.transaction()
        return await self._batches(session, envelope, recipients, context, deque([rest]), results, state)

    async def _batches(
        self,
        session: SmtpSession | None,
        envelope: Envelope,
        recipients: list[str],
        context: DeliveryContext,
        batches: "deque[list[int]]",
        results: list[Reply | None],
        state: "_Outcome | None" = None,
    ) -> Transaction:
        state = state or _Outcome(results, False, set())
        try:
            while batches:
                batch = batches.popleft()
                # From here the connection is _transaction's, which closes it on any exception (a
                # deadline's cancellation): `finally` must not release it a second time, which freed
                # its slot (and its fleet lease) twice and let the pool open more than its size.
                current, session = session, None
                if current is not None and not current.usable:  # closed by the last transaction
                    self._discard(current)
                    current = await self._acquire(reuse=False)
                session, transaction = await self._transaction(
                    current, envelope, [recipients[i] for i in batch], context
                )
                if session is None:  # no connection: the same failure for every recipient still waiting
                    failure = transaction.replies[0]
                    state.take(batch, transaction)
                    for rest in batches:
                        state.take(rest, Transaction([failure] * len(rest), False))
                    break
                if rest := state.take(batch, transaction):
                    batches.appendleft(rest)
        finally:
            if session is not None:
                self._release(session)
        return state.transaction()

    async def _transaction(
        self, session: SmtpSession | None, envelope: Envelope, recipients: list[str], context: DeliveryContext
    ) -> tuple[SmtpSession | None, Transaction]:
        """One transaction on `session`, or on a new connection (None: a slot is reserved for it).
        A reused connection found dead before anything was sent is replaced by a fresh one, so a
        stale socket never fails a delivery. Returns the session to go on with, None when it was
        closed or could not be opened."""
        while True:
            rate = self._connection_rate
            if session is None and rate is not None:
                slot = await self._rate_slot(rate, context)
                if isinstance(slot, Reply):
                    return None, Transaction([slot] * len(recipients), False)
                session = slot  # a connection given back while the slot was awaited, or None
            if session is None:
                session = self._session_factory(self.destination, self.settings)
                try:
                    await session.open()
                    self._opened.inc()
                except RelayError as exc:
                    self._discard(session)
                    return None, Transaction([exc.reply] * len(recipients), False)
                except BaseException:  # cancelled (a deadline): never leave the socket open
                    self._discard(session)
                    raise
            try:
                return session, await session.transaction(envelope, recipients, context)
            except StaleSessionError:
                self._discard(session)
                session = await self._acquire(reuse=False)  # a fresh connection never raises it again
            except BaseException:
                self._discard(session)
                raise

    async def _rate_slot(self, rate: RelayRate, context: DeliveryContext) -> Reply | SmtpSession | None:
        """Wait for a new connection's slot under max_connection_rate (the pool slot, and its fleet
        lease, are already reserved: they are given back when the slot is refused or the wait is
        cancelled, and so is the rate's slot of a cancelled wait). Here, not in _acquire: every way
        to a new connection (the first, a stale one's replacement, the next batch's after a 421)
        passes by, and a reused one never does.

        A connection coming back to the pool while the slot is awaited serves this delivery
        instead (returned): the reserved pool slot and the rate's slot go back. A burst to a
        destination with a connection rate waited its slots one by one while the first
        connection was idle again after a few milliseconds."""
        try:
            reserved = await rate.reserve(self._rate_target, context)
        except BaseException:
            self._closed_one()
            raise
        if isinstance(reserved, Reply):
            self._closed_one()
            return reserved
        try:
            handed = await self._wait_for_slot(reserved.wait) if reserved.wait else None
        except BaseException:
            # Cancelled (its client gone, a shutdown) before it opened anything: its rate slot goes back too.
            self._closed_one()
            rate.give_back_later(self._rate_target, reserved.shared)
            raise
        if handed is not None:
            self._closed_one()
            try:
                await rate.give_back(self._rate_target, shared=reserved.shared)
            except BaseException:  # cancelled: the connection goes on to the next delivery
                self._release(handed)
                raise
        return handed

    async def _wait_for_slot(self, seconds: float) -> SmtpSession | None:
        """`seconds`, or less when a connection is given back meanwhile (_hand_over): then it."""
        if (idle := self._take_idle()) is not None:  # given back while the slot was reserved
            return idle
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[SmtpSession | None] = loop.create_future()
        self._rate_waiters.append(waiter)
        timer = loop.call_later(seconds, _resolve, waiter)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and (session := waiter.result()) is not None:
                self._release(session)  # handed over, then cancelled: the next one's
            raise
        finally:
            timer.cancel()
            if waiter in self._rate_waiters:
                self._rate_waiters.remove(waiter)

    async def _acquire(self, *, reuse: bool) -> SmtpSession | None:
        """An idle connection, or None with a slot reserved for opening one.
        Raises _TooManyWaiting when a new delivery (`reuse`) would have to wait behind `max_waiting` others."""
        if self._gate is not None:
            return await self._acquire_leased(self._gate, reuse=reuse)
        bounded = reuse  # a delivery that waited once, or replaces a stale connection, is never refused
        while True:
            if reuse and (session := self._take_idle()):
                return session
            if self.open_count < self.size:
                self.open_count += 1
                self._open_gauge.inc()
                return None
            if bounded and len(self._waiters) >= self.max_waiting:
                raise _TooManyWaiting
            bounded = False
            if (handed := await self._wait_in_line(reuse=reuse)) is not None:
                return handed

    async def _acquire_leased(self, gate: LeaseGate, *, reuse: bool) -> SmtpSession | None:
        """_acquire under a fleet-wide limit: a slot also needs a lease (or, while Redis does
        not answer, room under the local limit)."""
        bounded = reuse
        loop = asyncio.get_running_loop()
        waited_from: float | None = None
        woken = False
        try:
            while True:
                if reuse and (session := self._take_idle()):
                    return session
                refused = False
                if self.open_count < gate.limit():
                    self.open_count += 1  # reserved while Redis is asked: no other delivery takes it
                    self._open_gauge.inc()
                    try:
                        got = await gate.take()
                    except BaseException:
                        self._unreserve()
                        raise
                    if got is None and self.open_count > gate.limit():
                        got = False  # Redis went away meanwhile, and the local limit is reached
                    elif got is None:
                        gate.opened_unleased()
                    if got is not False:
                        return None
                    self._unreserve()
                    refused = True
                if bounded and len(self._waiters) >= self.max_waiting:
                    raise _TooManyWaiting
                bounded = False
                if waited_from is None:
                    waited_from = loop.time()
                if self._poller is None and (refused or self.open_count < gate.limit()):
                    # A lease may free up elsewhere in the fleet: ask again soon, one delivery for the pool.
                    self._poller = loop.call_later(POLL_EVERY, self._poll)
                # Woken by a poll or a release, and still nothing: first in line again.
                first, woken = woken, True
                if (handed := await self._wait_in_line(reuse=reuse, first=first)) is not None:
                    return handed
        finally:
            if waited_from is not None:
                self._lease_wait.observe(loop.time() - waited_from)
                if not self._waiters:
                    gate.unwant()

    def _unreserve(self) -> None:
        self.open_count -= 1
        self._open_gauge.dec()

    def _poll(self) -> None:
        """One waiting delivery tries again; so does the next one in POLL_EVERY while any waits."""
        self._poller = None
        self._wake()
        if self._waiters and not self._closed:
            self._poller = asyncio.get_running_loop().call_later(POLL_EVERY, self._poll)

    def _over_local_limit(self, gate: LeaseGate) -> bool:
        """Redis does not answer, and this pool has more connections (not counting those saying
        QUIT) than the local limit: those opened under leases go too, as they come back."""
        return not gate.fleet.available and self.open_count - len(self._closing) > gate.local_limit

    def _shed(self) -> None:
        """Close idle connections the fleet wants back (others wait, they hold no lease, or they
        are more than the local limit while Redis does not answer)."""
        gate = self._gate
        while gate is not None and self._idle and (gate.unwanted_idle() or self._over_local_limit(gate)):
            session = self._idle.pop(0)  # idle the longest
            del self._idle_since[session]
            self._idle_gauge.dec()
            self._discard(session, quit=True)

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _wait_in_line(self, *, reuse: bool, first: bool = False) -> SmtpSession | None:
        """Waits for a turn: the connection handed over (`_hand_over`), or None when woken to try again."""
        waiter: asyncio.Future[SmtpSession | None] = asyncio.get_running_loop().create_future()
        if first:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        if not reuse:
            self._fresh_only.add(waiter)
        try:
            return await waiter
        except BaseException:
            self._pass_on(waiter)  # woken, or handed a connection, but cancelled: the next one's
            raise
        finally:
            self._fresh_only.discard(waiter)
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _hand_over(self, session: SmtpSession) -> bool:
        """Give a connection coming back to the delivery that has waited longest and may reuse it.
        Put in the idle list and woken, that delivery found it taken by one that asked after it
        (a batch's next line asks at once) and waited again at the back of the line. One waiting
        for a connection rate's slot comes first: it gives back a pool slot and a rate slot."""
        while self._rate_waiters:
            waiter = self._rate_waiters.popleft()
            if not waiter.done():
                self._reused.inc()
                waiter.set_result(session)
                return True
        for waiter in self._waiters:
            if not waiter.done() and waiter not in self._fresh_only:
                self._waiters.remove(waiter)
                self._reused.inc()
                waiter.set_result(session)
                return True
        return False

    def _pass_on(self, waiter: "asyncio.Future[SmtpSession | None]") -> None:
        """A waiter whose delivery was cancelled after it was woken gives what it got to the next."""
        if not waiter.done() or waiter.cancelled():
            return
        session = waiter.result()
        if session is None:
            self._wake()
        else:
            self._release(session)

    def _take_idle(self) -> SmtpSession | None:
        while self._idle:
            session = self._idle.pop()
            self._idle_gauge.dec()
            del self._idle_since[session]
            if session.usable and time.monotonic() - session.created < MAX_CONNECTION_AGE:
                self._reused.inc()
                return session
            self._discard(session)
        return None

    def _release(self, session: SmtpSession) -> None:
        fresh = time.monotonic() - session.created < MAX_CONNECTION_AGE
        # Its lease goes to another instance: beyond this pool's share, or not needed here now.
        gate = self._gate
        surplus = gate is not None and (
            gate.surplus() or (gate.unwanted_idle() and not self._waiters) or self._over_local_limit(gate)
        )
        if self._closed or not session.usable or not fresh or self.idle_timeout <= 0 or surplus:
            self._discard(session, quit=True)
            return
        if self._hand_over(session):
            return
        loop = asyncio.get_running_loop()
        self._idle.append(session)
        self._idle_since[session] = loop.time()
        self._idle_gauge.inc()
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.idle_timeout, self._sweep)
        self._wake()

    def _sweep(self) -> None:
        """QUIT the connections idle for `idle_timeout`; come back for the next one to expire."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._idle and self._idle_since[self._idle[0]] + self.idle_timeout <= now:
            session = self._idle.pop(0)  # the bottom of the stack: idle the longest
            del self._idle_since[session]
            self._idle_gauge.dec()
            self._discard(session, quit=True)
        if self._idle:
            self._sweeper = loop.call_at(self._idle_since[self._idle[0]] + self.idle_timeout, self._sweep)

    def _discard(self, session: SmtpSession, *, quit: bool = False) -> None:
        """Close a connection (politely with QUIT when asked and possible); its slot
        frees once it is really closed."""
        if not (quit and session.usable):
            session.close()
            self._closed_one()
            return

        async def say_quit() -> None:
            try:
                await session.quit()
            finally:
                self._closed_one()

        task = asyncio.get_running_loop().create_task(say_quit())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _closed_one(self) -> None:
        self.open_count -= 1
        self._open_gauge.dec()
        if self._gate is not None:  # only once really closed: the next hop never sees one too many
            self._gate.closed_one()
        self._wake()

    async def aclose(self) -> None:
        """QUIT every idle connection and wait for the QUITs under way."""
        self._closed = True
        if self._gate is not None and self._poller is not None:
            self._poller.cancel()
            self._poller = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._idle_since.clear()
        idle, self._idle = self._idle, []
        self._idle_gauge.dec(len(idle))
        for session in idle:
            self._discard(session, quit=True)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


def _too_many(reply: Reply) -> bool:
    """A RCPT refused because the transaction has too many recipients (RFC 5321 4.5.3.1.10:
    452, or the old 552, with x.5.3; a bare 452 without an enhanced code), not because of the
    recipient: it may go in another transaction."""
    if reply.command != "RCPT":
        return False
    if reply.enhanced_status is not None:
        return reply.enhanced_status in ("4.5.3", "5.5.3")
    return reply.code == 452


@dataclass(slots=True)
class _Outcome:
    """The replies of a delivery made of several transactions, by recipient index."""

    results: list[Reply | None]
    data_sent: bool
    in_doubt: set[int]
    security: HopSecurity | None = None  # of the last connection that served a transaction

    def take(self, batch: list[int], transaction: Transaction) -> list[int]:
        """Record a transaction of the recipients `batch`; returns those to send again in a further
        one (refused as too many, when this one delivered to someone: each round makes progress)."""
        self.data_sent = self.data_sent or transaction.data_sent
        if transaction.security is not None:
            self.security = transaction.security
        self.in_doubt.update(batch[j] for j in transaction.in_doubt)
        again: list[int] = []
        progress = any(r.code // 100 == 2 for r in transaction.replies)
        for i, reply in zip(batch, transaction.replies, strict=True):
            self.results[i] = reply
            if progress and _too_many(reply):
                again.append(i)
        return again

    def transaction(self) -> Transaction:
        replies = [r for r in self.results if r is not None]
        return Transaction(replies, self.data_sent, frozenset(self.in_doubt), self.security)


def _resolve(waiter: "asyncio.Future[SmtpSession | None]") -> None:
    if not waiter.done():
        waiter.set_result(None)
